"""GroupNorm with per-sample modulation and SiLU, the normalisation of every U-Net residual block:

    y = act((GN(x) * weight + bias) * (1 + scale) + shift)      GN: Wu & He 2018; scale/shift: FiLM / ADM's
                                                                 "scale-shift norm" (Dhariwal & Nichol 2021)

with scale, shift of shape (N, C) projected from the noise-level (and class) embedding, broadcast over space, and
act in {None, "silu"}. Eager PyTorch runs this as 4-5 kernels; the Triton path folds every per-(n, c) factor into
one multiply-add after the group statistics, so scale, shift and SiLU cost no extra pass over memory.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _describe
from ._group_norm_triton import JVP as _JVP
from ._jvp import has_tangent, split_dual
from fastcm._checks import check_real

from ._utils import check_choice, check_int, check_same_device, check_tensor, resolve_impl

ACTS = (None, "silu")


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
               act: Optional[str] = None, impl: str = "auto") -> Tensor:
    """Fused ``act((group_norm(x) * weight + bias) * (1 + scale) + shift)``.

    Args:
        x: (N, C, *spatial) floating tensor, zero or more spatial dims. Read in place whenever its spatial dims
            merge into one strided dim (contiguous, channels_last, a transposed (B, C, L) view, channel or batch
            slices); otherwise copied once. Statistics are computed in fp32 (fp64 for fp64 inputs); the output has
            x's dtype, and x's strides when x is dense (else contiguous).
        num_groups: G, dividing C.
        weight, bias: optional (C,) affine parameters (as in ``nn.GroupNorm``).
        eps: positive constant added to the group variance.
        scale, shift: optional (N, C) per-sample modulation; the output is multiplied by ``1 + scale``.
        act: None or "silu".
        impl: "auto" (Triton on CUDA, reference elsewhere), "triton" or "torch".
    Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) works on every impl, with tangents on x and on the
    parameters: the Triton route computes y' with a one-pass kernel (kernels/group_norm.py); under torch.compile
    it raises instead (pytorch#192985), the reference route compiles.
    """
    _validate(x, num_groups, weight, bias, eps, scale, shift, act)
    if resolve_impl(impl, x) == "torch":
        return split_dual(group_norm_ref, x, num_groups, weight, bias, eps, scale, shift, act, closed_form=_ref_dual)
    args = (x, int(num_groups), weight, bias, float(eps), scale, shift, act == "silu", 0)
    if has_tangent(x, weight, bias, scale, shift):  # torch.func.jvp / forward_ad: the op's tangent rule
        return _JVP.apply(*args)
    y, _, _ = torch.ops.fastcm.group_norm_fwd(*args)
    return y


def group_norm_ref(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                   act: Optional[str] = None) -> Tensor:
    """Readable PyTorch reference of :func:`group_norm` (computes in fp32, or fp64 for fp64 inputs)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    per_nc = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)  # (N, C) -> (N, C, 1, ..., 1): broadcast over space
    per_c = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if has_tangent(x, weight, bias, scale, shift):
        y = _group_normalize(x.to(acc), num_groups, eps)
        y = y if weight is None else y * weight.to(acc).view(per_c)
        return _modulate(y if bias is None else y + bias.to(acc).view(per_c), scale, shift, act, per_nc, x.dtype)
    y, _, _ = _native_group_norm(x.to(acc), num_groups, _cast(weight, acc), _cast(bias, acc), eps)
    return _modulate(y, scale, shift, act, per_nc, x.dtype)


def _native_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """(GN(x) * weight + bias, mean, rstd), mean and rstd of shape (N, G), by torch's fused kernel and backward.

    torch.group_norm is this minus F.group_norm's "more than 1 value per channel" check, which rejects legitimate
    one-element groups at batch 1 (e.g. x of shape (1, C, 1, 1) with G = C). A bias without a weight is added
    outside: aten's group-norm backward fails on it ("tensor does not have a device", torch 2.13 CPU)."""
    N, C = x.shape[:2]
    layout = _memory_format(x)  # what torch.group_norm hands the kernel
    # torch 2.13's CPU group-norm backward segfaults on a channels_last input when only weight/bias want a
    # gradient (a frozen input): that case runs in the contiguous layout and returns x's layout.
    frozen = layout != torch.contiguous_format and torch.is_grad_enabled() and not x.requires_grad and any(
        p is not None and p.requires_grad for p in (weight, bias))
    x = x.contiguous(memory_format=torch.contiguous_format if frozen else layout)
    y, mean, rstd = torch.native_group_norm(x, weight, bias if weight is not None else None, N, C,
                                            math.prod(x.shape[2:]), num_groups, eps)
    y = y.contiguous(memory_format=layout) if frozen else y
    if weight is None and bias is not None:
        y = y + bias.view((1, C) + (1,) * (x.dim() - 2))
    return y, mean, rstd


def _memory_format(x: Tensor) -> torch.memory_format:
    """aten's Tensor.suggest_memory_format, which native_group_norm checks its input against.

    That is stricter than x.is_contiguous(memory_format=channels_last): aten walks the dims from fastest (C, W, H,
    then N) and asks every stride to be at least the span of the dims before it, the batch one included, and falls
    back to contiguous in ambiguous cases. A (1, C, H, W) slice of a channels_last batch has a batch stride below
    that span: is_contiguous says channels_last, aten says contiguous and rejects it unless it is copied."""
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if last is None or x.stride(1) == 0:
        return torch.contiguous_format
    span = 0
    for d in (1, *range(x.dim() - 1, 1, -1), 0):  # C, then space from the last dim, then N
        size, stride = x.shape[d], x.stride(d)
        if size == 0 or stride < span or (d == 0 and span == x.stride(1)):
            return torch.contiguous_format
        span = stride * size if size > 1 else stride
    return last


def _ref_dual(primals, tangents):
    """The reference route's (output with its graph, tangent without one) in one pass (fastcm.ops._jvp.split_dual):
    the group statistics and the pre-activation of the trainable pass feed the closed-form tangent."""
    x, num_groups, weight, bias, eps, scale, shift, act = primals
    x_dot, _, weight_dot, bias_dot, _, scale_dot, shift_dot, _ = tangents
    acc = torch.promote_types(x.dtype, torch.float32)
    per_nc = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    y, mean, rstd = _native_group_norm(x.to(acc), num_groups, _cast(weight, acc), _cast(bias, acc), eps)
    pre = _pre_activation(y, scale, shift, per_nc)
    out = _activate(pre, act, x.dtype)
    with torch.no_grad():
        tangent = group_norm_tangent_ref(x, x_dot, num_groups, weight, bias, eps, scale, shift, weight_dot,
                                         bias_dot, scale_dot, shift_dot, act == "silu",
                                         stats=(mean.detach(), rstd.detach(), pre.detach()))
    return out, tangent


def _modulate(y: Tensor, scale, shift, act, per_nc, dtype) -> Tensor:
    """act(y * (1 + scale) + shift), cast to ``dtype``."""
    return _activate(_pre_activation(y, scale, shift, per_nc), act, dtype)


def _activate(pre: Tensor, act, dtype) -> Tensor:
    """act(pre) cast to ``dtype``."""
    return (F.silu(pre) if act == "silu" else pre).to(dtype)


def _pre_activation(y: Tensor, scale, shift, per_nc) -> Tensor:
    """y * (1 + scale) + shift (absent terms skipped)."""
    if scale is not None:
        y = y * (1 + scale.to(y.dtype).view(per_nc))
    if shift is not None:
        y = y + shift.to(y.dtype).view(per_nc)
    return y


def _group_normalize(x: Tensor, num_groups: int, eps: float) -> Tensor:
    """(x - mean_g) / sqrt(var_g + eps) written with mean and var: torch's group_norm has no working forward AD on
    channels_last inputs, and fails in compiled torch.func.jvp; this form has both."""
    xg = x.reshape(x.shape[0], num_groups, -1)
    d = xg - xg.mean(-1, keepdim=True)
    return (d * torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _validate(x, num_groups, weight, bias, eps, scale, shift, act) -> None:
    check_tensor("x", x, min_ndim=2)
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    N, C = x.shape[:2]
    check_int("num_groups", num_groups)
    if C % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels C={C} of x")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, shape=(C,))
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(name, t, shape=(N, C))
    _check_eps(eps)
    check_choice("act", act, ACTS)
    check_same_device(x=x, weight=weight, bias=bias, scale=scale, shift=shift)


def _check_eps(eps) -> None:
    check_real("eps", eps, positive=True)


class GroupNorm(nn.Module):
    """``nn.GroupNorm`` with optional per-sample scale/shift and fused SiLU; loads an ``nn.GroupNorm`` state_dict.

    ``forward(x, scale=None, shift=None)`` computes ``act((GN(x) * weight + bias) * (1 + scale) + shift)``. The
    attribute ``impl`` ("auto", "triton", "torch") picks the backend on every call.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        check_int("num_channels", num_channels)
        check_int("num_groups", num_groups)
        if num_channels % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        _check_eps(eps)
        check_choice("act", act, ACTS)
        self.num_groups, self.num_channels, self.eps, self.affine, self.act = num_groups, num_channels, eps, affine, act
        self.impl = "auto"
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                impl: Optional[str] = None) -> Tensor:
        """``impl`` (None: the module's own ``self.impl``) is how an owning model passes its backend."""
        if isinstance(x, Tensor) and (x.dim() < 2 or x.shape[1] != self.num_channels):
            raise ValueError(f"x must have shape (N, {self.num_channels}, ...), got {tuple(x.shape)}")
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, self.act,
                          self.impl if impl is None else impl)

    def extra_repr(self) -> str:
        act = f", act={self.act!r}" if self.act else ""
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}{act}"


def group_norm_tangent_ref(x, x_dot, num_groups, weight, bias, eps, scale, shift, weight_dot, bias_dot, scale_dot,
                           shift_dot, silu, stats=None) -> Tensor:
    """y' of y = act((GN(x) w + b) (1 + s) + t) in torch, the chain rule through mean and rstd (any argument's tangent may
    be None: zero). Per group: mu' = mean(x'), kappa = mean(xhat x'), xhat' = rstd (x' - mu' - xhat kappa).
    ``stats`` = (mean, rstd, pre-activation) of a pass that already computed them (mean, rstd of shape (N, G), in
    the compute dtype); None: computed here."""
    acc = torch.promote_types(x.dtype, torch.float32)
    N, C = x.shape[:2]
    per_c, per_nc = (1, C) + (1,) * (x.dim() - 2), (N, C) + (1,) * (x.dim() - 2)
    xhat, rstd = _xhat(x.to(acc), num_groups, eps, None if stats is None else stats[:2])
    if x_dot is not None:
        xhat_dot = _xhat_tangent(xhat, rstd, x_dot.to(acc).reshape(xhat.shape))
    else:
        xhat_dot = torch.zeros_like(xhat)
    xhat, xhat_dot = xhat.reshape(x.shape), xhat_dot.reshape(x.shape)

    def c(t, shape):  # a parameter (or its tangent) broadcast over x, or 0 / 1 when absent
        return None if t is None else t.to(acc).view(shape)

    w, b, w_dot, b_dot = c(weight, per_c), c(bias, per_c), c(weight_dot, per_c), c(bias_dot, per_c)
    h_dot = xhat_dot if w is None else xhat_dot.mul_(w)
    h_dot = h_dot if w_dot is None else h_dot.addcmul_(xhat, w_dot)
    h_dot = h_dot if b_dot is None else h_dot.add_(b_dot)
    a_dot = h_dot if scale is None else h_dot.mul_(1 + c(scale, per_nc))
    if scale_dot is not None or (silu and stats is None):
        h = xhat if w is None else xhat * w
        h = h if b is None else h + b
        if scale_dot is not None:
            a_dot = a_dot.addcmul_(h, c(scale_dot, per_nc))
    a_dot = a_dot if shift_dot is None else a_dot.add_(c(shift_dot, per_nc))
    if silu:  # silu'(a) = sig(a) (1 + a (1 - sig(a)))
        a = _pre_activation(h, c(scale, per_nc), c(shift, per_nc), per_nc) if stats is None else stats[2]
        sig = torch.sigmoid(a)
        a_dot = a_dot.mul_(torch.addcmul(torch.ones_like(a), a, 1 - sig).mul_(sig))
    return a_dot.to(x.dtype)


def _xhat(x: Tensor, num_groups: int, eps: float, stats=None):
    """(x - mean) * rstd as (N, G, group size), and rstd (N, G, 1); from ``stats`` = (mean, rstd) when given."""
    xg = x.reshape(x.shape[0], num_groups, -1)
    if stats is None:
        d = xg - xg.mean(-1, keepdim=True)
        rstd = torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)
        return d.mul_(rstd), rstd
    mean, rstd = (s.to(x.dtype).view(x.shape[0], num_groups, 1) for s in stats)
    return (xg - mean).mul_(rstd), rstd


def _xhat_tangent(xhat: Tensor, rstd: Tensor, xg_dot: Tensor) -> Tensor:
    """xhat' = rstd (x' - mean(x') - xhat mean(xhat x')) per group (all (N, G, group size) but rstd)."""
    kappa = torch.linalg.vecdot(xhat, xg_dot).unsqueeze(-1).div_(xhat.shape[-1])
    return (xg_dot - xg_dot.mean(-1, keepdim=True)).addcmul_(xhat, kappa, value=-1).mul_(rstd)




# ----------------------------------------------------------------------------------------------------------------
# Registry inputs: the GroupNorm(32) + modulation + SiLU of a residual block at the U-Net presets' feature maps.

_CASES = {
    "tiny": (2, 64, 4, 4),
    "digits": (64, 64, 8, 8),
    "cifar10": (64, 128, 32, 32),
    "cifar10-16x16": (64, 256, 16, 16),
    "imagenet64": (32, 192, 64, 64),
    "batch1": (1, 256, 64, 64),  # one-image sampling: 32 groups only, the split reduction's case
}


def make_inputs(case: str, device="cpu", dtype=torch.float32, requires_grad: bool = True) -> dict:
    """Inputs for tests and benchmarks: x, GN(32) affine parameters, embedding-projected scale/shift, SiLU."""
    N, C, H, W = _CASES[case]

    def rand(*shape, std=1.0, offset=0.0):
        t = torch.randn(shape, device=device, dtype=torch.float32) * std + offset
        return t.to(dtype).requires_grad_(requires_grad)

    return dict(x=rand(N, C, H, W), num_groups=32, weight=rand(C, std=0.1, offset=1.0), bias=rand(C, std=0.1),
                eps=1e-5, scale=rand(N, C, std=0.3), shift=rand(N, C, std=0.3), act="silu")


make_inputs.cases = tuple(_CASES)


# ----------------------------------------------------------------------------------------------------------------
# Fast-ops contract declarations (fastcm/ops/_describe.py): minimum work per call and the compile gate's launches.
# Bytes: forward reads x and the parameters, writes y (and the (N, G) statistics the backward reads); backward
# reads dy and x, writes dx and the parameter gradients: 5 passes over x for fwd+bwd; the tangent in one pass reads
# x and x', writes y and y'. No matmul FLOPs.

def min_work(direction: str, x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
             bias: Optional[Tensor] = None, eps: float = 1e-5, scale: Optional[Tensor] = None,
             shift: Optional[Tensor] = None, **_) -> "_describe.Work":
    params = _describe.nbytes(weight, bias, scale, shift)
    stats = 2 * x.shape[0] * num_groups * (8 if x.dtype == torch.float64 else 4)
    xb = _describe.nbytes(x)
    fwd, bwd = _describe.Work(2 * xb + params), _describe.Work(2 * stats + 3 * xb + 2 * params)
    return _describe.fwd_bwd(direction, fwd, bwd, _describe.Work(4 * xb + 2 * params))


def aot_jobs(call: dict, dtypes, sm_counts):
    """Forward, backward and forward-with-tangent, NCHW and channels_last, with the plan (fused / split) a GPU of
    each SM count picks."""
    from fastcm.kernels import group_norm as kernels
    (N, C, H, W), G = call["x"].shape, call["num_groups"]
    has_mod, silu = call.get("scale") is not None, call.get("act") == "silu"
    for dtype in (d for d in dtypes if d in _describe.GPU_DTYPES):
        for layout in ("nchw", "nhwc"):
            for sms in sm_counts:
                def run(dtype=dtype, layout=layout, sms=sms):
                    x = _describe.meta(N, C, H, W, dtype=dtype, channels_last=layout == "nhwc")
                    w, b = _describe.meta(C, dtype=dtype), _describe.meta(C, dtype=dtype)
                    mod = _describe.meta(N, C, dtype=dtype) if has_mod else None
                    with _describe.target_sms(sms):
                        y, mean, rstd = kernels.group_norm_fwd(x, G, w, b, 1e-5, mod, mod, silu)
                        kernels.group_norm_bwd(torch.empty_like(y), x, mean, rstd, w, b, mod, mod, silu)
                        if kernels.jvp_fits(x, G):  # the one-pass tangent (sCT / MeanFlow's JVP), all tangents
                            kernels.group_norm_jvp(x, torch.empty_like(x), G, w, b, 1e-5, mod, mod, w, b, mod, mod,
                                                   silu, True)
                yield _describe.Job("group_norm", f"{layout} {N}x{C}x{H}x{W} G={G} mod={int(has_mod)} "
                                    f"silu={int(silu)} sms={sms}", dtype, "group_norm", run)
