"""Pseudo-Huber loss, fused with its gradient (iCT, Song & Dhariwal 2023, Sec. 3.3).

    d(x, y) = sqrt(||x - y||^2 + c^2) - c          per sample (iCT) or per element (LCM scripts)

One pass per sample computes the loss and, when a gradient is needed, writes d loss / d pred into a buffer in the
same program, so backward is a single multiply by grad_output (the target's gradient is its negative).
"""
import math

import torch
import triton
import triton.language as tl

from ._utils import accumulate_dtype, block_size, compute_dtype, num_warps


@triton.jit
def _row_diff(pred_row, target_row, offs, mask, stride_pred_d, stride_target_d, ACC: tl.constexpr):
    """pred - target at positions offs of one row, in the compute dtype (0 on masked lanes)."""
    pred = tl.load(pred_row + offs * stride_pred_d, mask=mask, other=0).to(ACC)
    return pred - tl.load(target_row + offs * stride_target_d, mask=mask, other=0).to(ACC)


# d/dx [sqrt(S + c^2) - c] with S = sum_j (x_j - y_j)^2 is (x - y) / sqrt(S + c^2). The loss itself is written as
# S / (sqrt(S + c^2) + c), which equals sqrt(S + c^2) - c without the cancellation when S << c^2.
@triton.jit
def _pseudo_huber_fwd_sample_kernel(
    pred_ptr,          # (B, D) rows, any strides
    target_ptr,        # (B, D) rows, any strides
    c_ptr,             # (1,) c in the compute dtype
    loss_ptr,          # (B,) per-sample loss, compute dtype
    grad_ptr,          # (B, D) contiguous d loss_b / d pred_b, pred's dtype (unused unless HAS_GRAD)
    D,                 # elements per sample
    stride_pred, stride_pred_d,      # row and inner stride of pred (the inner one is specialised when it is 1)
    stride_target, stride_target_d,  # row and inner stride of target
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32 or tl.float64
):
    row = tl.program_id(0).to(tl.int64)
    pred_row = pred_ptr + row * stride_pred
    target_row = target_ptr + row * stride_target
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < D
        diff = _row_diff(pred_row, target_row, offs, mask, stride_pred_d, stride_target_d, ACC)
        acc += diff * diff
    S = tl.sum(acc, axis=0)
    c = tl.load(c_ptr).to(ACC)
    root = tl.sqrt(S + c * c)
    tl.store(loss_ptr + row, S / (root + c))
    if HAS_GRAD:
        inv_root = 1.0 / root
        grad_row = grad_ptr + row * D
        for start in range(0, D, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < D
            diff = _row_diff(pred_row, target_row, offs, mask, stride_pred_d, stride_target_d, ACC)
            tl.store(grad_row + offs, (diff * inv_root).to(grad_ptr.dtype.element_ty), mask=mask)


# Elementwise: loss_j = d_j^2 / (sqrt(d_j^2 + c^2) + c), gradient d_j / sqrt(d_j^2 + c^2).
@triton.jit
def _pseudo_huber_fwd_element_kernel(
    pred_ptr,          # (numel,) contiguous
    target_ptr,        # (numel,) contiguous
    c_ptr,             # (1,) c in the compute dtype
    loss_ptr,          # (numel,) loss, compute dtype
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
    sq = diff * diff
    root = tl.sqrt(sq + c * c)
    tl.store(loss_ptr + offs, sq / (root + c), mask=mask)
    if HAS_GRAD:
        tl.store(grad_ptr + offs, (diff / root).to(grad_ptr.dtype.element_ty), mask=mask)


def pseudo_huber_fwd(pred: torch.Tensor, target: torch.Tensor, c: float, per_sample: bool, need_grad: bool):
    """Launch the fused kernel. Returns (loss, grad): loss is (B,) per sample or pred.shape per element, in fp32
    (fp64 for fp64 inputs); grad is d loss / d pred in pred's dtype and shape, or an empty tensor."""
    acc = accumulate_dtype(pred)
    c_t = torch.full((1,), c, dtype=acc, device=pred.device)
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
            HAS_GRAD=need_grad, BLOCK=block, ACC=compute_dtype(pred), num_warps=num_warps(block))
        return loss, grad
    p1, t1 = pred.contiguous().view(-1), target.contiguous().view(-1)
    loss = torch.empty(pred.shape, dtype=acc, device=pred.device)
    if loss.numel() == 0:
        return loss, grad
    block = 4096
    grid = (triton.cdiv(p1.numel(), block),)
    _pseudo_huber_fwd_element_kernel[grid](
        p1, t1, c_t, loss, grad, p1.numel(),
        HAS_GRAD=need_grad, BLOCK=block, ACC=compute_dtype(pred), num_warps=num_warps(block))
    return loss, grad
