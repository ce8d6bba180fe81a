"""GroupNorm with per-sample scale/shift and SiLU, forward and backward (Wu & He 2018; ADM scale-shift norm).

    u = (xhat * w_c + beta_c) * (1 + s_nc) + t_nc,   xhat = (x - mean_ng) * rstd_ng,   y = act(u)

Forward: once a group's mean and rstd are known, every per-(n, c) factor folds into one multiply-add,
u = A_nc * x + B_nc with A = rstd * w * (1 + s) and B = (beta - A_0 * mean) * (1 + s) + t (A_0 = rstd * w), so
scale, shift and SiLU cost no extra pass. Two paths, chosen by ``group_norm_plan`` (a pure host function):
  * fused: one program per (n, g) holds the whole group in registers (one read of x, one write of y);
  * split (large groups, or too few groups to fill a GPU, e.g. batch 1): partial statistics per (n, g, chunk),
    then one apply launch per (n, g, chunk) that merges its group's partials itself (no separate finalize
    launch) and writes y. Two launches, two reads of x (the second mostly from L2).
Statistics are in fp32 (fp64 for fp64 inputs) and never use E[x^2] - E[x]^2: a tile's mean and M2 are exact
two-pass values in registers, and tiles/chunks are merged with Chan et al.'s pairwise update.

x is read in place as an (N, C, S) view with any strides. Tiles are (channel, space) when space is the contiguous
axis (NCHW) and (space, channel) when channels are (NHWC, channels_last, or a transposed (B, C, L) view), so that
the fast axis of every tile is the contiguous one and loads are 8/16-byte vectors; CPG is a compile-time constant
so that the alignment of a group's channels is known to the compiler.
Every kernel is deterministic (no atomics); the backward writes per-(n, c) sums that are reduced afterwards.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import MAX_FUSED_SIZE, accumulate_dtype, num_warps, pin_launch_options

MAX_TILE_BWD = MAX_FUSED_SIZE // 2  # the backward keeps x, dy, du and xhat live: half the forward's tile
SPLIT_TILE = 4096                   # split-path tile: 16 fp32 per thread at 8 warps (16 warps capped regs at 128)
SPLIT_WARPS = 8
MIN_SPLIT_ELEMS = 4096              # never split a group into chunks smaller than this (launch cost > work)
MAX_SPLIT = 1024                    # the apply/finalize step combines at most this many chunks per group


@triton.jit
def _program(G, S, CHUNK):
    """Program (pid = n * G + g, chunk k): sample n, spatial range [s_lo, s_hi). Fused kernels: CHUNK = S, k = 0."""
    pid, k = tl.program_id(0), tl.program_id(1)
    s_lo = k * CHUNK
    return pid, k, (pid // G).to(tl.int64), s_lo, tl.minimum(s_lo + CHUNK, S)


@triton.jit
def _channels(pid, c0, G, CPG: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels c0 .. c0 + BLOCK_C of program pid's group: offset in the group, global index, mask."""
    c_loc = c0 + tl.arange(0, BLOCK_C)
    return c_loc, (pid % G) * CPG + c_loc, c_loc < CPG


@triton.jit
def _tile(cmask, s0, s_hi, BLOCK_S: tl.constexpr, CL: tl.constexpr):
    """Spatial positions s0 .. s0 + BLOCK_S of a tile and its mask, cut at s_hi. The tile is (channel, space), or
    (space, channel) when CL (channels are the contiguous axis)."""
    s = s0 + tl.arange(0, BLOCK_S)
    if CL:
        mask = (s < s_hi)[:, None] & cmask[None, :]
    else:
        mask = cmask[:, None] & (s < s_hi)[None, :]
    return s, mask


@triton.jit
def _per_c(v, CL: tl.constexpr):
    """A per-channel vector broadcast against a tile."""
    if CL:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _sum_space(t, CL: tl.constexpr):
    """Per-channel sums of a tile over its spatial axis."""
    if CL:
        out = tl.sum(t, axis=0)
    else:
        out = tl.sum(t, axis=1)
    return out


@triton.jit
def _ptrs(ptr, n, c, s, sn, sc, ss, CL: tl.constexpr):
    if CL:
        p = ptr + n * sn + s[:, None] * ss + c[None, :] * sc
    else:
        p = ptr + n * sn + c[:, None] * sc + s[None, :] * ss
    return p


@triton.jit
def _load(ptr, n, c, s, mask, sn, sc, ss, CL: tl.constexpr, ACC: tl.constexpr):
    return tl.load(_ptrs(ptr, n, c, s, sn, sc, ss, CL), mask=mask, other=0.0).to(ACC)


@triton.jit
def _fold(pid, c0, n, mean, rstd, G, C, CPG: tl.constexpr, w_ptr, b_ptr, scale_ptr, shift_ptr,
          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
          BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """(c, cmask) of the channel block at c0, (A, B) per channel so that u = A x + B, and gamma = w (1 + s)."""
    _, c, cmask = _channels(pid, c0, G, CPG, BLOCK_C)
    gamma, beta = tl.full([BLOCK_C], 1.0, ACC), tl.full([BLOCK_C], 0.0, ACC)
    if HAS_W:
        gamma = tl.load(w_ptr + c, mask=cmask, other=0.0).to(ACC)
    if HAS_B:
        beta = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
    B = beta - gamma * rstd * mean
    if HAS_SCALE:
        mod = 1.0 + tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
        gamma = gamma * mod
        B = B * mod
    if HAS_SHIFT:
        B += tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
    return c, cmask, gamma * rstd, B, gamma


@triton.jit
def _apply_store(y_ptr, x, A, B, n, c, s, mask, syn, syc, sys, SILU: tl.constexpr, CL: tl.constexpr):
    """y = act(A x + B) for one tile, stored in y's dtype."""
    u = x * _per_c(A, CL) + _per_c(B, CL)
    if SILU:
        u = u / (1.0 + tl.exp(-u))
    tl.store(_ptrs(y_ptr, n, c, s, syn, syc, sys, CL), u.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(dy_ptr, x_ptr, A, B, n, c, s, mask, sdn, sdc, sds, sxn, sxc, sxs,
              SILU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr):
    """x and du = dy * act'(u) (zero on masked lanes), u = A x + B; silu'(u) = sig(u) (1 + u (1 - sig(u)))."""
    x = _load(x_ptr, n, c, s, mask, sxn, sxc, sxs, CL, ACC)
    du = _load(dy_ptr, n, c, s, mask, sdn, sdc, sds, CL, ACC)
    if SILU:
        u = x * _per_c(A, CL) + _per_c(B, CL)
        sig = 1.0 / (1.0 + tl.exp(-u))
        du = du * sig * (1.0 + u * (1.0 - sig))
    return x, du


@triton.jit
def _tile_stats(x, mask, t_count, ACC: tl.constexpr):
    """Exact two-pass mean and M2 = sum (x - mean)^2 of one tile (masked lanes hold 0 and are excluded)."""
    t_mean = tl.sum(x) / t_count
    d = tl.where(mask, x - t_mean, 0.0)
    return t_mean, tl.sum(d * d)


@triton.jit
def _fused_statistics(x_ptr, mean_ptr, rstd_ptr, eps, G, S, sxn, sxc, sxs, CPG: tl.constexpr, CL: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """The prologue of the one-block forward and of the forward+tangent kernel (one program = one (n, group)): load
    the group, its exact two-pass mean and rstd, stored for the backward. One function, so the JVP provably
    normalises with the forward's statistics."""
    pid, _, n, _, _ = _program(G, S, S)
    _, c, cmask = _channels(pid, 0, G, CPG, BLOCK_C)
    s, mask = _tile(cmask, 0, S, BLOCK_S, CL)
    x = _load(x_ptr, n, c, s, mask, sxn, sxc, sxs, CL, ACC)
    mean, m2 = _tile_stats(x, mask, (CPG * S).to(ACC), ACC)
    rstd = 1.0 / tl.sqrt(m2 / (CPG * S) + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    return pid, n, c, cmask, s, mask, x, mean, rstd


@triton.jit
def _group_norm_fwd_fused_kernel(
    x_ptr, y_ptr,                              # (N, C, S) input and output, strides below
    w_ptr, b_ptr, scale_ptr, shift_ptr,        # (C,), (C,), (N, C), (N, C) contiguous; unused unless HAS_*
    mean_ptr, rstd_ptr,                        # (N * G,) statistics out, compute dtype
    eps,                                       # fp32 scalar (its rounding moves rstd by < 3e-8 relative)
    G, C, S,                                   # groups, channels, spatial size
    sxn, sxc, sxs, syn, syc, sys,              # strides of x and y in (N, C, S)
    CPG: tl.constexpr,                         # channels per group
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, n, c, cmask, s, mask, x, mean, rstd = _fused_statistics(x_ptr, mean_ptr, rstd_ptr, eps, G, S, sxn, sxc,
                                                                 sxs, CPG, CL, BLOCK_C, BLOCK_S, ACC)
    _, _, A, B, _ = _fold(pid, 0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                          HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
    _apply_store(y_ptr, x, A, B, n, c, s, mask, syn, syc, sys, SILU, CL)


@triton.jit
def _group_norm_fwd_partial_kernel(
    x_ptr,                                     # (N, C, S) input
    mean_part_ptr, m2_part_ptr,                # (N * G, SPLIT) per-chunk mean and sum of squared deviations
    G, S, CHUNK, SPLIT,                        # CHUNK spatial positions per program, SPLIT chunks per group
    sxn, sxc, sxs,
    CPG: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, k, n, s_lo, s_hi = _program(G, S, CHUNK)
    count, mean, m2 = tl.full((), 0.0, ACC), tl.full((), 0.0, ACC), tl.full((), 0.0, ACC)
    for c0 in range(0, CPG, BLOCK_C):
        _, c, cmask = _channels(pid, c0, G, CPG, BLOCK_C)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, mask = _tile(cmask, s0, s_hi, BLOCK_S, CL)
            x = _load(x_ptr, n, c, s, mask, sxn, sxc, sxs, CL, ACC)
            t_count = (tl.minimum(CPG - c0, BLOCK_C) * tl.minimum(s_hi - s0, BLOCK_S)).to(ACC)
            t_mean, t_m2 = _tile_stats(x, mask, t_count, ACC)
            # Chan, Golub & LeVeque (1979) pairwise merge of the tile into the running (count, mean, M2).
            new_count = count + t_count
            delta = t_mean - mean
            mean += delta * (t_count / new_count)
            m2 += t_m2 + delta * delta * (count * t_count / new_count)
            count = new_count
    tl.store(mean_part_ptr + pid * SPLIT + k, mean)
    tl.store(m2_part_ptr + pid * SPLIT + k, m2)


@triton.jit
def _merge_partials(pid, mean_part_ptr, m2_part_ptr, eps, S, CHUNK, SPLIT,
                    CPG: tl.constexpr, BLOCK_SPLIT: tl.constexpr, ACC: tl.constexpr):
    """Group mean and rstd from the SPLIT per-chunk (mean, M2) pairs: M2 = sum_k M2_k + n_k (mean_k - mean)^2."""
    k = tl.arange(0, BLOCK_SPLIT)
    kmask = k < SPLIT
    counts = tl.where(kmask, (tl.minimum(k * CHUNK + CHUNK, S) - k * CHUNK) * CPG, 0).to(ACC)
    means = tl.load(mean_part_ptr + pid * SPLIT + k, mask=kmask, other=0.0)
    m2s = tl.load(m2_part_ptr + pid * SPLIT + k, mask=kmask, other=0.0)
    mean = tl.sum(counts * means, axis=0) / (CPG * S)
    dm = means - mean
    m2 = tl.sum(m2s + counts * dm * dm, axis=0)
    return mean, 1.0 / tl.sqrt(m2 / (CPG * S) + eps)


@triton.jit
def _group_norm_fwd_apply_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # as in the fused kernel
    mean_part_ptr, m2_part_ptr,                # (N * G, SPLIT) partials from the partial kernel
    eps, G, C, S, CHUNK, SPLIT,
    sxn, sxc, sxs, syn, syc, sys,
    CPG: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, ACC: tl.constexpr,
):
    pid, k, n, s_lo, s_hi = _program(G, S, CHUNK)
    # Every chunk of a group merges the same partials in the same order (bitwise equal); chunk 0 stores them.
    mean, rstd = _merge_partials(pid, mean_part_ptr, m2_part_ptr, eps, S, CHUNK, SPLIT, CPG, BLOCK_SPLIT, ACC)
    if k == 0:
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
    for c0 in range(0, CPG, BLOCK_C):
        c, cmask, A, B, _ = _fold(pid, c0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, mask = _tile(cmask, s0, s_hi, BLOCK_S, CL)
            x = _load(x_ptr, n, c, s, mask, sxn, sxc, sxs, CL, ACC)
            _apply_store(y_ptr, x, A, B, n, c, s, mask, syn, syc, sys, SILU, CL)


# Backward. With du = dy * act'(u) (u recomputed as A x + B) and per-(n, c) sums over space
#     P1_nc = sum_s du,      P2_nc = sum_s du * xhat,
# the modulation gives  dshift_nc = P1,  dscale_nc = sum_s du * z = w_c P2 + beta_c P1  (z = w xhat + beta),
# dbeta_c = sum_n (1 + s_nc) P1,  dw_c = sum_n (1 + s_nc) P2  (done in torch from P1, P2: no atomics).
# For x, dxhat = du * gamma_nc with gamma = w (1 + s); the group-norm VJP over the M = CPG * S elements of a group is
#     dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))
#        = rstd * (gamma du - c1 - xhat c2),   c1 = sum_c gamma P1 / M,   c2 = sum_c gamma P2 / M.
@triton.jit
def _group_norm_bwd_fused_kernel(
    dy_ptr, x_ptr, dx_ptr,                     # (N, C, S) grad out, input, grad in
    w_ptr, b_ptr, scale_ptr, shift_ptr,        # as in the forward
    mean_ptr, rstd_ptr,                        # (N * G,) saved statistics
    p1_ptr, p2_ptr,                            # (N, C) out: sum_s du, sum_s du * xhat
    G, C, S,
    sdn, sdc, sds, sxn, sxc, sxs, sgn, sgc, sgs,  # strides of dy, x, dx
    CPG: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, _, n, _, _ = _program(G, S, S)
    mean, rstd = tl.load(mean_ptr + pid), tl.load(rstd_ptr + pid)
    c, cmask, A, B, gamma = _fold(pid, 0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
    s, mask = _tile(cmask, 0, S, BLOCK_S, CL)
    x, du = _bwd_tile(dy_ptr, x_ptr, A, B, n, c, s, mask, sdn, sdc, sds, sxn, sxc, sxs, SILU, CL, ACC)
    xhat = (x - mean) * rstd
    p1, p2 = _sum_space(du, CL), _sum_space(du * xhat, CL)
    tl.store(p1_ptr + n * C + c, p1, mask=cmask)
    tl.store(p2_ptr + n * C + c, p2, mask=cmask)
    c1, c2 = tl.sum(gamma * p1, axis=0) / (CPG * S), tl.sum(gamma * p2, axis=0) / (CPG * S)
    dx = rstd * (_per_c(gamma, CL) * du - c1 - xhat * c2)
    tl.store(_ptrs(dx_ptr, n, c, s, sgn, sgc, sgs, CL), dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_bwd_partial_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # as in the fused backward
    p1_part_ptr, p2_part_ptr,                  # (N, C, SPLIT) out: P1, P2 over one chunk of space
    G, C, S, CHUNK, SPLIT,
    sdn, sdc, sds, sxn, sxc, sxs,
    CPG: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, k, n, s_lo, s_hi = _program(G, S, CHUNK)
    mean, rstd = tl.load(mean_ptr + pid), tl.load(rstd_ptr + pid)
    for c0 in range(0, CPG, BLOCK_C):
        c, cmask, A, B, _ = _fold(pid, c0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
        p1, p2 = tl.full([BLOCK_C], 0.0, ACC), tl.full([BLOCK_C], 0.0, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, mask = _tile(cmask, s0, s_hi, BLOCK_S, CL)
            x, du = _bwd_tile(dy_ptr, x_ptr, A, B, n, c, s, mask, sdn, sdc, sds, sxn, sxc, sxs, SILU, CL, ACC)
            p1 += _sum_space(du, CL)
            p2 += _sum_space(du * ((x - mean) * rstd), CL)
        tl.store(p1_part_ptr + (n * C + c) * SPLIT + k, p1, mask=cmask)
        tl.store(p2_part_ptr + (n * C + c) * SPLIT + k, p2, mask=cmask)


@triton.jit
def _group_norm_bwd_dx_kernel(
    dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # as in the fused backward
    p1_ptr, p2_ptr,                            # (N, C) totals of P1, P2
    G, C, S, CHUNK,
    sdn, sdc, sds, sxn, sxc, sxs, sgn, sgc, sgs,
    CPG: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, k, n, s_lo, s_hi = _program(G, S, CHUNK)
    mean, rstd = tl.load(mean_ptr + pid), tl.load(rstd_ptr + pid)
    c1, c2 = tl.full((), 0.0, ACC), tl.full((), 0.0, ACC)
    for c0 in range(0, CPG, BLOCK_C):  # c1, c2 from the group's per-channel sums (fixed order: deterministic)
        c, cmask, _, _, gamma = _fold(pid, c0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                      HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
        c1 += tl.sum(gamma * tl.load(p1_ptr + n * C + c, mask=cmask, other=0.0), axis=0)
        c2 += tl.sum(gamma * tl.load(p2_ptr + n * C + c, mask=cmask, other=0.0), axis=0)
    c1, c2 = c1 / (CPG * S), c2 / (CPG * S)
    for c0 in range(0, CPG, BLOCK_C):
        c, cmask, A, B, gamma = _fold(pid, c0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                      HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, mask = _tile(cmask, s0, s_hi, BLOCK_S, CL)
            x, du = _bwd_tile(dy_ptr, x_ptr, A, B, n, c, s, mask, sdn, sdc, sds, sxn, sxc, sxs, SILU, CL, ACC)
            dx = rstd * (_per_c(gamma, CL) * du - c1 - (x - mean) * rstd * c2)
            tl.store(_ptrs(dx_ptr, n, c, s, sgn, sgc, sgs, CL), dx.to(dx_ptr.dtype.element_ty), mask=mask)


# Forward-mode tangent (JVP): the chain rule through the group's mean and rstd. Per group, with M = CPG * S elements:
#     mu' = mean(x'),  kappa = mean(xhat * x') = rstd * mean((x - mu) x'),  xhat' = rstd (x' - mu' - xhat kappa),
#     h = gamma xhat + beta,  h' = gamma xhat' + gamma' xhat + beta',  a = h (1 + s) + t,  a' = h' (1 + s) + h s' + t',
#     y' = a' silu'(a)  (silu'(a) = sig(a) (1 + a (1 - sig(a)))).
# One read of x and x' gives the four sums (sum x, sum (x - mu)^2, sum x', sum (x - mu) x'), the centred forms
# being exact two-pass values in registers (no E[x^2] - E[x]^2 cancellation); y is written too when WRITE_Y, and
# mean / rstd always, so that with WRITE_Y this one launch is also the op's forward for its backward.
@triton.jit
def _group_norm_jvp_fused_kernel(
    x_ptr, xd_ptr, y_ptr, yd_ptr,              # (N, C, S) input, its tangent, output (if WRITE_Y), tangent out
    w_ptr, b_ptr, scale_ptr, shift_ptr,        # as in the forward
    wd_ptr, bd_ptr, scaled_ptr, shiftd_ptr,    # their tangents: (C,), (C,), (N, C), (N, C); unused unless HAS_*D
    mean_ptr, rstd_ptr,                        # (N * G,) statistics out, as the forward's (the backward reads them)
    eps, G, C, S,
    sxn, sxc, sxs, sdn, sdc, sds, syn, syc, sys, sen, sec, ses,  # strides of x, x', y, y'
    CPG: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_XD: tl.constexpr, HAS_WD: tl.constexpr, HAS_BD: tl.constexpr, HAS_SCALED: tl.constexpr,
    HAS_SHIFTD: tl.constexpr, SILU: tl.constexpr, WRITE_Y: tl.constexpr, CL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, n, c, cmask, s, mask, x, mean, rstd = _fused_statistics(x_ptr, mean_ptr, rstd_ptr, eps, G, S, sxn, sxc,
                                                                 sxs, CPG, CL, BLOCK_C, BLOCK_S, ACC)
    xhat = tl.where(mask, x - mean, 0.0) * rstd
    xhat_dot = tl.zeros_like(xhat)
    if HAS_XD:
        xd = _load(xd_ptr, n, c, s, mask, sdn, sdc, sds, CL, ACC)
        mean_dot = tl.sum(xd) / (CPG * S)
        kappa = tl.sum(xhat * xd) / (CPG * S)
        xhat_dot = tl.where(mask, rstd * (xd - mean_dot - xhat * kappa), 0.0)
    gamma, beta = tl.full([BLOCK_C], 1.0, ACC), tl.full([BLOCK_C], 0.0, ACC)
    if HAS_W:
        gamma = tl.load(w_ptr + c, mask=cmask, other=0.0).to(ACC)
    if HAS_B:
        beta = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
    h = xhat * _per_c(gamma, CL) + _per_c(beta, CL)
    h_dot = xhat_dot * _per_c(gamma, CL)
    if HAS_WD:
        h_dot += xhat * _per_c(tl.load(wd_ptr + c, mask=cmask, other=0.0).to(ACC), CL)
    if HAS_BD:
        h_dot += _per_c(tl.load(bd_ptr + c, mask=cmask, other=0.0).to(ACC), CL)
    a, a_dot = h, h_dot
    if HAS_SCALE:
        mod = _per_c(1.0 + tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0).to(ACC), CL)
        a, a_dot = h * mod, h_dot * mod
    if HAS_SCALED:
        a_dot += h * _per_c(tl.load(scaled_ptr + n * C + c, mask=cmask, other=0.0).to(ACC), CL)
    if HAS_SHIFT:
        a += _per_c(tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0).to(ACC), CL)
    if HAS_SHIFTD:
        a_dot += _per_c(tl.load(shiftd_ptr + n * C + c, mask=cmask, other=0.0).to(ACC), CL)
    y, y_dot = a, a_dot
    if SILU:
        sig = 1.0 / (1.0 + tl.exp(-a))
        y, y_dot = a * sig, a_dot * sig * (1.0 + a * (1.0 - sig))
    if WRITE_Y:
        tl.store(_ptrs(y_ptr, n, c, s, syn, syc, sys, CL), y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(_ptrs(yd_ptr, n, c, s, sen, sec, ses, CL), y_dot.to(yd_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch plan: a pure function of shapes, strides, dtype and SM count, so that the ahead-of-time compile gate
# compiles exactly the kernels and configurations the launchers run.

class Launch(NamedTuple):
    kernel: object   # the @triton.jit function
    grid: tuple      # program grid
    meta: dict       # constexpr arguments and num_warps, passed by keyword


class Plan(NamedTuple):
    fused: bool      # one program per group (else partial sums per chunk, then a second launch)
    chunk: int       # spatial positions per program (S on the fused path)
    split: int       # programs per group along space (1 on the fused path)
    launches: tuple  # the Launch of each kernel, in launch order


def group_norm_plan(shape, strides, dtype, num_groups: int, num_sms: int, *, backward: bool = False,
                    has_weight: bool = True, has_bias: bool = True, has_scale: bool = False,
                    has_shift: bool = False, silu: bool = False, chunk: int = 0, jvp=None) -> Plan:
    """Kernels, grids, constexprs and num_warps for x viewed as ``shape`` = (N, C, S) with ``strides`` (of that
    view), in ``dtype``, on a GPU with ``num_sms`` SMs (0: the CPU interpreter, which runs programs one by one).

    Fused path when the whole group fits one tile and N * G programs fill the GPU; else the split path with
    ``chunk`` spatial positions per program (``chunk`` > 0 forces it: the op's test hook).
    ``jvp``: a dict of the tangent kernel's flags (HAS_XD, HAS_WD, HAS_BD, HAS_SCALED, HAS_SHIFTD, WRITE_Y): plans
    the one-pass tangent kernel, fused only (x, x' and the tangent chain live at once: the backward's tile); a
    group too large for it gets ``Plan(False, S, 1, ())``, and the caller takes the reference tangent."""
    N, C, S = (int(v) for v in shape)
    G = int(num_groups)
    CPG = C // G
    sc, ss = (abs(int(v)) for v in strides[1:])
    meta = dict(CPG=CPG, HAS_W=has_weight, HAS_B=has_bias, HAS_SCALE=has_scale, HAS_SHIFT=has_shift, SILU=silu,
                CL=S > 1 and CPG > 1 and sc < ss, ACC=tl.float64 if dtype == torch.float64 else tl.float32)
    full_c, full_s = triton.next_power_of_2(CPG), triton.next_power_of_2(S)
    if jvp is not None:
        if full_c * full_s > MAX_TILE_BWD:
            return Plan(False, S, 1, ())
        meta = dict(meta, **jvp, BLOCK_C=full_c, BLOCK_S=full_s, num_warps=num_warps(full_c * full_s))
        return Plan(True, S, 1, (Launch(_kernel("jvp_fused"), (N * G,), meta),))
    max_tile = MAX_TILE_BWD if backward else MAX_FUSED_SIZE
    names = ("bwd_partial", "bwd_dx") if backward else ("fwd_partial", "fwd_apply")
    if chunk <= 0:
        target = 2 * num_sms if num_sms > 0 else 1  # two programs per SM
        splits = min(triton.cdiv(target, N * G), triton.cdiv(CPG * S, MIN_SPLIT_ELEMS))
        if splits <= 1 and full_c * full_s <= max_tile:
            kernel = _kernel("bwd_fused" if backward else "fwd_fused")
            fused = dict(meta, BLOCK_C=full_c, BLOCK_S=full_s, num_warps=num_warps(full_c * full_s))
            return Plan(True, S, 1, (Launch(kernel, (N * G,), fused),))
        chunk = 16 * triton.cdiv(S, 16 * max(splits, 1))  # multiple of 16: chunks start 16-aligned
    chunk = max(int(chunk), triton.cdiv(S, MAX_SPLIT))
    split = triton.cdiv(S, chunk)
    block_c = min(full_c, 1024)
    block_s = min(triton.next_power_of_2(min(chunk, S)), max(SPLIT_TILE // block_c, 1))
    tiled = dict(meta, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=min(SPLIT_WARPS, num_warps(block_c * block_s)))
    partial = {k: v for k, v in tiled.items() if k in _PARTIAL_META}
    second = dict(tiled, BLOCK_SPLIT=triton.next_power_of_2(split)) if not backward else tiled
    kernels = (Launch(_kernel(names[0]), (N * G, split), tiled if backward else partial),
               Launch(_kernel(names[1]), (N * G, split), second))
    return Plan(False, chunk, split, kernels)


def _kernel(name: str):
    """The kernel ``_group_norm_<name>_kernel``, looked up when planning (so a tool that swaps module attributes,
    such as the compile gate's recorder, sees the launches)."""
    return globals()[f"_group_norm_{name}_kernel"]
_PARTIAL_META = ("CPG", "CL", "BLOCK_C", "BLOCK_S", "ACC", "num_warps")


# ----------------------------------------------------------------------------------------------------------------
# Launchers.

_SM_COUNT = {}


def _target_programs(device: torch.device) -> int:
    """Programs needed to fill the device: two per SM on CUDA (or on the compile target, _utils.TARGET_SMS); one on
    CPU (the interpreter runs them serially)."""
    if _utils.TARGET_SMS.get() is not None:
        return 2 * _utils.TARGET_SMS.get()
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


def _num_sms(device: torch.device) -> int:
    """SMs for ``group_norm_plan``: 0 off CUDA (the interpreter)."""
    return _target_programs(device) // 2


def _spatial_merges(t: torch.Tensor) -> bool:
    """True when t's spatial dims (2, 3, ...) merge into one strided dim, so (N, C, S) is a view of t."""
    dims = [d for d in range(2, t.dim()) if t.shape[d] != 1]
    return all(t.stride(a) == t.stride(b) * t.shape[b] for a, b in zip(dims, dims[1:]))


def empty_out(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised y / dx for x: x's strides when x is dense and its space merges (contiguous, channels_last,
    a transposed (B, C, L) view, ...), else contiguous."""
    y = torch.empty_like(x)  # preserve_format: x's strides when x is non-overlapping and dense
    return y if _spatial_merges(y) else torch.empty_like(x, memory_format=torch.contiguous_format)


def _params(x3, weight, bias, scale, shift):
    """Contiguous parameter tensors (x3 stands in for absent ones) and the matching has_* flags."""
    tensors = [t.contiguous() if t is not None else x3 for t in (weight, bias, scale, shift)]
    flags = dict(has_weight=weight is not None, has_bias=bias is not None, has_scale=scale is not None,
                 has_shift=shift is not None)
    return tensors, flags


def group_norm_fwd(x, num_groups: int, weight, bias, eps: float, scale, shift, silu: bool, chunk: int = 0):
    """y = act((GN(x) * weight + bias) * (1 + scale) + shift). Returns (y, mean, rstd); y has x's dtype and
    layout (see ``empty_out``), mean and rstd are (N, G) in fp32 (fp64 for fp64 x)."""
    N, C = x.shape[:2]
    x3 = x.reshape(N, C, -1)  # a view whenever x's space merges (any dense layout, most slices), else a copy
    S, G = x3.shape[2], num_groups
    acc = accumulate_dtype(x)
    y = empty_out(x)
    y3 = y.view(N, C, S)
    mean = torch.empty((N, G), dtype=acc, device=x.device)
    rstd = torch.empty_like(mean)
    params, flags = _params(x3, weight, bias, scale, shift)
    plan = group_norm_plan(x3.shape, x3.stride(), x.dtype, G, _num_sms(x.device), silu=silu, chunk=chunk, **flags)
    strides = (*x3.stride(), *y3.stride())
    if plan.fused:
        (fused,) = plan.launches
        fused.kernel[fused.grid](x3, y3, *params, mean, rstd, eps, G, C, S, *strides, **fused.meta)
        return y, mean, rstd
    partial, apply = plan.launches
    mean_part, m2_part = torch.empty((2, N * G, plan.split), dtype=acc, device=x.device)  # two contiguous halves
    partial.kernel[partial.grid](x3, mean_part, m2_part, G, S, plan.chunk, plan.split, *x3.stride(), **partial.meta)
    apply.kernel[apply.grid](x3, y3, *params, mean, rstd, mean_part, m2_part, eps, G, C, S, plan.chunk, plan.split,
                             *strides, **apply.meta)
    return y, mean, rstd


def group_norm_bwd(dy, x, mean, rstd, weight, bias, scale, shift, silu: bool, chunk: int = 0):
    """Returns (dx, P1, P2): dx in x's dtype and layout, and the per-(n, c) sums P1 = sum_s du and
    P2 = sum_s du * xhat ((N, C), fp32 or fp64) from which the caller forms the parameter gradients."""
    N, C = x.shape[:2]
    G = mean.shape[1]
    x3, dy3 = x.reshape(N, C, -1), dy.reshape(N, C, -1)
    S = x3.shape[2]
    dx = empty_out(x)
    dx3 = dx.view(N, C, S)
    params, flags = _params(x3, weight, bias, scale, shift)
    plan = group_norm_plan(x3.shape, x3.stride(), x.dtype, G, _num_sms(x.device), backward=True, silu=silu,
                           chunk=chunk, **flags)
    strides = (*dy3.stride(), *x3.stride())
    if plan.fused:
        p1 = torch.empty((N, C), dtype=mean.dtype, device=x.device)
        p2 = torch.empty_like(p1)
        (fused,) = plan.launches
        fused.kernel[fused.grid](dy3, x3, dx3, *params, mean, rstd, p1, p2, G, C, S, *strides, *dx3.stride(),
                                 **fused.meta)
        return dx, p1, p2
    partial, dx_launch = plan.launches
    p1_part, p2_part = torch.empty((2, N, C, plan.split), dtype=mean.dtype, device=x.device)
    partial.kernel[partial.grid](dy3, x3, *params, mean, rstd, p1_part, p2_part, G, C, S, plan.chunk, plan.split,
                                 *strides, **partial.meta)
    p1, p2 = p1_part.sum(-1), p2_part.sum(-1)  # fixed-order reduction over chunks: deterministic
    dx_launch.kernel[dx_launch.grid](dy3, x3, dx3, *params, mean, rstd, p1, p2, G, C, S, plan.chunk, *strides,
                                     *dx3.stride(), **dx_launch.meta)
    return dx, p1, p2


def group_norm_jvp(x, x_dot, num_groups: int, weight, bias, eps: float, scale, shift, weight_dot, bias_dot,
                   scale_dot, shift_dot, silu: bool, write_y: bool):
    """One pass over x and its tangent x_dot (None: zero) giving (y, y_dot, mean, rstd) of
    y = act((GN(x) * weight + bias) * (1 + scale) + shift); y is an empty tensor unless ``write_y``; mean, rstd
    are the (N, G) statistics of ``group_norm_fwd``. Groups must fit the fused tangent kernel (``jvp_fits``)."""
    N, C = x.shape[:2]
    x3 = x.reshape(N, C, -1)
    S = x3.shape[2]
    dots = (weight_dot, bias_dot, scale_dot, shift_dot)
    flags = dict(HAS_XD=x_dot is not None, HAS_WD=weight_dot is not None, HAS_BD=bias_dot is not None,
                 HAS_SCALED=scale_dot is not None, HAS_SHIFTD=shift_dot is not None, WRITE_Y=write_y)
    params, has = _params(x3, weight, bias, scale, shift)
    plan = group_norm_plan(x3.shape, x3.stride(), x.dtype, num_groups, _num_sms(x.device), silu=silu, jvp=flags,
                           **has)
    if not plan.fused:
        raise ValueError(f"groups of {C // num_groups} x {S} elements exceed the tangent kernel's tile")
    xd3 = x_dot.reshape(N, C, -1) if x_dot is not None else x3
    y, y_dot = (empty_out(x) if write_y else x.new_empty(0)), empty_out(x)
    y3, yd3 = (y.view(N, C, S) if write_y else x3), y_dot.view(N, C, S)
    dot_params = [t.contiguous() if t is not None else x3 for t in dots]
    mean = torch.empty((N, num_groups), dtype=accumulate_dtype(x), device=x.device)
    rstd = torch.empty_like(mean)
    (launch,) = plan.launches
    launch.kernel[launch.grid](x3, xd3, y3, yd3, *params, *dot_params, mean, rstd, eps, num_groups, C, S,
                               *x3.stride(), *xd3.stride(), *y3.stride(), *yd3.stride(), **launch.meta)
    return y, y_dot, mean, rstd


def jvp_fits(x: torch.Tensor, num_groups: int) -> bool:
    """True when a group of x fits the one-pass tangent kernel's tile."""
    S = x[0, 0].numel()
    return triton.next_power_of_2(x.shape[1] // num_groups) * triton.next_power_of_2(S) <= MAX_TILE_BWD


pin_launch_options(globals())  # every kernel above launches with FP contraction pinned on (_utils)
