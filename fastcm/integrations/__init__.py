"""Drop-in fastcm ops for models you already have: ``fastcm.patch(model)`` / ``fastcm.unpatch(model)``.

    report = fastcm.patch(unet)          # in place; state_dict keys and values unchanged
    print(report)                        # what was replaced, how many, what was left alone and why
    fastcm.unpatch(unet)                 # the original modules, classes and attention processors again

Generic models: every ``torch.nn.GroupNorm`` becomes :class:`fastcm.ops.GroupNorm` (any (N, C, *) input, any
layout). diffusers models (``UNet2DModel``, ``UNet2DConditionModel`` and the blocks they use; see
:mod:`fastcm.integrations.diffusers_unet`): ``ResnetBlock2D``'s GroupNorm -> SiLU pairs run fused (with per-sample
scale/shift for ``resnet_time_scale_shift="scale_shift"``) and attention runs through ``fastcm.ops.attention``.
diffusers is imported only when the model holds diffusers modules.
"""
from contextlib import contextmanager
from typing import Sequence

from torch import nn

from fastcm._checks import IMPLS, check_choice

from .generic import patch_group_norms
from .report import STATE_ATTR, PatchReport, PatchState

OPS = ("group_norm", "attention")

__all__ = ["patch", "unpatch", "patched", "PatchReport", "OPS"]


def patch(model: nn.Module, impl: str = "auto", ops: Sequence[str] = OPS) -> PatchReport:
    """Run ``model``'s GroupNorms (``"group_norm"``) and diffusers attention (``"attention"``) on fastcm ops.

    Args:
        model: any ``nn.Module``; modified in place (parameters, buffers and state_dict are unchanged).
        impl: backend of the fastcm ops: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton",
            "torch".
        ops: a list or tuple drawn from ``("group_norm", "attention")``: what to replace.
    Returns a :class:`PatchReport` (empty when there is nothing to patch). Patching again re-applies from the
    original model, so ``patch`` is idempotent and a second call may change ``impl`` or ``ops``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("impl", impl, IMPLS)
    ops = _check_ops(ops)
    unpatch(model)
    state = PatchState(PatchReport(impl, ops))
    try:
        _apply(model, impl, ops, state)
    except BaseException:
        state.restore()
        raise
    if state.undo:
        setattr(model, STATE_ATTR, state)
    return state.report


def unpatch(model: nn.Module) -> bool:
    """Restore what :func:`patch` changed in ``model``; returns False when the model was not patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return False
    state.restore()
    return True


@contextmanager
def patched(model: nn.Module, impl: str = "auto", ops: Sequence[str] = OPS):
    """``with fastcm.patched(model) as report: ...``: patch for the block, unpatch after."""
    report = patch(model, impl, ops)
    try:
        yield report
    finally:
        unpatch(model)


def _check_ops(ops) -> tuple:
    if not isinstance(ops, (list, tuple)) or not all(isinstance(o, str) for o in ops) or not set(ops) <= set(OPS):
        raise ValueError(f"ops must be a sequence drawn from {OPS}, got {ops!r}")
    return tuple(o for o in OPS if o in ops)


def _uses_diffusers(model: nn.Module) -> bool:
    return any(type(m).__module__.split(".")[0] == "diffusers" for m in model.modules())


def _apply(model: nn.Module, impl: str, ops: tuple, state: PatchState) -> None:
    fused = set()
    if ops and _uses_diffusers(model):
        from . import diffusers_unet as d

        d.check_diffusers()
        if "group_norm" in ops:
            fused = d.patch_resnets(model, impl, state)
        if "attention" in ops:
            d.patch_attention(model, impl, state)
    if "group_norm" in ops:
        patch_group_norms(model, impl, state, skip=fused)
