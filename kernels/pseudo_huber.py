"""Pseudo-Huber loss, fused with its gradient (iCT, Song & Dhariwal 2023, Sec. 3.3).

    d(x, y) = sqrt(||x - y||^2 + c^2) - c          per sample (iCT) or per element (LCM scripts)

One program per sample computes the loss and, when a gradient is needed, writes d loss / d pred into a buffer in the
same program, so backward is a single multiply by grad_output (the target's gradient is its negative). A sample that
fits one block (every preset: up to MAX_FUSED_SIZE elements) is read once and kept in registers; a longer one is
streamed twice (the norm, then the gradient).

Stable for any positive c the compute dtype holds as a normal number, and any finite differences. With
n = ||x - y|| computed scaled by t = max_j |x_j - y_j| (n = t ||(x - y) / t||: no square overflows or underflows
to nothing) and h = hypot(n, c) = m sqrt(1 + (n' / m)^2) (m, n' the larger and smaller of n and c):

    d = n * (n / (h + c)),          d d / d x = (x - y) / h,

which equals sqrt(n^2 + c^2) - c without its cancellation when n << c, without overflow of c^2 at c = 2e19 in fp32
or 1e300 in fp64, and without 0 / 0 at x = y when c^2 is below the smallest float (c = 1e-30 in fp32). The launcher
computes in fp64 when c is no normal fp32 number (c > 3.4e38 or c < 1.2e-38 with fp32 inputs).
"""
import math

import torch
import triton
import triton.language as tl

from ._utils import accumulate_dtype, block_size, compute_dtype, num_warps, pin_launch_options


@triton.jit
def _row_diff(pred_row, target_row, offs, mask, stride_pred_d, stride_target_d, ACC: tl.constexpr):
    """pred - target at positions offs of one row, in the compute dtype (0 on masked lanes)."""
    pred = tl.load(pred_row + offs * stride_pred_d, mask=mask, other=0).to(ACC)
    return pred - tl.load(target_row + offs * stride_target_d, mask=mask, other=0).to(ACC)


@triton.jit
def _loss_root(n, c):
    """(loss, h): n^2 / (h + c) written as n * (n / (h + c)), and h = hypot(n, c) without squaring n or c."""
    big = tl.maximum(n, c)  # > 0: c > 0
    small = tl.minimum(n, c) / big
    h = big * tl.sqrt(1.0 + small * small)
    return n * (n / (h + c)), h


@triton.jit
def _guarded_div(a, b):
    """a / b, and 0 where b == 0 (then a == 0 too: b is a running maximum of |a|)."""
    return tl.where(b > 0, a / tl.where(b > 0, b, 1.0), 0.0)


@triton.jit
def _pseudo_huber_fwd_sample_kernel(
    pred_ptr,          # (B, D) rows, any strides
    target_ptr,        # (B, D) rows, any strides
    c_ptr,             # (1,) c in the compute dtype
    loss_ptr,          # (B,) per-sample loss, fp32 (fp64 for fp64 inputs)
    grad_ptr,          # (B, D) contiguous d loss_b / d pred_b, pred's dtype (unused unless HAS_GRAD)
    D,                 # elements per sample
    stride_pred, stride_pred_d,      # row and inner stride of pred (the inner one is specialised when it is 1)
    stride_target, stride_target_d,  # row and inner stride of target
    HAS_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # D <= BLOCK: pred and target read once, the differences kept in registers
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32 or tl.float64
):
    row = tl.program_id(0).to(tl.int64)
    pred_row = pred_ptr + row * stride_pred
    target_row = target_ptr + row * stride_target
    c = tl.load(c_ptr).to(ACC)
    offs = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = offs < D
        diff = _row_diff(pred_row, target_row, offs, mask, stride_pred_d, stride_target_d, ACC)
        t = tl.max(tl.abs(diff), axis=0)
        r = _guarded_div(diff, t)
        loss, h = _loss_root(t * tl.sqrt(tl.sum(r * r, axis=0)), c)
        tl.store(loss_ptr + row, loss)
        if HAS_GRAD:
            tl.store(grad_ptr + row * D + offs, (diff / h).to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        # Per-lane running maximum and scaled sum of squares (the scaling of LAPACK's nrm2), combined at the end.
        lane_t = tl.zeros([BLOCK], dtype=ACC)
        lane_ssq = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, D, BLOCK):
            mask = start + offs < D
            a = tl.abs(_row_diff(pred_row, target_row, start + offs, mask, stride_pred_d, stride_target_d, ACC))
            new_t = tl.maximum(lane_t, a)
            ratio = _guarded_div(lane_t, new_t)
            an = _guarded_div(a, new_t)
            lane_ssq = lane_ssq * ratio * ratio + an * an
            lane_t = new_t
        t = tl.max(lane_t, axis=0)
        ratio = _guarded_div(lane_t, t)
        loss, h = _loss_root(t * tl.sqrt(tl.sum(lane_ssq * ratio * ratio, axis=0)), c)
        tl.store(loss_ptr + row, loss)
        if HAS_GRAD:
            grad_row = grad_ptr + row * D
            for start in range(0, D, BLOCK):
                mask = start + offs < D
                diff = _row_diff(pred_row, target_row, start + offs, mask, stride_pred_d, stride_target_d, ACC)
                tl.store(grad_row + start + offs, (diff / h).to(grad_ptr.dtype.element_ty), mask=mask)


# Elementwise: n = |x - y| per element, the same loss and gradient.
@triton.jit
def _pseudo_huber_fwd_element_kernel(
    pred_ptr,          # (numel,) contiguous
    target_ptr,        # (numel,) contiguous
    c_ptr,             # (1,) c in the compute dtype
    loss_ptr,          # (numel,) loss, fp32 (fp64 for fp64 inputs)
    grad_ptr,          # (numel,) gradient, pred's dtype (unused unless HAS_GRAD)
    numel,
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    diff = tl.load(pred_ptr + offs, mask=mask, other=0).to(ACC) - tl.load(target_ptr + offs, mask=mask,
                                                                          other=0).to(ACC)
    c = tl.load(c_ptr).to(ACC)
    loss, h = _loss_root(tl.abs(diff), c)
    tl.store(loss_ptr + offs, loss, mask=mask)
    if HAS_GRAD:
        tl.store(grad_ptr + offs, (diff / h).to(grad_ptr.dtype.element_ty), mask=mask)


def c_in_fp64(pred: torch.Tensor, c: float) -> bool:
    """Whether a loss with fp32 compute must run in fp64 because c is no normal fp32 number (the module docstring's
    formulas need c > 0 and finite in the compute dtype; fastcm.ops.pseudo_huber applies the same rule)."""
    info = torch.finfo(torch.float32)
    return pred.dtype != torch.float64 and not (info.tiny <= c <= info.max)


def pseudo_huber_fwd(pred: torch.Tensor, target: torch.Tensor, c: float, per_sample: bool, need_grad: bool):
    """Launch the fused kernel. Returns (loss, grad): loss is (B,) per sample or pred.shape per element, in fp32
    (fp64 for fp64 inputs); grad is d loss / d pred in pred's dtype and shape, or an empty tensor."""
    acc = accumulate_dtype(pred)
    wide = c_in_fp64(pred, c)
    c_t = torch.full((1,), c, dtype=torch.float64 if wide else acc, device=pred.device)
    compute = tl.float64 if wide else compute_dtype(pred)
    grad = torch.empty(pred.shape if need_grad else (0,), dtype=pred.dtype, device=pred.device)
    if per_sample:
        B, D = pred.shape[0], math.prod(pred.shape[1:])
        p2, t2 = pred.reshape(B, D), target.reshape(B, D)  # views (any strides) unless the dims cannot merge
        loss = torch.empty(B, dtype=acc, device=pred.device)
        if B == 0:
            return loss, grad
        block = block_size(D)
        _pseudo_huber_fwd_sample_kernel[(B,)](
            p2, t2, c_t, loss, grad, D, *p2.stride(), *t2.stride(),
            HAS_GRAD=need_grad, ONE_BLOCK=D <= block, BLOCK=block, ACC=compute, num_warps=num_warps(block))
        return loss, grad
    p1, t1 = pred.contiguous().view(-1), target.contiguous().view(-1)
    loss = torch.empty(pred.shape, dtype=acc, device=pred.device)
    if loss.numel() == 0:
        return loss, grad
    block = 4096
    grid = (triton.cdiv(p1.numel(), block),)
    _pseudo_huber_fwd_element_kernel[grid](
        p1, t1, c_t, loss, grad, p1.numel(),
        HAS_GRAD=need_grad, BLOCK=block, ACC=compute, num_warps=num_warps(block))
    return loss, grad


pin_launch_options(globals())  # every kernel above launches with FP contraction pinned on (_utils)
