"""Matrix square root of symmetric positive (semi-)definite matrices by the coupled Newton-Schulz iteration.

Higham, "Functions of Matrices" (SIAM 2008), eq. (6.35); Lin & Maji, BMVC 2017 (matrix square-root layers):

    Y_0 = A / ||A||_F,   Z_0 = I
    T_k = (3 I - Z_k Y_k) / 2,   Y_{k+1} = Y_k T_k,   Z_{k+1} = T_k Z_k
    Y_k -> (A / ||A||_F)^(1/2),   Z_k -> (A / ||A||_F)^(-1/2)

One iteration is two launches:
    1. T = 3/2 I - 1/2 Z @ Y                   (_sqrtm_fwd_t_kernel: the step's epilogue fused into the matmul)
    2. Y <- Y @ T  and  Z <- T @ Z              (_sqrtm_fwd_update_kernel: both products in one program per tile,
                                                 sharing the loads of T; the last iteration skips Z)
The operand order matters: in exact arithmetic all iterates are symmetric polynomials in A and commute, but only
Y T / T Z is numerically stable (Higham 2008, Sec. 6.4). Computing Z T instead, or forcing T symmetric by storing
one triangle and its mirror (the "half the flops" trick), lets rounding errors grow ~50x per step once the
iteration has converged (a symmetric-tile version of this kernel reached errors of 1e+27 after 30 steps on a
5x5 matrix of condition number 1e3), so both kernels compute full tiles.
The iterates are held in fp32 (fp64 for fp64 inputs: the interpreter's tl.dot, and sm80+ GPUs, support it).
fp32 products follow torch's setting (``_utils.fp32_matmul_precision()``): TF32 tensor cores when it allows them
(``set_float32_matmul_precision("high")`` or ``"medium"``, ``matmul.fp32_precision = "tf32"``) (the iteration then converges to TF32's ~1e-3 relative accuracy, as any TF32 matmul would),
IEEE fp32 FMA when it is "highest" (torch's default).
The batch is grid dimension 0 (up to 2^31 - 1 matrices; dimension 1 would cap it at 65,535), the output tile
dimension 1. Deterministic: no atomics, every output element is written by exactly one program.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, fp32_matmul_precision, pin_launch_options


@triton.jit
def _tile(n, BLOCK: tl.constexpr):
    """Rows and columns of this program's output tile, and the offset of its matrix in the batch."""
    n_col_tiles = tl.cdiv(n, BLOCK)
    rows = (tl.program_id(1) // n_col_tiles) * BLOCK + tl.arange(0, BLOCK)
    cols = (tl.program_id(1) % n_col_tiles) * BLOCK + tl.arange(0, BLOCK)
    return rows, cols, tl.program_id(0).to(tl.int64) * n * n


@triton.jit
def _sqrtm_fwd_t_kernel(
    z_ptr,             # (G, n, n) Z_k, contiguous
    y_ptr,             # (G, n, n) Y_k, contiguous
    t_ptr,             # (G, n, n) output T_k = 3/2 I - 1/2 Z_k Y_k
    n,                 # matrix size
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32 or tl.float64
    PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 only)
):
    rows, cols, base = _tile(n, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    for k0 in range(0, n, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        z = tl.load(z_ptr + base + rows[:, None] * n + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < n),
                    other=0.0)
        y = tl.load(y_ptr + base + ks[:, None] * n + cols[None, :], mask=(ks[:, None] < n) & (cols[None, :] < n),
                    other=0.0)
        acc = tl.dot(z.to(ACC), y.to(ACC), acc, input_precision=PRECISION, out_dtype=ACC)
    t = tl.where(rows[:, None] == cols[None, :], 1.5, 0.0).to(ACC) - 0.5 * acc
    tl.store(t_ptr + base + rows[:, None] * n + cols[None, :], t.to(t_ptr.dtype.element_ty),
             mask=(rows[:, None] < n) & (cols[None, :] < n))


@triton.jit
def _sqrtm_fwd_update_kernel(
    y_ptr,             # (G, n, n) Y_k
    z_ptr,             # (G, n, n) Z_k
    t_ptr,             # (G, n, n) T_k
    y_out_ptr,         # (G, n, n) Y_{k+1} = Y_k T_k
    z_out_ptr,         # (G, n, n) Z_{k+1} = T_k Z_k (not touched unless UPDATE_Z)
    n,
    UPDATE_Z: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, cols, base = _tile(n, BLOCK)
    acc_y = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    acc_z = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    for k0 in range(0, n, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        row_k = (rows[:, None] < n) & (ks[None, :] < n)    # mask of an (rows, ks) tile
        k_col = (ks[:, None] < n) & (cols[None, :] < n)    # mask of a (ks, cols) tile
        y = tl.load(y_ptr + base + rows[:, None] * n + ks[None, :], mask=row_k, other=0.0).to(ACC)
        t_kc = tl.load(t_ptr + base + ks[:, None] * n + cols[None, :], mask=k_col, other=0.0).to(ACC)
        acc_y = tl.dot(y, t_kc, acc_y, input_precision=PRECISION, out_dtype=ACC)
        if UPDATE_Z:
            t_rk = tl.load(t_ptr + base + rows[:, None] * n + ks[None, :], mask=row_k, other=0.0).to(ACC)
            z = tl.load(z_ptr + base + ks[:, None] * n + cols[None, :], mask=k_col, other=0.0).to(ACC)
            acc_z = tl.dot(t_rk, z, acc_z, input_precision=PRECISION, out_dtype=ACC)
    out = base + rows[:, None] * n + cols[None, :]
    mask = (rows[:, None] < n) & (cols[None, :] < n)
    tl.store(y_out_ptr + out, acc_y.to(y_out_ptr.dtype.element_ty), mask=mask)
    if UPDATE_Z:
        tl.store(z_out_ptr + out, acc_z.to(z_out_ptr.dtype.element_ty), mask=mask)


class Plan(NamedTuple):
    grid: tuple       # (batch, output tiles)
    meta: dict        # constexprs (BLOCK, ACC, PRECISION) and num_warps, shared by both kernels


def sqrtm_plan(batch: int, n: int, dtype: torch.dtype, fp32_precision: str = "highest") -> Plan:
    """Grid, tile and precision of both kernels for ``batch`` matrices n x n in ``dtype`` (fp32 or fp64), with
    ``fp32_precision`` torch's fp32 matmul setting ("tf32" / "ieee" as ``fp32_matmul_precision()`` reads it, or the
    legacy "high" / "medium" / "highest"). A pure function: the compile gate builds the same.

    fp32 IEEE dots run on FMA units with both operand tiles in registers: 64 x 64 tiles sat at 255 registers and
    spilled in the update kernel (two accumulators) at 4 warps, and still spilled at 8; 32 x 32 tiles do not."""
    fp64 = dtype == torch.float64
    precision = "tf32" if not fp64 and fp32_precision in ("tf32", "high", "medium") else "ieee"
    if INTERPRET:  # the interpreter runs numpy per program: few large tiles are fastest
        block = max(16, min(64, triton.next_power_of_2(n)))
    else:  # FMA (IEEE) dots keep both operand tiles in registers: 32 x 32; TF32 tensor cores take 64 x 64
        block = 64 if precision == "tf32" and n > 32 else 32
    warps = 4
    meta = dict(BLOCK=block, ACC=tl.float64 if fp64 else tl.float32, PRECISION=precision, num_warps=warps)
    return Plan((batch, triton.cdiv(n, block) ** 2), meta)


def sqrtm_fwd(a: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Square roots of a batch of symmetric PSD matrices ``a`` (G, n, n), fp32 or fp64, by ``num_iters`` coupled
    Newton-Schulz steps after Frobenius pre-scaling. Returns (G, n, n) in a's dtype."""
    G, n, _ = a.shape
    a = a.contiguous()
    norm = torch.linalg.matrix_norm(a, "fro")
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # a zero matrix stays zero
    yz = torch.empty((2, G, n, n), dtype=a.dtype, device=a.device)
    yz[0] = a / norm.view(G, 1, 1)
    yz[1] = torch.eye(n, dtype=a.dtype, device=a.device)
    yz_next = torch.empty_like(yz)
    t = torch.empty((G, n, n), dtype=a.dtype, device=a.device)
    plan = sqrtm_plan(G, n, a.dtype, fp32_matmul_precision())
    for k in range(num_iters):
        _sqrtm_fwd_t_kernel[plan.grid](yz[1], yz[0], t, n, **plan.meta)
        _sqrtm_fwd_update_kernel[plan.grid](yz[0], yz[1], t, yz_next[0], yz_next[1], n, UPDATE_Z=k < num_iters - 1,
                                            **plan.meta)
        yz, yz_next = yz_next, yz
    return yz[0] * norm.sqrt().view(G, 1, 1)


pin_launch_options(globals())  # every kernel above launches with FP contraction pinned on (_utils)
