"""Pseudo-Huber loss (iCT, Song & Dhariwal 2023, Sec. 3.3): d(x, y) = sqrt(||x - y||_2^2 + c^2) - c.

iCT takes the norm per sample over all non-batch dims, with c = 0.00054 * sqrt(d) (d = C*H*W), and weights each
sample by lambda(sigma_i); diffusers' LCM scripts apply the same formula per element. Both are offered (``per``).
"""
from typing import Optional

import torch
from torch import Tensor

from fastcm._checks import check_real

from . import _describe
from ._jvp import JvpRule, has_tangent
from ._utils import check_choice, check_same_device, check_tensor, resolve_impl

REDUCTIONS = ("mean", "sum", "none")
PERS = ("sample", "element")


def pseudo_huber_loss(pred: Tensor, target: Tensor, c: float, weight: Optional[Tensor] = None,
                      reduction: str = "mean", per: str = "sample", impl: str = "auto") -> Tensor:
    """Pseudo-Huber loss between ``pred`` and ``target``.

    Args:
        pred, target: (B, ...) floating tensors of one shape (fp16/bf16/fp32 compute in fp32, fp64 in fp64).
        c: the positive constant c (iCT: 0.00054 * sqrt(d)); any positive finite value (both routes scale by
            max(|x - y|, c), so c^2 never overflows or vanishes; fp32 inputs compute in fp64 for a c outside
            fp32's normal range).
        weight: optional per-sample factor of shape (B,) (iCT's lambda(sigma_i)); finite and >= 0.
        reduction: "mean", "sum" or "none" ("none" gives (B,) per sample, or pred's shape per element).
        per: "sample" (norm over all non-batch dims, iCT) or "element".
        impl: "auto" (Triton on CUDA, reference elsewhere), "triton" or "torch".
    Returns the loss in fp32 (fp64 for fp64 inputs). Forward-mode AD (torch.func.jvp, forward_ad) works on every
    impl; the Triton route raises under torch.compile (pytorch#192985).
    """
    _validate(pred, target, c, weight, reduction, per)
    if resolve_impl(impl, pred) == "torch":
        return pseudo_huber_loss_ref(pred, target, c, weight, reduction, per)
    if has_tangent(pred, target):  # torch.func.jvp / forward_ad: the tangent needs the gradient buffer
        loss, _ = _JVP.apply(pred, target, float(c), per == "sample", True)
    else:
        need_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
        loss, _ = torch.ops.fastcm.pseudo_huber_fwd(pred, target, float(c), per == "sample", need_grad)
    return _weight_and_reduce(loss, weight, reduction)  # weight's tangent flows through these torch ops


def pseudo_huber_loss_ref(pred: Tensor, target: Tensor, c: float, weight: Optional[Tensor] = None,
                          reduction: str = "mean", per: str = "sample") -> Tensor:
    """Readable PyTorch reference of :func:`pseudo_huber_loss` (computes in fp32, or fp64 for fp64 inputs and for
    a c outside fp32's normal range). sqrt(n^2 + c^2) - c is evaluated as n^2 / (h + c) = n * (n / (h + c)) with
    h = hypot(n, c) and the norm n scaled by max |x - y|, so that neither n^2 nor c^2 is ever formed."""
    out = torch.promote_types(pred.dtype, torch.float32)
    acc = torch.float64 if out == torch.float32 and _c_needs_fp64(c) else out
    diff = pred.to(acc) - target.to(acc)
    if per == "sample":
        diff = diff.flatten(1) if diff.dim() > 1 else diff[:, None]  # (B, D); 1-D: B samples of one element
        top = diff.detach().abs().amax(1, keepdim=True) if diff.shape[1] else diff.new_ones(diff.shape[0], 1)
        top = torch.where(top > 0, top, 1.0)
        n = torch.linalg.vector_norm(diff / top, dim=1) * top.squeeze(1)
    else:
        n = diff.abs()
    loss = n * (n / (torch.hypot(n, n.new_tensor(float(c))) + c))
    return _weight_and_reduce(loss.to(out), weight, reduction)


def _c_needs_fp64(c: float) -> bool:
    """c outside fp32's normal range: computed in fp64 (kernels.pseudo_huber.c_in_fp64 is the Triton route's)."""
    info = torch.finfo(torch.float32)
    return not (info.tiny <= float(c) <= info.max)


def _weight_and_reduce(loss: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
    if weight is not None:
        loss = loss * weight.to(loss.dtype).view(-1, *([1] * (loss.dim() - 1)))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _validate(pred, target, c, weight, reduction, per) -> None:
    check_tensor("pred", pred, min_ndim=1)
    check_tensor("target", target, shape=tuple(pred.shape))
    check_real("c", c, positive=True)
    if weight is not None:
        check_tensor("weight", weight, shape=(pred.shape[0],))
    check_same_device(pred=pred, target=target, weight=weight)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("per", per, PERS)
    if reduction == "mean" and pred.shape[0] == 0:
        raise ValueError("pred must hold at least one sample for reduction='mean' (the mean of an empty batch is "
                         "undefined), got shape " + str(tuple(pred.shape)))
    if weight is not None and not torch.compiler.is_compiling():  # a value check needs a host sync: eager only
        bad = ~(weight >= 0) | ~torch.isfinite(weight)  # catches NaN, which compares False
        if bool(bad.any()):
            raise ValueError(f"weight must be finite and >= 0, got {weight[bad][0].item()!r} at index "
                             f"{int(bad.nonzero()[0, 0])}")


# ----------------------------------------------------------------------------------------------------------------
# Triton path as a torch.library custom op, so torch.compile(fullgraph=True) traces through it and opcheck passes.

@torch.library.custom_op("fastcm::pseudo_huber_fwd", mutates_args=())
def _pseudo_huber_fwd(pred: Tensor, target: Tensor, c: float, per_sample: bool,
                      need_grad: bool) -> tuple[Tensor, Tensor]:
    from fastcm.kernels.pseudo_huber import pseudo_huber_fwd

    return pseudo_huber_fwd(pred, target, c, per_sample, need_grad)


@_pseudo_huber_fwd.register_fake
def _(pred, target, c, per_sample, need_grad):
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    loss = pred.new_empty((pred.shape[0],) if per_sample else pred.shape, dtype=acc)
    grad = pred.new_empty(pred.shape if need_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    pred, target, c, per_sample, need_grad = inputs
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)  # nothing reads the saved gradient's own gradient: no zeros of its size
    ctx.per_sample = per_sample
    ctx.need_grad = need_grad


def _backward(ctx, d_loss, d_grad):
    (grad,) = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError("pseudo_huber_fwd ran without need_grad=True, so it saved no gradient")
    # The kernel already wrote d loss / d pred; backward only scales it by the incoming gradient (which may be an
    # expanded, stride-0 tensor after .sum().backward(): broadcasting reads it correctly).
    if d_loss is None:  # the loss was not used (grads are not materialised: _setup_context)
        return None, None, None, None, None
    if ctx.per_sample:
        d_loss = d_loss.view(-1, *([1] * (grad.dim() - 1)))
    # One elementwise pass in grad's dtype (the product is formed in fp32 and rounded once): (grad * d_loss).to()
    # would write an fp32 copy and read it back, 3x the bytes.
    d_pred = torch.mul(grad, d_loss, out=torch.empty_like(grad))
    d_target = -d_pred if ctx.needs_input_grad[1] else None
    return d_pred, d_target, None, None, None


_pseudo_huber_fwd.register_autograd(_backward, setup_context=_setup_context)


def _tangent(inputs, output, tangents):
    """d' = <grad, pred' - target'> per sample (the chain rule of the per-sample loss; grad = (x - y) / sqrt(||x - y||^2 + c^2)
    is the buffer the kernel wrote), or grad * (pred' - target') per element."""
    pred, _, _, per_sample, _ = inputs
    loss, grad = output
    pred_dot, target_dot = tangents[:2]
    diff_dot = torch.zeros_like(pred) if pred_dot is None else pred_dot
    diff_dot = diff_dot if target_dot is None else diff_dot - target_dot
    prod = grad.to(loss.dtype) * diff_dot.to(loss.dtype)
    return (prod.flatten(1).sum(1) if per_sample else prod), None


_JVP = JvpRule("pseudo_huber_loss", torch.ops.fastcm.pseudo_huber_fwd, _setup_context, _backward, _tangent)


def make_inputs(case: str, device="cpu", dtype=torch.float32, requires_grad: bool = True) -> dict:
    """Inputs for tests and benchmarks: a U-Net preset's image batch and iCT's c = 0.00054 * sqrt(d)."""
    shapes = {"tiny": (4, 1, 8, 8), "digits": (64, 1, 8, 8), "cifar10": (64, 3, 32, 32),
              "imagenet64": (32, 3, 64, 64)}
    shape = shapes[case]
    pred = torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)
    target = torch.randn(shape, device=device, dtype=dtype)
    d = shape[1] * shape[2] * shape[3]
    weight = torch.rand(shape[0], device=device, dtype=dtype) + 0.5
    return dict(pred=pred, target=target, c=0.00054 * d ** 0.5, weight=weight)


make_inputs.cases = ("tiny", "digits", "cifar10", "imagenet64")


# ----------------------------------------------------------------------------------------------------------------
# Fast-ops contract declarations (fastcm/ops/_describe.py): minimum work per call and the compile gate's launches.
# Bytes: read pred and target once, write the loss; the backward writes d pred (and d target when it needs one);
# the tangent reads pred' (and target'), writes the loss' tangent. The forward of a training step computes the
# gradient with the loss (one pass), so fwd+bwd is not fwd plus a separate backward pass.

def min_work(direction: str, pred: Tensor, target: Tensor, c: float = 0.0, weight: Optional[Tensor] = None,
             reduction: str = "mean", per: str = "sample", **_) -> "_describe.Work":
    acc = 8 if pred.dtype == torch.float64 else 4
    # The op's output: one value per sample or per element for reduction="none", else one scalar (a per-element
    # loss that the route writes and then reduces is its own overhead, not part of the minimum).
    loss = acc * ((pred.shape[0] if per == "sample" else pred.numel()) if reduction == "none" else 1)
    inputs = _describe.nbytes(pred, target)
    grads = _describe.nbytes(pred if pred.requires_grad else None, target if target.requires_grad else None)
    fwd = _describe.Work(inputs + loss)
    bwd = _describe.Work(loss + grads)  # read d loss, write the input gradients (pred and target read by fwd)
    return _describe.fwd_bwd(direction, fwd, bwd, _describe.Work(inputs + grads + 2 * loss))


def aot_calls(image_shape) -> list:
    """The loss on the image batch, per sample (iCT) and per element."""
    pred, target = _describe.meta(*image_shape).requires_grad_(), _describe.meta(*image_shape)
    return [dict(pred=pred, target=target, c=0.03, per=per) for per in PERS]


def aot_jobs(call: dict, dtypes, sm_counts=()):
    """The loss alone and the loss with its gradient."""
    from fastcm.kernels import pseudo_huber as kernels
    N, C, H, W = call["pred"].shape
    per_sample = call.get("per", "sample") == "sample"
    for dtype in (d for d in dtypes if d in _describe.GPU_DTYPES):
        def run(dtype=dtype):
            x = _describe.meta(N, C, H, W, dtype=dtype)
            kernels.pseudo_huber_fwd(x, x, call["c"], per_sample, True)
            kernels.pseudo_huber_fwd(x, x, call["c"], per_sample, False)
        yield _describe.Job("pseudo_huber", f"{N}x{C}x{H}x{W} per={'sample' if per_sample else 'element'}", dtype,
                            "pseudo_huber", run)
