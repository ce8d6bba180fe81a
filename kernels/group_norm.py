"""GroupNorm with per-sample scale/shift and SiLU, forward and backward (Wu & He 2018; ADM scale-shift norm).

    u = (xhat * w_c + beta_c) * (1 + s_nc) + t_nc,   xhat = (x - mean_ng) * rstd_ng,   y = act(u)

Forward: once a group's mean and rstd are known, every per-(n, c) factor folds into one multiply-add,
u = A_nc * x + B_nc with A = rstd * w * (1 + s) and B = (beta - A_0 * mean) * (1 + s) + t (A_0 = rstd * w), so
scale, shift and SiLU cost no extra pass. Two paths, chosen by the launcher:
  * fused: one program per (n, g) holds the whole group in registers (one read of x, one write of y);
  * split (large groups, or too few groups to fill a GPU, e.g. batch 1): partial statistics per (n, g, chunk)
    -> finalize (mean, rstd per (n, g)) -> apply per (n, g, chunk). Three launches, two reads of x.
Statistics are in fp32 (fp64 for fp64 inputs) and never use E[x^2] - E[x]^2: a tile's mean and M2 are exact
two-pass values in registers, and tiles/chunks are merged with Chan et al.'s pairwise update.

Channel and spatial strides are kernel arguments, so NCHW and channels_last (NHWC) tensors are read in place.
Every kernel is deterministic (no atomics); the backward writes per-(n, c) sums that are reduced afterwards.
"""
import torch
import triton
import triton.language as tl

from ._utils import MAX_FUSED_SIZE, block_size, compute_dtype, num_warps

MAX_TILE_BWD = MAX_FUSED_SIZE // 2  # the backward keeps x, dy, du and xhat live: half the forward's tile
MIN_SPLIT_ELEMS = 4096              # never split a group into chunks smaller than this (launch cost > work)
MAX_SPLIT = 1024                    # the finalize step combines at most this many chunks per group in one vector


@triton.jit
def _program(G, S, CHUNK):
    """Program (pid = n * G + g, chunk k): sample n, spatial range [s_lo, s_hi). Fused kernels: CHUNK = S, k = 0."""
    pid, k = tl.program_id(0), tl.program_id(1)
    s_lo = k * CHUNK
    return pid, k, (pid // G).to(tl.int64), s_lo, tl.minimum(s_lo + CHUNK, S)


@triton.jit
def _channels(pid, c0, G, CPG, BLOCK_C: tl.constexpr):
    """Channels c0 .. c0 + BLOCK_C of program pid's group: offset in the group, global index, mask."""
    c_loc = c0 + tl.arange(0, BLOCK_C)
    return c_loc, (pid % G) * CPG + c_loc, c_loc < CPG


@triton.jit
def _tile(cmask, s0, s_hi, BLOCK_S: tl.constexpr):
    """Spatial positions s0 .. s0 + BLOCK_S of a tile and its (channel, space) mask, cut at s_hi."""
    s = s0 + tl.arange(0, BLOCK_S)
    return s, cmask[:, None] & (s < s_hi)[None, :]


@triton.jit
def _ptrs(ptr, n, c, s, sn, sc, ss):
    return ptr + n * sn + c[:, None] * sc + s[None, :] * ss


@triton.jit
def _load(ptr, n, c, s, mask, sn, sc, ss, ACC: tl.constexpr):
    return tl.load(_ptrs(ptr, n, c, s, sn, sc, ss), mask=mask, other=0.0).to(ACC)


@triton.jit
def _fold(pid, c0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
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
def _apply_store(y_ptr, x, A, B, n, c, s, mask, syn, syc, sys, SILU: tl.constexpr):
    """y = act(A x + B) for one tile, stored in y's dtype."""
    u = x * A[:, None] + B[:, None]
    if SILU:
        u = u / (1.0 + tl.exp(-u))
    tl.store(_ptrs(y_ptr, n, c, s, syn, syc, sys), u.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(dy_ptr, x_ptr, A, B, n, c, s, mask, sdn, sdc, sds, sxn, sxc, sxs,
              SILU: tl.constexpr, ACC: tl.constexpr):
    """x and du = dy * act'(u) (zero on masked lanes), u = A x + B; silu'(u) = sig(u) (1 + u (1 - sig(u)))."""
    x = _load(x_ptr, n, c, s, mask, sxn, sxc, sxs, ACC)
    du = _load(dy_ptr, n, c, s, mask, sdn, sdc, sds, ACC)
    if SILU:
        u = x * A[:, None] + B[:, None]
        sig = 1.0 / (1.0 + tl.exp(-u))
        du = du * sig * (1.0 + u * (1.0 - sig))
    return x, du


@triton.jit
def _group_norm_fwd_fused_kernel(
    x_ptr, y_ptr,                              # (N, C, S) input and output, strides below
    w_ptr, b_ptr, scale_ptr, shift_ptr,        # (C,), (C,), (N, C), (N, C) contiguous; unused unless HAS_*
    mean_ptr, rstd_ptr,                        # (N * G,) statistics out, compute dtype
    eps,                                       # fp32 scalar (its rounding moves rstd by < 3e-8 relative)
    G, C, CPG, S,                              # groups, channels, channels per group, spatial size
    sxn, sxc, sxs, syn, syc, sys,              # strides of x and y in (N, C, S)
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, _, n, _, _ = _program(G, S, S)
    _, c, cmask = _channels(pid, 0, G, CPG, BLOCK_C)
    s, mask = _tile(cmask, 0, S, BLOCK_S)
    x = _load(x_ptr, n, c, s, mask, sxn, sxc, sxs, ACC)
    mean = tl.sum(x) / (CPG * S)
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d) / (CPG * S) + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    _, _, A, B, _ = _fold(pid, 0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                          HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
    _apply_store(y_ptr, x, A, B, n, c, s, mask, syn, syc, sys, SILU)


@triton.jit
def _group_norm_fwd_partial_kernel(
    x_ptr,                                     # (N, C, S) input
    mean_part_ptr, m2_part_ptr,                # (N * G, SPLIT) per-chunk mean and sum of squared deviations
    G, CPG, S, CHUNK, SPLIT,                   # CHUNK spatial positions per program, SPLIT chunks per group
    sxn, sxc, sxs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, k, n, s_lo, s_hi = _program(G, S, CHUNK)
    count, mean, m2 = tl.full((), 0.0, ACC), tl.full((), 0.0, ACC), tl.full((), 0.0, ACC)
    for c0 in range(0, CPG, BLOCK_C):
        _, c, cmask = _channels(pid, c0, G, CPG, BLOCK_C)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, mask = _tile(cmask, s0, s_hi, BLOCK_S)
            x = _load(x_ptr, n, c, s, mask, sxn, sxc, sxs, ACC)
            # Exact two-pass mean / M2 of the tile, then Chan et al. (1979) pairwise merge into the running pair.
            t_count = (tl.minimum(CPG - c0, BLOCK_C) * tl.minimum(s_hi - s0, BLOCK_S)).to(ACC)
            t_mean = tl.sum(x) / t_count
            d = tl.where(mask, x - t_mean, 0.0)
            t_m2 = tl.sum(d * d)
            new_count = count + t_count
            delta = t_mean - mean
            mean += delta * (t_count / new_count)
            m2 += t_m2 + delta * delta * (count * t_count / new_count)
            count = new_count
    tl.store(mean_part_ptr + pid * SPLIT + k, mean)
    tl.store(m2_part_ptr + pid * SPLIT + k, m2)


@triton.jit
def _group_norm_fwd_finalize_kernel(
    mean_part_ptr, m2_part_ptr,                # (N * G, SPLIT) partials from the partial kernel
    mean_ptr, rstd_ptr,                        # (N * G,) out
    eps,                                       # fp32 scalar
    CPG, S, CHUNK, SPLIT,
    BLOCK_SPLIT: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    k = tl.arange(0, BLOCK_SPLIT)
    kmask = k < SPLIT
    counts = tl.where(kmask, (tl.minimum(k * CHUNK + CHUNK, S) - k * CHUNK) * CPG, 0).to(ACC)
    means = tl.load(mean_part_ptr + pid * SPLIT + k, mask=kmask, other=0.0)
    m2s = tl.load(m2_part_ptr + pid * SPLIT + k, mask=kmask, other=0.0)
    total = CPG * S
    mean = tl.sum(counts * means, axis=0) / total
    dm = means - mean
    m2 = tl.sum(m2s + counts * dm * dm, axis=0)  # M2 = sum_k M2_k + n_k (mean_k - mean)^2 (parallel variance)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(m2 / total + eps))


@triton.jit
def _group_norm_fwd_apply_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # as in the fused kernel
    G, C, CPG, S, CHUNK,
    sxn, sxc, sxs, syn, syc, sys,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, k, n, s_lo, s_hi = _program(G, S, CHUNK)
    mean, rstd = tl.load(mean_ptr + pid), tl.load(rstd_ptr + pid)
    for c0 in range(0, CPG, BLOCK_C):
        c, cmask, A, B, _ = _fold(pid, c0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, mask = _tile(cmask, s0, s_hi, BLOCK_S)
            x = _load(x_ptr, n, c, s, mask, sxn, sxc, sxs, ACC)
            _apply_store(y_ptr, x, A, B, n, c, s, mask, syn, syc, sys, SILU)


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
    G, C, CPG, S,
    sdn, sdc, sds, sxn, sxc, sxs, sgn, sgc, sgs,  # strides of dy, x, dx
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, _, n, _, _ = _program(G, S, S)
    mean, rstd = tl.load(mean_ptr + pid), tl.load(rstd_ptr + pid)
    c, cmask, A, B, gamma = _fold(pid, 0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
    s, mask = _tile(cmask, 0, S, BLOCK_S)
    x, du = _bwd_tile(dy_ptr, x_ptr, A, B, n, c, s, mask, sdn, sdc, sds, sxn, sxc, sxs, SILU, ACC)
    xhat = (x - mean) * rstd
    p1, p2 = tl.sum(du, axis=1), tl.sum(du * xhat, axis=1)
    tl.store(p1_ptr + n * C + c, p1, mask=cmask)
    tl.store(p2_ptr + n * C + c, p2, mask=cmask)
    c1, c2 = tl.sum(gamma * p1, axis=0) / (CPG * S), tl.sum(gamma * p2, axis=0) / (CPG * S)
    dx = rstd * (gamma[:, None] * du - c1 - xhat * c2)
    tl.store(_ptrs(dx_ptr, n, c, s, sgn, sgc, sgs), dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_bwd_partial_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # as in the fused backward
    p1_part_ptr, p2_part_ptr,                  # (N, C, SPLIT) out: P1, P2 over one chunk of space
    G, C, CPG, S, CHUNK, SPLIT,
    sdn, sdc, sds, sxn, sxc, sxs,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, k, n, s_lo, s_hi = _program(G, S, CHUNK)
    mean, rstd = tl.load(mean_ptr + pid), tl.load(rstd_ptr + pid)
    for c0 in range(0, CPG, BLOCK_C):
        c, cmask, A, B, _ = _fold(pid, c0, n, mean, rstd, G, C, CPG, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, ACC)
        p1, p2 = tl.full([BLOCK_C], 0.0, ACC), tl.full([BLOCK_C], 0.0, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, mask = _tile(cmask, s0, s_hi, BLOCK_S)
            x, du = _bwd_tile(dy_ptr, x_ptr, A, B, n, c, s, mask, sdn, sdc, sds, sxn, sxc, sxs, SILU, ACC)
            p1 += tl.sum(du, axis=1)
            p2 += tl.sum(du * ((x - mean) * rstd), axis=1)
        tl.store(p1_part_ptr + (n * C + c) * SPLIT + k, p1, mask=cmask)
        tl.store(p2_part_ptr + (n * C + c) * SPLIT + k, p2, mask=cmask)


@triton.jit
def _group_norm_bwd_dx_kernel(
    dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # as in the fused backward
    p1_ptr, p2_ptr,                            # (N, C) totals of P1, P2
    G, C, CPG, S, CHUNK,
    sdn, sdc, sds, sxn, sxc, sxs, sgn, sgc, sgs,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
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
            s, mask = _tile(cmask, s0, s_hi, BLOCK_S)
            x, du = _bwd_tile(dy_ptr, x_ptr, A, B, n, c, s, mask, sdn, sdc, sds, sxn, sxc, sxs, SILU, ACC)
            dx = rstd * (gamma[:, None] * du - c1 - (x - mean) * rstd * c2)
            tl.store(_ptrs(dx_ptr, n, c, s, sgn, sgc, sgs), dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers.

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_SM_COUNT = {}


def out_format(x: torch.Tensor) -> torch.memory_format:
    """Layout of y and dx: channels_last when x is (only) channels_last, else contiguous."""
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


def _target_programs(device: torch.device) -> int:
    """Programs needed to fill the device: two per SM on CUDA; one on CPU (the interpreter runs them serially)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


def _plan(N: int, G: int, CPG: int, S: int, chunk: int, device, max_tile: int):
    """None for the fused path (whole group in one tile), else (chunk, split, BLOCK_C, BLOCK_S) of the split path.

    ``chunk`` > 0 forces the split path with that many spatial positions per program."""
    full_c, full_s = triton.next_power_of_2(CPG), triton.next_power_of_2(S)
    if chunk <= 0:
        splits = min(triton.cdiv(_target_programs(device), N * G), triton.cdiv(CPG * S, MIN_SPLIT_ELEMS))
        if splits <= 1 and full_c * full_s <= max_tile:
            return None
        chunk = triton.cdiv(S, max(splits, 1))
    chunk = max(chunk, triton.cdiv(S, MAX_SPLIT))
    block_c = min(full_c, 1024)
    block_s = min(triton.next_power_of_2(min(chunk, S)), max(max_tile // block_c, 1))
    return chunk, triton.cdiv(S, chunk), block_c, block_s


def _params(x3, weight, bias, scale, shift):
    """Contiguous parameter tensors (x3 stands in for absent ones) and the matching HAS_* flags."""
    tensors = [t.contiguous() if t is not None else x3 for t in (weight, bias, scale, shift)]
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
                 HAS_SHIFT=shift is not None)
    return tensors, flags


def group_norm_fwd(x, num_groups: int, weight, bias, eps: float, scale, shift, silu: bool, chunk: int = 0):
    """y = act((GN(x) * weight + bias) * (1 + scale) + shift). Returns (y, mean, rstd); y has x's dtype and
    layout (see ``out_format``), mean and rstd are (N, G) in fp32 (fp64 for fp64 x)."""
    N, C = x.shape[:2]
    G, CPG = num_groups, x.shape[1] // num_groups
    x3 = x.reshape(N, C, -1)  # a view for contiguous / channels_last x
    S = x3.shape[2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty_like(x, memory_format=out_format(x))
    y3 = y.view(N, C, S)
    mean = torch.empty((N, G), dtype=acc, device=x.device)
    rstd = torch.empty_like(mean)
    params, flags = _params(x3, weight, bias, scale, shift)
    meta = dict(**flags, SILU=silu, ACC=compute_dtype(x))
    plan = _plan(N, G, CPG, S, chunk, x.device, MAX_FUSED_SIZE)
    if plan is None:
        bc, bs = triton.next_power_of_2(CPG), triton.next_power_of_2(S)
        _group_norm_fwd_fused_kernel[(N * G,)](
            x3, y3, *params, mean, rstd, eps, G, C, CPG, S, *x3.stride(), *y3.stride(),
            BLOCK_C=bc, BLOCK_S=bs, num_warps=num_warps(bc * bs), **meta)
        return y, mean, rstd
    chunk, split, bc, bs = plan
    mean_part, m2_part = torch.empty((2, N * G, split), dtype=acc, device=x.device)  # two contiguous halves
    _group_norm_fwd_partial_kernel[(N * G, split)](
        x3, mean_part, m2_part, G, CPG, S, chunk, split, *x3.stride(),
        BLOCK_C=bc, BLOCK_S=bs, ACC=meta["ACC"], num_warps=num_warps(bc * bs))
    block_split = block_size(split, cap=MAX_SPLIT, floor=1)
    _group_norm_fwd_finalize_kernel[(N * G,)](
        mean_part, m2_part, mean, rstd, eps, CPG, S, chunk, split,
        BLOCK_SPLIT=block_split, ACC=meta["ACC"], num_warps=num_warps(block_split))
    _group_norm_fwd_apply_kernel[(N * G, split)](
        x3, y3, *params, mean, rstd, G, C, CPG, S, chunk, *x3.stride(), *y3.stride(),
        BLOCK_C=bc, BLOCK_S=bs, num_warps=num_warps(bc * bs), **meta)
    return y, mean, rstd


def group_norm_bwd(dy, x, mean, rstd, weight, bias, scale, shift, silu: bool, chunk: int = 0):
    """Returns (dx, P1, P2): dx in x's dtype and layout, and the per-(n, c) sums P1 = sum_s du and
    P2 = sum_s du * xhat ((N, C), fp32 or fp64) from which the caller forms the parameter gradients."""
    N, C = x.shape[:2]
    G = mean.shape[1]
    CPG = C // G
    x3, dy3 = x.reshape(N, C, -1), dy.reshape(N, C, -1)
    S = x3.shape[2]
    dx = torch.empty_like(x, memory_format=out_format(x))
    dx3 = dx.view(N, C, S)
    params, flags = _params(x3, weight, bias, scale, shift)
    meta = dict(**flags, SILU=silu, ACC=compute_dtype(x))
    strides = (*dy3.stride(), *x3.stride())
    plan = _plan(N, G, CPG, S, chunk, x.device, MAX_TILE_BWD)
    if plan is None:
        p1 = torch.empty((N, C), dtype=mean.dtype, device=x.device)
        p2 = torch.empty_like(p1)
        bc, bs = triton.next_power_of_2(CPG), triton.next_power_of_2(S)
        _group_norm_bwd_fused_kernel[(N * G,)](
            dy3, x3, dx3, *params, mean, rstd, p1, p2, G, C, CPG, S, *strides, *dx3.stride(),
            BLOCK_C=bc, BLOCK_S=bs, num_warps=num_warps(bc * bs), **meta)
        return dx, p1, p2
    chunk, split, bc, bs = plan
    p1_part, p2_part = torch.empty((2, N, C, split), dtype=mean.dtype, device=x.device)
    _group_norm_bwd_partial_kernel[(N * G, split)](
        dy3, x3, *params, mean, rstd, p1_part, p2_part, G, C, CPG, S, chunk, split, *strides,
        BLOCK_C=bc, BLOCK_S=bs, num_warps=num_warps(bc * bs), **meta)
    p1, p2 = p1_part.sum(-1), p2_part.sum(-1)  # fixed-order reduction over chunks: deterministic
    _group_norm_bwd_dx_kernel[(N * G, split)](
        dy3, x3, dx3, *params, mean, rstd, p1, p2, G, C, CPG, S, chunk, *strides, *dx3.stride(),
        BLOCK_C=bc, BLOCK_S=bs, num_warps=num_warps(bc * bs), **meta)
    return dx, p1, p2
