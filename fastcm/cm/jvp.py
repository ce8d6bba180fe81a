"""The network JVP of the continuous-time methods (sCT, MeanFlow), in one pass or two.

Both methods use the JVP only inside a stop-gradient (sCM Eq. 8 / Alg. 1; MeanFlow Alg. 1), so it is forward-mode
only, and the trainable output *is* the JVP's primal: same parameters, same inputs, same dropout mask.

``jvp_mode="one_pass"`` (the default, :func:`dual_pass`): ONE network call on ``torch.autograd.forward_ad`` dual
inputs under autograd gives the trainable output with its graph and its tangent, which is detached (the methods'
stop-gradient) and whose own graph is cut at every leaf module (:func:`_cut_tangents`). The call is the model's
``__call__`` (so DDP all-reduces the gradients) and runs eagerly (``torch.compiler.set_stance("force_eager")``:
compiled code drops custom ``jvp`` rules, pytorch#192985, and a compiled module fed duals returns a wrong tangent).
Memory: forward AD keeps the tangent of every dual tensor autograd saves for backward until the dual level
closes; so the pass computes conv tangents as conv(x_t, W) (:func:`_lean_conv_tangents`) and fastcm's reference ops
take their trainable output from the primals and their tangent without a graph (``fastcm.ops._jvp.split_duals``).
cifar10-small batch 8, CPU: the forward peaks at 1.27x a plain step's, and nothing more than a plain forward's
activations stays resident for the backward (benchmarks/results/jvp-memory.md; 3.35x / 1.33x before). Under the
caller's ``torch.autocast`` the tangent is computed at the autocast precision, like the primal (sCM's FP16 recipe
relies on the JVP rearrangement, which the sCT loss applies).
``jvp_mode="two_pass"`` (:func:`network_jvp`, the oracle of the tests): ``torch.func.jvp`` under
``torch.no_grad()`` with autocast off, then a separate trainable forward with the same dropout seed.

Routes. By default (``impl=None``) the JVP runs on the model's own ops route: on CUDA the Triton route, whose
GroupNorm(+scale/shift+SiLU) and attention compute the output and its tangent in one fused launch per layer
(fastcm.ops._jvp.FusedJvpRule; before those rules, ``torch.func.jvp`` through a ``custom_op`` silently returned a
zero tangent). Where a U-Net's ops resolve to Triton, the route is first probed once per device
(:func:`check_triton_tangents`), so a route that does not carry the right tangent raises instead of training on a
silently wrong one. ``impl="torch"`` runs the ops on the reference (explicit group norm and softmax attention) inside a
``fastcm.ops.use_impl`` block, which leaves the model untouched, for the JVP pass (in one-pass mode: the whole
step's forward). ``torch.func.jvp`` of a DDP module fails (pytorch#102197), so two_pass runs it on the
unwrapped module.
"""
import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from fastcm.models.unet import UNet
from fastcm.ops import group_norm, group_norm_ref, qkv_attention, qkv_attention_ref, resolve_impl, use_impl
from fastcm.ops._jvp import has_tangent, split_duals

JVP_MODES = ("one_pass", "two_pass")
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


def _probe_route(model: nn.Module, x: Tensor, impl: Optional[str]) -> None:
    if impl is None and any(resolve_impl(m.config.impl, x) == "triton" for m in model.modules() if isinstance(m, UNet)):
        check_triton_tangents(x.device)


def _check_channels_last(e: RuntimeError) -> None:
    """Re-raise forward AD's layout error with its diagnosis (the caller re-raises any other error as it is)."""
    if "view size is not compatible" in str(e):
        raise RuntimeError("the network JVP failed on a channels_last layout: forward AD of torch.group_norm "
                           "(fastcm's reference group norm) does not support channels_last activations on "
                           "torch 2.13; keep the model in torch.contiguous_format for sCT/MeanFlow") from e


def dual_pass(model: nn.Module, fn: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor],
              impl: Optional[str] = None):
    """(outputs, tangent): ``fn(*duals)`` called ONCE on forward-AD dual inputs under the caller's grad mode.

    ``outputs`` is fn's output (a tensor or a tuple) with its autograd graph; ``tangent`` is the detached tangent of
    its first tensor along ``tangents``. ``model`` is the module fn calls (its fastcm U-Nets take ``impl``). A
    module without a forward-AD rule, which leaves the output with no tangent, raises naming the module.
    """
    primals = tuple(p.contiguous() for p in primals)
    tangents = tuple(t.contiguous() for t in tangents)
    _probe_route(model, primals[0], impl)
    with fwAD.dual_level(), ops_impl(model, impl), torch.compiler.set_stance("force_eager"), _cut_tangents(model), \
            _lean_conv_tangents(model), split_duals():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        try:
            out = fn(*duals)
        except (RuntimeError, NotImplementedError) as e:
            if isinstance(e, RuntimeError):
                _check_channels_last(e)
            if "forward" not in str(e) or ("AD" not in str(e) and "jvp" not in str(e)):
                raise
            raise RuntimeError(_no_rule_message(model, fn, duals, f"raised {type(e).__name__}: {e}")) from e
        first = out[0] if isinstance(out, tuple) else out
        tangent = fwAD.unpack_dual(first).tangent
        if tangent is None:
            raise RuntimeError(_no_rule_message(model, fn, duals, "left the network output with no tangent"))
        tangent = tangent.detach()
    return out, tangent


@contextlib.contextmanager
def _cut_tangents(model: nn.Module):
    """Detach the tangent of every leaf module's output while the pass runs (values unchanged). Under autograd,
    forward AD records a graph for the tangent too; nothing back-propagates through it (the methods stop its
    gradient), but uncut it would hold every tangent intermediate until the pass ends."""
    if not torch.is_grad_enabled():
        yield
        return

    def cut(module, args, output):
        if isinstance(output, Tensor):
            primal, tangent = fwAD.unpack_dual(output)
            if tangent is not None and tangent.requires_grad:
                return fwAD.make_dual(primal, tangent.detach())
        return None

    handles = [m.register_forward_hook(cut) for m in model.modules() if next(m.children(), None) is None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _lean_conv_tangents(model: nn.Module):
    """While the pass runs, give every nn.Conv1d/2d/3d the tangent conv(x_t, W) (values unchanged).

    A conv is linear in its input, so with constant weights its tangent is the bias-free conv of the input's
    tangent. torch's forward-AD rule for convolution (torch 2.13) also convolves the input with the weight's
    tangent, a materialised zero for a parameter that carries none: a third full convolution per layer. The tangent
    needs no graph (:func:`_cut_tangents` detaches it at every leaf module anyway). fastcm's own reference ops get
    the same treatment from ``fastcm.ops._jvp.split_duals``."""
    lean = {}
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            lean[m] = _lean_conv(m, m.forward)
    saved = {m: m.__dict__.get("forward") for m in lean}  # an instance-level forward the caller set, if any
    for m, forward in lean.items():
        m.forward = forward
    try:
        yield
    finally:
        for m, before in saved.items():
            if before is None:
                del m.forward
            else:
                m.forward = before


def _lean_conv(m: nn.Module, forward: Callable) -> Callable:
    def lean_forward(x):
        primal, tangent = fwAD.unpack_dual(x)
        if tangent is None or has_tangent(m.weight, m.bias):
            return forward(x)
        with torch.no_grad():
            t = m._conv_forward(tangent, m.weight, None)
        return fwAD.make_dual(m._conv_forward(primal, m.weight, m.bias), t)
    return lean_forward


def _no_rule_message(model: nn.Module, fn: Callable, duals, what: str) -> str:
    """One line naming the innermost module that raised, else the first whose inputs carry a tangent and whose
    output does not: fn is rerun once with module hooks (only on this error path)."""
    names = {m: n or "<model>" for n, m in model.named_modules()}
    stack, dropped, raised = [], [], []

    def pre(module, args):
        stack.append(module)

    def post(module, args, output):
        stack.pop()
        outs = output if isinstance(output, (tuple, list)) else (output,)
        if has_tangent(*args) and not has_tangent(*outs) and any(isinstance(o, Tensor) for o in outs):
            dropped.append(module)

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.no_grad():
            fn(*duals)
    except Exception:  # noqa: BLE001 - the original error is chained by the caller
        raised.append(stack[-1] if stack else None)
    finally:
        for h in handles:
            h.remove()
    culprit = (raised or dropped or [None])[0]
    where = "a function outside the model's modules" if culprit is None else \
        f"module {names.get(culprit, '?')} ({type(culprit).__name__})"
    return (f"jvp_mode='one_pass': {where} has no forward-AD rule (forward AD {what.splitlines()[0]}); give it "
            f"one, or pass jvp_mode='two_pass'")


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
    _probe_route(model, primals[0], impl)
    with torch.no_grad(), torch.autocast(primals[0].device.type, enabled=False), ops_impl(model, impl):
        try:
            out, tangent = torch.func.jvp(fn, primals, tangents)
        except RuntimeError as e:
            _check_channels_last(e)
            raise
    return out.detach(), tangent.detach()
