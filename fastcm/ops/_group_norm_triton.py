"""The Triton route of :func:`fastcm.ops.group_norm`: its kernels (kernels/group_norm.py) as ``torch.library`` custom
ops with their fake kernels, the autograd formula of the forward, and the forward-mode rule (one launch of the
output-and-tangent kernel, fastcm.ops._jvp.FusedJvpRule) that sCT / MeanFlow's one-pass step uses.
"""
import importlib
from typing import Optional

import torch
from torch import Tensor

from ._jvp import FusedJvpRule

# ----------------------------------------------------------------------------------------------------------------
# Triton path as torch.library custom ops, so torch.compile(fullgraph=True) traces through them and opcheck passes.
# ``chunk`` > 0 forces the split reduction with that many spatial positions per program (tests use it to exercise
# the split path at small sizes); 0 lets the launcher choose.

@torch.library.custom_op("fastcm::group_norm_fwd", mutates_args=())
def _group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    scale: Optional[Tensor], shift: Optional[Tensor], silu: bool,
                    chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    from fastcm.kernels.group_norm import group_norm_fwd

    return group_norm_fwd(x, num_groups, weight, bias, eps, scale, shift, silu, chunk)


@_group_norm_fwd.register_fake
def _(x, num_groups, weight, bias, eps, scale, shift, silu, chunk):
    from fastcm.kernels.group_norm import empty_out

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = x.new_empty((x.shape[0], num_groups), dtype=acc)
    return empty_out(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fastcm::group_norm_bwd", mutates_args=())
def _group_norm_bwd(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor], silu: bool,
                    chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    from fastcm.kernels.group_norm import group_norm_bwd

    return group_norm_bwd(dy, x, mean, rstd, weight, bias, scale, shift, silu, chunk)


@_group_norm_bwd.register_fake
def _(dy, x, mean, rstd, weight, bias, scale, shift, silu, chunk):
    from fastcm.kernels.group_norm import empty_out

    sums = x.new_empty(x.shape[:2], dtype=mean.dtype)
    return empty_out(x), sums, torch.empty_like(sums)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, scale, shift, silu, chunk = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.silu, ctx.chunk = silu, chunk


def _backward(ctx, dy, d_mean, d_rstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    # .sum().backward() hands a stride-0 gradient: give the kernels a dense one in y's layout (vector loads). Any
    # other layout is read in place.
    if 0 in dy.stride():
        from fastcm.kernels.group_norm import empty_out

        dy = empty_out(x).copy_(dy)
    dx, sum_du, sum_du_xhat = torch.ops.fastcm.group_norm_bwd(dy, x, mean, rstd, weight, bias, scale, shift,
                                                             ctx.silu, ctx.chunk)
    # Parameter gradients from the per-(n, c) sums  P1 = sum_s du,  P2 = sum_s du * xhat  (u the pre-activation;
    # derivation in kernels/group_norm.py). Reducing over n here, not with atomics, keeps them deterministic.
    mod = None if scale is None else 1 + scale.to(sum_du.dtype)          # (1 + scale), (N, C)
    d_weight = d_bias = d_scale = d_shift = None
    if weight is not None and ctx.needs_input_grad[2]:
        d_weight = (sum_du_xhat if mod is None else sum_du_xhat * mod).sum(0).to(weight.dtype)
    if bias is not None and ctx.needs_input_grad[3]:
        d_bias = (sum_du if mod is None else sum_du * mod).sum(0).to(bias.dtype)
    if scale is not None and ctx.needs_input_grad[5]:
        z_sum = sum_du_xhat if weight is None else sum_du_xhat * weight.to(sum_du.dtype)  # sum_s du * z
        d_scale = (z_sum if bias is None else z_sum + sum_du * bias.to(sum_du.dtype)).to(scale.dtype)
    if shift is not None and ctx.needs_input_grad[6]:
        d_shift = sum_du.to(shift.dtype)
    d_x = dx if ctx.needs_input_grad[0] else None
    return d_x, None, d_weight, d_bias, None, d_scale, d_shift, None, None


_group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastcm::group_norm_jvp", mutates_args=())
def _group_norm_jvp(x: Tensor, x_dot: Optional[Tensor], num_groups: int, weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float, scale: Optional[Tensor], shift: Optional[Tensor],
                    weight_dot: Optional[Tensor], bias_dot: Optional[Tensor], scale_dot: Optional[Tensor],
                    shift_dot: Optional[Tensor], silu: bool, write_y: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fastcm.kernels.group_norm import group_norm_jvp

    return group_norm_jvp(x, x_dot, num_groups, weight, bias, eps, scale, shift, weight_dot, bias_dot, scale_dot,
                          shift_dot, silu, write_y)


@_group_norm_jvp.register_fake
def _(x, x_dot, num_groups, weight, bias, eps, scale, shift, weight_dot, bias_dot, scale_dot, shift_dot, silu,
      write_y):
    from fastcm.kernels.group_norm import empty_out

    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (empty_out(x) if write_y else x.new_empty(0)), empty_out(x), stats, torch.empty_like(stats)


def _fused(args, tangents):
    """(y, mean, rstd) and y's tangent: ONE launch of the output-and-tangent kernel when a group fits its tile
    (its mean / rstd feed the backward), else the forward kernel and the same tangent formula in torch."""
    from fastcm.kernels.group_norm import jvp_fits

    x, num_groups, weight, bias, eps, scale, shift, silu, chunk = args
    x_dot, _, weight_dot, bias_dot, _, scale_dot, shift_dot, _, _ = tangents
    jvp_args = (x, x_dot, num_groups, weight, bias, eps, scale, shift, weight_dot, bias_dot, scale_dot, shift_dot,
                silu)
    if jvp_fits(x, num_groups) and chunk == 0:
        y, y_dot, mean, rstd = torch.ops.fastcm.group_norm_jvp(*jvp_args, True)
        return (y, mean, rstd), y_dot
    reference = importlib.import_module("fastcm.ops.group_norm")  # the op's module, which imports this one

    return torch.ops.fastcm.group_norm_fwd(*args), reference.group_norm_tangent_ref(*jvp_args)


JVP = FusedJvpRule("group_norm", _fused, _setup_context, _backward)
