"""The Triton route of :mod:`fastcm.ops.attention`: FlashAttention-2 (Dao 2023) as ``torch.library`` custom ops.

The public op, its reference and its validation live in ``attention.py``; this module registers the custom ops
(forward, backward, forward-with-tangent, for separate q, k, v and for a packed qkv map), their fake kernels and
autograd formulas, the forward-mode rules, and the strided views of a packed qkv map the kernels read through.
"""
from typing import Optional

import torch
from torch import Tensor

from ._jvp import FusedJvpRule, has_tangent

# Triton path as torch.library custom ops (opaque to Inductor, traced by torch.compile(fullgraph=True)).
# Forward returns (out, lse); lse is the row log-sum-exp in base 2 (fp32, fp64 for fp64 inputs), saved for backward.

def _lse_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastcm::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float,
                   deterministic: bool = False) -> tuple[Tensor, Tensor]:
    from fastcm.kernels.attention import attention_fwd

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = attention_fwd(q, k, v, out, scale)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale, deterministic=False):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.custom_op("fastcm::attention_bwd", mutates_args=())
def _attention_bwd(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   scale: float, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    from fastcm.kernels.attention import attention_bwd

    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    attention_bwd(d_out, q, k, v, out, lse, dq, dk, dv, scale, deterministic)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(d_out, q, k, v, out, lse, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _deterministic_setup(ctx, inputs, n_args: int) -> None:
    """The backward's schedule: the call's ``deterministic`` (the custom op's and the forward-AD rule's last
    input) or torch's switch, read when the backward runs (as torch's own ops read it)."""
    ctx.n_inputs = len(inputs)
    ctx.deterministic = bool(inputs[n_args]) if len(inputs) > n_args else False


def _deterministic(ctx) -> bool:
    return ctx.deterministic or torch.are_deterministic_algorithms_enabled()


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs[:4]
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.scale = scale
    _deterministic_setup(ctx, inputs, 4)


def _attention_backward(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # .sum().backward() hands an expanded (stride-0) gradient: make it dense before the kernels read it.
    dq, dk, dv = torch.ops.fastcm.attention_bwd(d_out.contiguous(), q, k, v, out, lse, ctx.scale,
                                                _deterministic(ctx))
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("fastcm::qkv_attention_fwd", mutates_args=())
def _qkv_attention_fwd(qkv: Tensor, num_heads: int, scale: float,
                       deterministic: bool = False) -> tuple[Tensor, Tensor]:
    from fastcm.kernels.attention import attention_fwd

    N, C3, Hs, Ws = qkv.shape
    out = torch.empty((N, C3 // 3, Hs, Ws), dtype=qkv.dtype, device=qkv.device)
    q, k, v = qkv_views(qkv, num_heads)
    lse = attention_fwd(q, k, v, out_view(out, num_heads), scale)
    return out, lse


@_qkv_attention_fwd.register_fake
def _(qkv, num_heads, scale, deterministic=False):
    N, C3, Hs, Ws = qkv.shape
    out = qkv.new_empty((N, C3 // 3, Hs, Ws))
    return out, qkv.new_empty((N, num_heads, Hs * Ws), dtype=_lse_dtype(qkv))


@torch.library.custom_op("fastcm::qkv_attention_bwd", mutates_args=())
def _qkv_attention_bwd(d_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                       scale: float, deterministic: bool) -> Tensor:
    from fastcm.kernels.attention import attention_bwd

    d_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = qkv_views(qkv, num_heads)
    dq, dk, dv = qkv_views(d_qkv, num_heads)
    attention_bwd(out_view(d_out, num_heads), q, k, v, out_view(out, num_heads), lse, dq, dk, dv, scale,
                  deterministic)
    return d_qkv


@_qkv_attention_bwd.register_fake
def _(d_out, qkv, out, lse, num_heads, scale, deterministic):
    return qkv.new_empty(qkv.shape)


def _qkv_setup(ctx, inputs, output):
    qkv, num_heads, scale = inputs[:3]
    ctx.save_for_backward(qkv, output[0], output[1])
    ctx.num_heads, ctx.scale = num_heads, scale
    _deterministic_setup(ctx, inputs, 3)


def _qkv_backward(ctx, d_out, d_lse):
    qkv, out, lse = ctx.saved_tensors
    d_qkv = torch.ops.fastcm.qkv_attention_bwd(d_out.contiguous(), qkv, out, lse, ctx.num_heads, ctx.scale,
                                               _deterministic(ctx))
    return (d_qkv,) + (None,) * (ctx.n_inputs - 1)


_qkv_attention_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup)


# ----------------------------------------------------------------------------------------------------------------
# Forward-mode AD through fastcm.ops._jvp: a custom_op has no forward-AD hook (torch.func.jvp over one silently
# returns a zero tangent), so a call whose inputs carry a tangent goes through a FusedJvpRule: ONE launch of the
# forward-with-tangent kernel (kernels.attention.attention_fwd_jvp, sCM App. F) gives the output, its tangent and the
# log-sum-exp, and the output's backward is the custom op's own on (out, lse). No plain forward kernel runs first,
# so sCT / MeanFlow's one-pass step (autograd on) and torch.func.jvp (no graph) both cost one launch per layer.
# Calls without a tangent, and so torch.compile of a forward/backward, see the plain custom ops; a tangent under
# torch.compile raises (pytorch#192985 would drop the rule and return a wrong tangent).

@torch.library.custom_op("fastcm::attention_fwd_jvp", mutates_args=())
def _attention_fwd_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from fastcm.kernels.attention import attention_fwd_jvp

    out, tout = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(2))
    lse = attention_fwd_jvp(q, k, v, tq, tk, tv, out, tout, scale)
    return out, tout, lse


@_attention_fwd_jvp.register_fake
def _(q, k, v, tq, tk, tv, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.custom_op("fastcm::qkv_attention_fwd_jvp", mutates_args=())
def _qkv_attention_fwd_jvp(qkv: Tensor, t_qkv: Tensor, num_heads: int,
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from fastcm.kernels.attention import attention_fwd_jvp

    N, C3, Hs, Ws = qkv.shape
    out, tout = (torch.empty((N, C3 // 3, Hs, Ws), dtype=qkv.dtype, device=qkv.device) for _ in range(2))
    lse = attention_fwd_jvp(*qkv_views(qkv, num_heads), *qkv_views(t_qkv, num_heads), out_view(out, num_heads),
                            out_view(tout, num_heads), scale)
    return out, tout, lse


@_qkv_attention_fwd_jvp.register_fake
def _(qkv, t_qkv, num_heads, scale):
    N, C3, Hs, Ws = qkv.shape
    out = qkv.new_empty((N, C3 // 3, Hs, Ws))
    return out, torch.empty_like(out), qkv.new_empty((N, num_heads, Hs * Ws), dtype=_lse_dtype(qkv))


def _tangent(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A missing tangent (input not being differentiated) is zero."""
    return torch.zeros_like(like) if t is None else t


def _attention_fused(args, tangents):
    (q, k, v, scale, *_), (tq, tk, tv, *_) = args, tangents  # the rest: the backward's schedule (no tangent)
    out, t_out, lse = torch.ops.fastcm.attention_fwd_jvp(q, k, v, _tangent(tq, q), _tangent(tk, k),
                                                         _tangent(tv, v), scale)
    return (out, lse), t_out


def _qkv_attention_fused(args, tangents):
    (qkv, num_heads, scale, *_), t_qkv = args, tangents[0]
    out, t_out, lse = torch.ops.fastcm.qkv_attention_fwd_jvp(qkv, _tangent(t_qkv, qkv), num_heads, scale)
    return (out, lse), t_out


_ATTENTION_JVP = FusedJvpRule("attention", _attention_fused, _attention_setup, _attention_backward)
_QKV_ATTENTION_JVP = FusedJvpRule("qkv_attention", _qkv_attention_fused, _qkv_setup, _qkv_backward)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, deterministic: bool = False) -> Tensor:
    if has_tangent(q, k, v):
        return _ATTENTION_JVP.apply(q, k, v, scale, deterministic)
    return torch.ops.fastcm.attention_fwd(q, k, v, scale, deterministic)[0]


def triton_qkv_attention(qkv: Tensor, num_heads: int, scale: float, deterministic: bool = False) -> Tensor:
    if has_tangent(qkv):
        return _QKV_ATTENTION_JVP.apply(qkv, num_heads, scale, deterministic)
    return torch.ops.fastcm.qkv_attention_fwd(qkv, num_heads, scale, deterministic)[0]


def qkv_views(qkv: Tensor, num_heads: int):
    """(B, H, L, D)-indexed strided views of q, k, v inside a packed (N, 3*C, H, W) tensor (no copy unless the
    pixels cannot be flattened, e.g. a cropped view)."""
    N, C3, Hs, Ws = qkv.shape
    packed = qkv.reshape(N, 3, num_heads, C3 // (3 * num_heads), Hs * Ws)  # (N, 3, heads, D, L)
    return packed.transpose(-1, -2).unbind(1)


def out_view(out: Tensor, num_heads: int) -> Tensor:
    """(N, heads, L, D) strided view of an (N, C, H, W) tensor, channel = head * D + d."""
    N, C, Hs, Ws = out.shape
    return out.reshape(N, num_heads, C // num_heads, Hs * Ws).transpose(-1, -2)
