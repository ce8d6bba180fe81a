"""The network JVP of the continuous-time methods (sCT, MeanFlow): ``torch.func.jvp`` under ``torch.no_grad()``.

Both methods use the JVP only inside a stop-gradient (sCM Eq. 8 / Alg. 1; MeanFlow Alg. 1), so it is forward-mode
only: no graph is kept, and the trainable primal is a separate pass with the same dropout seed.

Routes. By default (``impl=None``) the JVP runs on the model's own ops route: on CUDA the Triton route, whose
GroupNorm(+scale/shift+SiLU) and attention compute the output and its tangent in one fused pass
(fastcm.ops._jvp; before those rules, ``torch.func.jvp`` through a ``custom_op`` silently returned a zero tangent).
Where a U-Net's ops resolve to Triton, the route is first probed once per device (:func:`check_triton_tangents`:
the ops' JVP against the reference's), so a route that does not carry the right tangent raises instead of training
on a silently wrong one. ``impl="torch"`` runs the JVP's ops on the reference (explicit group norm and softmax attention)
inside a ``fastcm.ops.use_impl`` block, which leaves the model untouched.
The JVP runs eagerly on the unwrapped module (``torch.func.jvp`` of a DDP module fails, pytorch#102197; a custom
``jvp`` rule is dropped inside a compiled JVP, pytorch#192985).
"""
import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fastcm.models.unet import UNet
from fastcm.ops import group_norm, group_norm_ref, qkv_attention, qkv_attention_ref, resolve_impl, use_impl

_PROBED = {}  # device -> None (the Triton route carries tangents) or the reason it does not


@contextlib.contextmanager
def ops_impl(model: nn.Module, impl: Optional[str]):
    """Run the fastcm ops of ``model``'s forward on backend ``impl`` (None: the model's own route): a
    ``fastcm.ops.use_impl`` block, which changes nothing on the model, so a torch.compile'd forward of it sees the
    same attributes afterwards (no recompilation)."""
    if impl is None:
        yield
        return
    with use_impl(impl):
        yield


def _probe_cases(device):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    gn = (r(2, 4, 3, 3), r(4), r(4), r(2, 4), r(2, 4))  # x, weight, bias, scale, shift
    gn_tan = (r(2, 4, 3, 3), torch.zeros(4, device=device), torch.zeros(4, device=device), r(2, 4), r(2, 4))
    yield ("group_norm", lambda impl: lambda x, w, b, s, t: group_norm(x, 2, w, b, 1e-5, s, t, "silu", impl=impl),
           lambda x, w, b, s, t: group_norm_ref(x, 2, w, b, 1e-5, s, t, "silu"), gn, gn_tan)
    yield ("qkv_attention", lambda impl: lambda qkv: qkv_attention(qkv, 1, impl=impl), lambda qkv:
           qkv_attention_ref(qkv, 1), (r(1, 48, 4, 4),), (r(1, 48, 4, 4),))


def check_triton_tangents(device) -> None:
    """Raise RuntimeError unless ``torch.func.jvp`` through the Triton route of the ops the U-Net uses (group norm
    with scale/shift/SiLU, qkv attention) matches the reference's JVP on ``device``; probed once per device."""
    device = torch.device(device)
    if device not in _PROBED:
        _PROBED[device] = None
        for name, op, ref, primals, tangents in _probe_cases(device):
            try:
                with torch.no_grad():
                    _, got = torch.func.jvp(op("triton"), primals, tangents)
                    _, want = torch.func.jvp(ref, primals, tangents)
            except Exception as e:  # noqa: BLE001 - reported, never swallowed
                _PROBED[device] = f"{name} raised {type(e).__name__}: {e}"
                break
            err = (got.float() - want.float()).abs().max().item()
            if not err <= 1e-3 * max(1.0, want.abs().max().item()):
                _PROBED[device] = f"{name}'s tangent is off by {err:.3g} (max |reference| {want.abs().max():.3g})"
                break
    if _PROBED[device] is not None:
        raise RuntimeError(f"the Triton route of fastcm's ops does not carry forward-mode tangents on {device} "
                           f"({_PROBED[device]}); run the JVP on the reference ops (jvp_impl='torch')")


def network_jvp(model: nn.Module, fn: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor],
                impl: Optional[str] = None):
    """(fn(*primals), d fn(*primals)[tangents]) with no autograd graph; ``model`` is the module ``fn`` calls.

    ``impl`` is the ops backend of the fastcm U-Nets in ``model`` during the JVP (see the module docstring).
    Autocast is off inside: the tangent is computed in the primals' dtype (py-meanflow runs its JVP in fp32; sCM's
    FP16 recipe relies on the JVP rearrangement instead, which the sCT loss applies).
    Primals and tangents are made contiguous: forward AD of ``torch.group_norm`` (the reference route) raises
    "view size is not compatible with input tensor's size and stride" on channels_last activations (torch 2.13
    CPU); a model whose weights are channels_last still hits it, and that error is re-raised with this diagnosis.
    """
    primals = tuple(p.contiguous() for p in primals)
    tangents = tuple(t.contiguous() for t in tangents)
    device_type = primals[0].device.type
    if impl is None and any(resolve_impl(m.config.impl, primals[0]) == "triton" for m in model.modules()
                            if isinstance(m, UNet)):
        check_triton_tangents(primals[0].device)
    with torch.no_grad(), torch.autocast(device_type, enabled=False), ops_impl(model, impl):
        try:
            out, tangent = torch.func.jvp(fn, primals, tangents)
        except RuntimeError as e:
            if "view size is not compatible" not in str(e):
                raise
            raise RuntimeError("the network JVP failed on a channels_last layout: forward AD of torch.group_norm "
                               "(fastcm's reference group norm) does not support channels_last activations on "
                               "torch 2.13; keep the model in torch.contiguous_format for sCT/MeanFlow") from e
    return out.detach(), tangent.detach()
