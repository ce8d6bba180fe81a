"""fastcm's fast ops. Each op family lives in one file with its readable reference beside it (the fast-ops
contract, see README): ``<op>`` validates and dispatches (Triton on CUDA, reference elsewhere, ``impl=`` overrides),
``<op>_ref`` is the PyTorch ground truth, and the Triton path is a ``torch.library.custom_op``.

``REGISTRY`` maps name -> OpSpec(op, ref, make_inputs); tests and benchmarks iterate over it.
``make_inputs(case, device, dtype, requires_grad)`` returns the op's keyword arguments for a named case;
``make_inputs.cases`` lists the cases (U-Net preset shapes).
"""
from typing import Callable, NamedTuple, Optional

from . import attention as _attention, group_norm as _group_norm, pseudo_huber as _pseudo_huber, sqrtm as _sqrtm

from .attention import attention, attention_ref, qkv_attention, qkv_attention_ref
from .attention import make_inputs as _attention_inputs
from .attention import make_qkv_inputs as _qkv_attention_inputs
from .group_norm import GroupNorm, group_norm, group_norm_ref
from .group_norm import make_inputs as _group_norm_inputs
from .frechet import FrechetReference, frechet_distance, frechet_distance_ref, trace_sqrt_product
from .frechet import make_inputs as _frechet_inputs
from .pseudo_huber import pseudo_huber_loss, pseudo_huber_loss_ref
from .pseudo_huber import make_inputs as _pseudo_huber_inputs
from .sqrtm import sqrtm, sqrtm_newton_schulz, sqrtm_ref
from .sqrtm import make_inputs as _sqrtm_inputs
from ._utils import current_impl, resolve_impl, use_impl


class OpSpec(NamedTuple):
    op: Callable
    ref: Callable
    make_inputs: Callable
    impls: tuple = ("auto", "triton", "torch")  # the op's impl= choices (the Frechet distance has no Triton route)
    differentiable: bool = True                 # the op has a backward (the Frechet distance is a metric)
    # The Triton route's declarations (fastcm/ops/_describe.py), from the op's own file: minimum work of a call,
    # the compile gate's launch scenarios for a call, and calls beyond those a U-Net forward makes.
    min_work: Optional[Callable] = None
    aot_jobs: Optional[Callable] = None
    aot_calls: Optional[Callable] = None


REGISTRY = {
    "pseudo_huber_loss": OpSpec(pseudo_huber_loss, pseudo_huber_loss_ref, _pseudo_huber_inputs,
                                min_work=_pseudo_huber.min_work, aot_jobs=_pseudo_huber.aot_jobs,
                                aot_calls=_pseudo_huber.aot_calls),
    "group_norm": OpSpec(group_norm, group_norm_ref, _group_norm_inputs, min_work=_group_norm.min_work,
                         aot_jobs=_group_norm.aot_jobs),
    "attention": OpSpec(attention, attention_ref, _attention_inputs, min_work=_attention.min_work),
    "qkv_attention": OpSpec(qkv_attention, qkv_attention_ref, _qkv_attention_inputs,
                            min_work=_attention.qkv_min_work, aot_jobs=_attention.qkv_aot_jobs),
    "sqrtm": OpSpec(sqrtm, sqrtm_ref, _sqrtm_inputs, min_work=_sqrtm.min_work, aot_jobs=_sqrtm.aot_jobs,
                    aot_calls=_sqrtm.aot_calls),
    "frechet_distance": OpSpec(frechet_distance, frechet_distance_ref, _frechet_inputs, ("auto", "scipy", "torch"),
                               differentiable=False),
}

__all__ = ["REGISTRY", "OpSpec", "pseudo_huber_loss", "pseudo_huber_loss_ref", "attention", "attention_ref",
           "qkv_attention", "qkv_attention_ref", "GroupNorm", "group_norm", "group_norm_ref",
           "sqrtm", "sqrtm_ref", "sqrtm_newton_schulz", "frechet_distance", "frechet_distance_ref", "trace_sqrt_product",
           "FrechetReference", "use_impl", "current_impl", "resolve_impl"]
