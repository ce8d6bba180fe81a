"""Non-causal flash attention (FlashAttention-2, Dao 2023) for U-Net token maps: any L >= 1, head dim <= 256.

Forward, per (batch*head, block of BLOCK_M queries): stream keys/values in blocks of BLOCK_N with an online softmax
(running max m and sum l, FA2 Alg. 1), never materialising the L x L matrix, and save the row log-sum-exp. When all
keys fit one block (L <= BLOCK_N, e.g. the 8x8 = 64-token level) a single-tile path skips the rescaling.
Backward (FA2 Alg. 2): a preprocess kernel computes delta_i = sum_d dO_id O_id; a dK/dV kernel per key block loops
over query blocks. Two schedules for dQ: the fast one (FA2's, 5 matmuls) adds each key block's share dS K to an
fp32 (fp64) dQ buffer with atomics from the dK/dV kernel (the preprocess zeroes it); the deterministic one runs a
separate dQ kernel per query block that recomputes P and dP (7 matmuls), every output element written by exactly
one program, bit-identical run to run. A forward-with-tangent kernel (sCM App. F) serves forward-mode AD
(``attention_fwd_jvp``).

Conventions shared by the kernels:
- Softmax in base 2: s2 = (q.k) * scale * log2(e), p = 2^(s2 - lse2), so exp2 replaces exp (cheaper on GPUs).
  ``lse`` holds lse2 = log2 sum_j 2^(s2_ij), in fp32 (fp64 for fp64 inputs).
- Python float arguments reach kernels as fp32. A scale is therefore passed as two fp32 numbers (hi + lo) whose sum,
  formed in the compute dtype, is exact to ~1e-14: fp64 gradcheck and fp64 reference comparisons need it.
- Tails: query rows >= Lq, key rows >= Lk and head dims >= D are masked on load (zeros) and masked keys get score
  -inf, so any L and any D <= BLOCK_D work; BLOCK_D = next power of two >= max(D, 16).
- Dot operands use the input dtype on GPUs (fp16/bf16 tensor cores; fp32 on TF32 tensor cores when torch allows
  TF32 matmuls, "ieee" FMA otherwise: ``dot_precision``); under the interpreter bf16 is upcast to fp32 first (it
  computes bf16 wrongly). Accumulation, softmax and lse are fp32 (fp64 for fp64).
- Autotuning: configs whose shared memory (``shared_bytes``, an upper bound the compile gate checks against what
  Triton allocates on sm_80 and sm_90) exceeds the device's per-block limit are pruned before tuning; the key buckets
  Lq and Lk to powers of two.
- q, k, v, o and their gradients are read/written through 4 strides each (batch, head, token, dim), so views of a
  packed qkv or of an NCHW map need no copies.
"""
import math
import warnings

import torch
import triton
import triton.language as tl

from ._utils import (INTERPRET, accumulate_dtype, compute_dtype, fp32_matmul_precision, pin_launch_options,
                     shared_memory_limit)

LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 256  # FA2's limit; every config the prune hook keeps fits sm_80's and sm_90's shared memory there


def _split_fp32(x: float):
    """x as hi + lo, both exactly representable in fp32 (so fp32 kernel arguments lose nothing in fp64)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def _configs(blocks, interpret_block):
    """Autotune configs on a GPU; under the interpreter exactly one (several crash: "0 active drivers"). The
    interpreter costs per op, not per element, so it gets large blocks (fewer loop steps and programs)."""
    if INTERPRET:
        return [triton.Config(interpret_block, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks]


def shared_bytes(kernel: str, config: triton.Config, block_d: int, dot_bytes: int) -> int:
    """Upper bound of the dynamic shared memory of ``kernel`` ("fwd", "dkdv", "dkdv_atomic", "dq", "jvp") at
    ``config``: the tiles a program keeps for its whole life once, the tiles it streams per loop step once per
    pipeline stage, plus one fp32 (BLOCK_M x BLOCK_N) layout-conversion scratch. The compile gate checks that it
    bounds what Triton allocates for every config on sm_80 and sm_90 (tests/test_gpu_compile.py), so pruning by it
    happens before compiling."""
    m, n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    tiles = {"fwd": (m, 2 * n), "dkdv": (2 * n, 2 * m), "dkdv_atomic": (3 * n, 2 * m), "dq": (2 * m, 2 * n),
             "jvp": (2 * m, 4 * n)}
    resident, streamed = tiles[kernel]
    extra = 0
    if kernel.startswith("dkdv"):
        # q and dO feed dots in two layouts (k q^T and dS^T q): a second copy unpipelined; the fp32 rows of
        # log-sum-exp and delta are pipelined with them (8 B per query row per stage).
        stages = max(stages, 2)
        extra += 8 * m * stages
    if kernel == "dkdv_atomic":
        # The fast schedule's dK/dV kernel also keeps k in the B-operand layout of dQ += dS^T K and converts dS^T
        # (in the dot dtype) and one more fp32 tile through shared memory, plus barriers; on sm_90 its wgmma path
        # instead stages half a (BLOCK_N x D) k tile. Sized on the compile gate's measurements: 213,504 B for bf16,
        # D 256, BLOCK_M 32, BLOCK_N 64, 3 stages and 147,584 B at BLOCK_M 16, 2 stages (sm_90).
        extra += max((dot_bytes + 4) * m * n + 1024, dot_bytes * n * block_d // 2 + 256)
    return dot_bytes * block_d * (resident + stages * streamed) + 4 * m * n + extra


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        """Drop configs whose blocks exceed the sequence (pure masked work at L = 64) and, on a GPU (or for the
        compile gate's target), configs whose shared memory cannot fit one block; keep the smallest if none fit
        the sequence, raise if none fits the shared memory."""
        limit = shared_memory_limit(named_args["Q"].device)
        kind = kernel + ("_atomic" if kwargs.get("ATOMIC_DQ") else "")
        if limit is not None:
            dot_bytes = max(2, kwargs["DOT"].primitive_bitwidth // 8) if "DOT" in kwargs else 4
            fits = [c for c in configs if shared_bytes(kind, c, kwargs["BLOCK_D"], dot_bytes) <= limit]
            if not fits:
                raise ValueError(f"no attention config fits {limit} B of shared memory at head dim "
                                 f"{kwargs['BLOCK_D']}")
            configs = fits
        smallest_m = min(c.kwargs["BLOCK_M"] for c in configs)
        smallest_n = min(c.kwargs["BLOCK_N"] for c in configs)
        cap_m = max(smallest_m, triton.next_power_of_2(named_args["Lq"]))
        cap_n = max(smallest_n, triton.next_power_of_2(named_args["Lk"]))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
        return kept or sorted(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:1]
    return prune


# (BLOCK_M, BLOCK_N, num_warps, num_stages). The 8-warp small tiles serve head dims up to 256 (FA2 runs 8 warps
# there): they halve the accumulator registers per thread. The unpipelined (16, 16) tile is the one that fits fp32
# at head dim 256 within 99 KB (sm_86/sm_89) for every kernel. The prune hook drops those that cannot fit.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 2),
                         (32, 64, 4, 2), (16, 64, 4, 2), (16, 32, 2, 2), (64, 32, 8, 2), (32, 32, 4, 2),
                         (16, 16, 4, 1)],
                        {"BLOCK_M": 64, "BLOCK_N": 64})
_DKDV_BLOCKS = [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2), (16, 32, 2, 2),
                (16, 32, 4, 2), (32, 32, 8, 2), (16, 64, 8, 2), (16, 16, 4, 1)]
_DKDV_CONFIGS = _configs(_DKDV_BLOCKS, {"BLOCK_M": 64, "BLOCK_N": 64})
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2),
                        (16, 32, 2, 2), (32, 32, 4, 2), (64, 32, 8, 2), (16, 16, 4, 1)],
                       {"BLOCK_M": 64, "BLOCK_N": 64})
# Sequence lengths bucketed to the next power of two (Lq_key, Lk_key), so that varying lengths do not re-tune; the
# tile width and dot precision decide which configs fit, so they are part of the key (dtypes are added by Triton).
_KEY = ["Lq_key", "Lk_key", "BLOCK_D", "PRECISION"]


@triton.jit
def _join(hi, lo, ACC: tl.constexpr):
    """hi + lo formed in the compute dtype (both are fp32 kernel arguments)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _tile_ptrs(base, offs_l, offs_d, stride_l, stride_d):
    return base + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d


@triton.jit
def _block(L, H, BLOCK: tl.constexpr):
    """This program's (batch*head) index bh = b * H + h and its BLOCK rows of a length-L sequence (grid of
    cdiv(L, BLOCK) * B * H programs, the row blocks of one (b, h) adjacent)."""
    num = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    bh = (pid // num).to(tl.int64)
    return bh, bh // H, bh % H, (pid % num) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, rows, offs_d, mask_d, sql, sqd, sdol, sdod, Lq, DOT: tl.constexpr):
    """q, dO (as DOT), lse, delta of query rows ``rows`` (masked rows load 0) and the (rows, d) mask. Q and DO
    point at the (b, h) slice, LSE and DELTA at the (b, h) row."""
    mask_m = rows < Lq
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(_tile_ptrs(Q, rows, offs_d, sql, sqd), mask=mask_md, other=0).to(DOT)
    do = tl.load(_tile_ptrs(DO, rows, offs_d, sdol, sdod), mask=mask_md, other=0).to(DOT)
    lse = tl.load(LSE + rows, mask=mask_m, other=0)
    delta = tl.load(DELTA + rows, mask=mask_m, other=0)
    return q, do, lse, delta, mask_md


@triton.jit
def _key_rows(K, V, cols, offs_d, mask_d, skl, skd, svl, svd, Lk, DOT: tl.constexpr):
    """k, v (as DOT) of key rows ``cols`` (masked rows load 0), the key mask and the (cols, d) mask. K and V point
    at the (b, h) slice."""
    mask_n = cols < Lk
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(_tile_ptrs(K, cols, offs_d, skl, skd), mask=mask_nd, other=0).to(DOT)
    v = tl.load(_tile_ptrs(V, cols, offs_d, svl, svd), mask=mask_nd, other=0).to(DOT)
    return k, v, mask_n, mask_nd


@triton.jit
def _probs_ds(a, b, c, d, lse, delta, qk_scale, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """P = 2^(a b^T * qk_scale - lse), recomputed from the saved lse, and dP - delta = c d^T - delta, so that
    dS = P * (dP - delta) (FA2 Alg. 2). The dQ kernel passes (q, k, do, v) with lse and delta as columns, the
    dK/dV kernel the transposed problem (k, q, v, do) with them as rows: each gets its own layout."""
    p = tl.exp2(tl.dot(a, tl.trans(b), input_precision=PRECISION, out_dtype=ACC) * qk_scale - lse)
    dp = tl.dot(c, tl.trans(d), input_precision=PRECISION, out_dtype=ACC)
    return p, dp - delta


@triton.jit
def _store_tile(ptr, acc, offs_l, offs_d, stride_l, stride_d, mask):
    """Store an accumulator tile in ptr's dtype."""
    tl.store(_tile_ptrs(ptr, offs_l, offs_d, stride_l, stride_d), acc.to(ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.heuristics({"SINGLE_TILE": lambda a: a["Lk"] <= a["BLOCK_N"]})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O,        # (B, H, L, D) views, any strides; O is written in Q's dtype
    LSE,               # (B, H, Lq) contiguous, base-2 log-sum-exp per query row
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    H, Lq, Lk, D,
    qk_scale_hi, qk_scale_lo,  # scale * log2(e) as fp32 hi + lo
    Lq_key, Lk_key,    # next powers of two of Lq, Lk: the autotune key (one tuning per bucket), unused inside
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_TILE: tl.constexpr,
    DOT: tl.constexpr,  # dtype of tl.dot operands
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", or "tf32" for fp32 when torch allows TF32
    ACC: tl.constexpr,  # accumulation dtype, tl.float32 or tl.float64
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)  # tl.dot tiles on GPUs
    bh, b, h, offs_m = _block(Lq, H, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < Lq, offs_d < D
    q = tl.load(_tile_ptrs(Q + b * sqb + h * sqh, offs_m, offs_d, sql, sqd),
                mask=mask_m[:, None] & mask_d[None, :], other=0).to(DOT)
    qk_scale = _join(qk_scale_hi, qk_scale_lo, ACC)
    K += b * skb + h * skh
    V += b * svb + h * svh
    if SINGLE_TILE:
        # All keys in one block: a plain softmax, no running-max rescale.
        mask_n = offs_n < Lk
        k = tl.load(_tile_ptrs(K, offs_n, offs_d, skl, skd), mask=mask_n[:, None] & mask_d[None, :], other=0)
        s = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION, out_dtype=ACC) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_i = tl.max(s, 1)
        p = tl.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        v = tl.load(_tile_ptrs(V, offs_n, offs_d, svl, svd), mask=mask_n[:, None] & mask_d[None, :], other=0)
        acc = tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION, out_dtype=ACC)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_M], ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        for start_n in range(0, Lk, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < Lk
            k = tl.load(_tile_ptrs(K, cols, offs_d, skl, skd), mask=mask_n[:, None] & mask_d[None, :], other=0)
            s = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION, out_dtype=ACC) * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            # Online softmax (FA2 Alg. 1): every block holds >= 1 real key, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(_tile_ptrs(V, cols, offs_d, svl, svd), mask=mask_n[:, None] & mask_d[None, :], other=0)
            acc = tl.dot(p.to(DOT), v.to(DOT), acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
            m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(_tile_ptrs(O + b * sob + h * soh, offs_m, offs_d, sol, sod), acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,             # (B, H, Lq, D) views, any strides
    DELTA,             # (B, H, Lq) contiguous: delta_i = sum_d dO_id * O_id (FA2 Alg. 2 line 4)
    DQ,                # (B, H, Lq, D) view of the fast schedule's dQ accumulator, zeroed here (unused unless ZERO_DQ)
    sob, soh, sol, sod, sdb, sdh, sdl, sdd, sdqb, sdqh, sdql, sdqd,
    H, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, ZERO_DQ: tl.constexpr,
):
    bh, b, h, offs_m = _block(Lq, H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(_tile_ptrs(O + b * sob + h * soh, offs_m, offs_d, sol, sod), mask=mask, other=0).to(ACC)
    do = tl.load(_tile_ptrs(DO + b * sdb + h * sdh, offs_m, offs_d, sdl, sdd), mask=mask, other=0).to(ACC)
    tl.store(DELTA + bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)
    if ZERO_DQ:
        _store_tile(DQ + b * sdqb + h * sdqh, tl.zeros([BLOCK_M, BLOCK_D], ACC), offs_m, offs_d, sdql, sdqd, mask)


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY + ["ATOMIC_DQ"],
                 prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV,  # (B, H, L, D) views, any strides (DK, DV written in K's and V's dtype)
    DQ,                   # (B, H, Lq, D) view of the zeroed dQ accumulator, ACC dtype (unused unless ATOMIC_DQ)
    LSE, DELTA,           # (B, H, Lq) contiguous, from the forward and the preprocess kernel
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    sdob, sdoh, sdol, sdod, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd, sdqb, sdqh, sdql, sdqd,
    H, Lq, Lk, D,
    qk_scale_hi, qk_scale_lo,  # scale * log2(e) as fp32 hi + lo
    scale_hi, scale_lo,        # scale as fp32 hi + lo
    Lq_key, Lk_key,            # autotune key only (see the forward)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,   # the fast schedule: also add scale * dS K of this key block to DQ with atomics
):
    # One program per block of BLOCK_N keys: dV = P^T dO, dK = scale * dS^T Q with dS = P * (dP - delta),
    # dP = dO V^T (FA2 Alg. 2), accumulated over all query blocks in registers and stored once. With ATOMIC_DQ,
    # dQ_i += scale * dS_ij K_j for every query block i (FA2 Alg. 2 line 21, atomic across key blocks).
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    scale = _join(scale_hi, scale_lo, ACC)
    bh, b, h, offs_n = _block(Lk, H, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k, v, mask_n, mask_nd = _key_rows(K + b * skb + h * skh, V + b * svb + h * svh, offs_n, offs_d, mask_d,
                                      skl, skd, svl, svd, Lk, DOT)
    qk_scale = _join(qk_scale_hi, qk_scale_lo, ACC)
    Q += b * sqb + h * sqh
    DO += b * sdob + h * sdoh
    LSE += bh * Lq
    DELTA += bh * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, Lq, BLOCK_M):
        # (Distinct names for unused results: Triton refuses a loop-carried name whose type changes in the loop.)
        q, do, lse, delta, mask_md = _query_rows(Q, DO, LSE, DELTA, start_m + offs_m, offs_d, mask_d,
                                                 sql, sqd, sdol, sdod, Lq, DOT)
        # Transposed (BLOCK_N, BLOCK_M) tiles. No mask needed: padded query rows load q = dO = lse = delta = 0, so
        # p = 1 and dS = 0 there and they add nothing; padded key rows only reach rows of dK/dV never stored.
        p_t, dpd_t = _probs_ds(k, q, v, do, lse[None, :], delta[None, :], qk_scale, PRECISION, ACC)
        if ATOMIC_DQ:
            # dQ does read padded key rows: their 2^(0 - lse) may overflow (see the dQ kernel), so zero them.
            p_t = tl.where(mask_n[:, None], p_t, 0.0)
        ds_t = p_t * dpd_t
        dv = tl.dot(p_t.to(DOT), do, dv, input_precision=PRECISION, out_dtype=ACC)
        dk = tl.dot(ds_t.to(DOT), q, dk, input_precision=PRECISION, out_dtype=ACC)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(DOT)), k, input_precision=PRECISION, out_dtype=ACC) * scale
            tl.atomic_add(_tile_ptrs(DQ + b * sdqb + h * sdqh, start_m + offs_m, offs_d, sdql, sdqd), dq,
                          mask=mask_md, sem="relaxed")
    dk = dk * scale
    _store_tile(DK + b * sdkb + h * sdkh, dk, offs_n, offs_d, sdkl, sdkd, mask_nd)
    _store_tile(DV + b * sdvb + h * sdvh, dv, offs_n, offs_d, sdvl, sdvd, mask_nd)


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ,      # (B, H, L, D) views, any strides (DQ written in Q's dtype)
    LSE, DELTA,           # (B, H, Lq) contiguous
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    sdob, sdoh, sdol, sdod, sdqb, sdqh, sdql, sdqd,
    H, Lq, Lk, D,
    qk_scale_hi, qk_scale_lo, scale_hi, scale_lo,
    Lq_key, Lk_key,            # autotune key only (see the forward)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # One program per block of BLOCK_M queries: dQ = scale * dS K, looping over key blocks (FA2 Alg. 2).
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    bh, b, h, offs_m = _block(Lq, H, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q, do, lse, delta, mask_md = _query_rows(Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + bh * Lq,
                                             DELTA + bh * Lq, offs_m, offs_d, mask_d, sql, sqd, sdol, sdod, Lq, DOT)
    qk_scale = _join(qk_scale_hi, qk_scale_lo, ACC)
    K += b * skb + h * skh
    V += b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, Lk, BLOCK_N):
        k, v, mask_n, _ = _key_rows(K, V, start_n + offs_n, offs_d, mask_d, skl, skd, svl, svd, Lk, DOT)
        p, dpd = _probs_ds(q, k, do, v, lse[:, None], delta[:, None], qk_scale, PRECISION, ACC)
        # Padded keys must be masked: their score is 0, and 2^(0 - lse) overflows when all real scores are very
        # negative; inf * (zero k row) would be NaN.
        p = tl.where(mask_n[None, :], p, 0.0)
        dq = tl.dot((p * dpd).to(DOT), k, dq, input_precision=PRECISION, out_dtype=ACC)
    dq = dq * _join(scale_hi, scale_lo, ACC)
    _store_tile(DQ + b * sdqb + h * sdqh, dq, offs_m, offs_d, sdql, sdqd, mask_md)



# Forward with its tangent in one pass (sCM App. F). With S = s Q K^T, P = softmax(S),
# O = P V and the tangent S' = s (Q' K^T + Q K'^T), the closed form O' = P V' + (P * S') V - rowsum(P * S') O becomes,
# per query tile, three more accumulators rescaled by alpha = 2^(m_old - m_new) exactly like l and O~:
#     A~ = sum p V',   B~ = sum (p * S') V,   r = sum_j p * S',     O' = (A~ + B~ - r O) / l,  O = O~ / l.
_JVP_CONFIGS = _configs([(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2),
                         (16, 32, 2, 2), (64, 32, 8, 2), (16, 16, 4, 1)], {"BLOCK_M": 64, "BLOCK_N": 64})


@triton.autotune(configs=_JVP_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner("jvp")})
@triton.jit
def _attn_fwd_jvp_kernel(
    Q, K, V, TQ, TK, TV, O, TO,  # (B, H, L, D) views, any strides; O, TO written in Q's dtype
    LSE,                         # (B, H, Lq) contiguous, base-2 log-sum-exp per query row
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    stqb, stqh, stql, stqd, stkb, stkh, stkl, stkd, stvb, stvh, stvl, stvd,
    sob, soh, sol, sod, stob, stoh, stol, stod,
    H, Lq, Lk, D,
    qk_scale_hi, qk_scale_lo,    # scale * log2(e) as fp32 hi + lo (scores, base 2)
    scale_hi, scale_lo,          # scale as fp32 hi + lo (the tangent S' is in natural units)
    Lq_key, Lk_key,              # autotune key only (see the forward)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    bh, b, h, offs_m = _block(Lq, H, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < Lq, offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(_tile_ptrs(Q + b * sqb + h * sqh, offs_m, offs_d, sql, sqd), mask=mask_md, other=0).to(DOT)
    tq = tl.load(_tile_ptrs(TQ + b * stqb + h * stqh, offs_m, offs_d, stql, stqd), mask=mask_md, other=0).to(DOT)
    qk_scale = _join(qk_scale_hi, qk_scale_lo, ACC)
    scale = _join(scale_hi, scale_lo, ACC)
    K += b * skb + h * skh
    V += b * svb + h * svh
    TK += b * stkb + h * stkh
    TV += b * stvb + h * stvh
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    r_i = tl.zeros([BLOCK_M], ACC)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    acc_a = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    acc_b = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, Lk, BLOCK_N):
        k, v, mask_n, mask_nd = _key_rows(K, V, start_n + offs_n, offs_d, mask_d, skl, skd, svl, svd, Lk, DOT)
        tk, tv, _mask_n, _mask_nd = _key_rows(TK, TV, start_n + offs_n, offs_d, mask_d, stkl, stkd, stvl, stvd,
                                              Lk, DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        ts = tl.dot(tq, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        ts = tl.dot(q, tl.trans(tk), ts, input_precision=PRECISION, out_dtype=ACC) * scale  # 0 on padded keys
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds >= 1 real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        pts = p * ts
        l_i = l_i * alpha + tl.sum(p, 1)
        r_i = r_i * alpha + tl.sum(pts, 1)
        acc_o = tl.dot(p.to(DOT), v, acc_o * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        acc_a = tl.dot(p.to(DOT), tv, acc_a * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        acc_b = tl.dot(pts.to(DOT), v, acc_b * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
    o = acc_o / l_i[:, None]
    to = (acc_a + acc_b) / l_i[:, None] - (r_i / l_i)[:, None] * o
    _store_tile(O + b * sob + h * soh, o, offs_m, offs_d, sol, sod, mask_md)
    _store_tile(TO + b * stob + h * stoh, to, offs_m, offs_d, stol, stod, mask_md)
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.log2(l_i), mask=mask_m)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: tensors in, tensors out. Shapes are (B, H, L, D) views with any strides.

def _dot_dtype(x: torch.Tensor):
    """tl.dot operand dtype: the input's on GPUs; fp32 for bf16 under the interpreter (its bf16 dot is wrong)."""
    if x.dtype == torch.bfloat16:
        return tl.float32 if INTERPRET else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32, torch.float64: tl.float64}[x.dtype]


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot input_precision for x's dtype. fp32 follows torch's own cuBLAS matmul setting: TF32 tensor cores when
    torch allows them (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which
    ``torch.set_float32_matmul_precision("high")`` and ``allow_tf32 = True`` also set), IEEE fp32 otherwise (the
    default). Other dtypes, and the interpreter, use "ieee"."""
    if x.dtype != torch.float32 or INTERPRET:
        return "ieee"
    return fp32_matmul_precision()


def _meta(q: torch.Tensor):
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be <= {MAX_HEAD_DIM} for the Triton attention kernels, got {D}")
    return dict(BLOCK_D=max(16, triton.next_power_of_2(D)), DOT=_dot_dtype(q), PRECISION=dot_precision(q),
                ACC=compute_dtype(q))


def _keys(Lq: int, Lk: int):
    """The autotune key's sequence lengths: next powers of two (configs are tuned once per bucket)."""
    return triton.next_power_of_2(Lq), triton.next_power_of_2(Lk)


def _grid(length: int, bh: int, block: str):
    return lambda meta: (triton.cdiv(length, meta[block]) * bh,)


def attention_fwd(q, k, v, out, scale: float) -> torch.Tensor:
    """Write softmax(q k^T * scale) v into ``out`` (all (B, H, L, D) views, D <= 256) and return the base-2
    log-sum-exp per query row, (B, H, Lq) in fp32 (fp64 for fp64 inputs)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    lse = torch.empty((B, H, Lq), dtype=accumulate_dtype(q), device=q.device)
    _attn_fwd_kernel[_grid(Lq, B * H, "BLOCK_M")](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Lq, Lk, D, *_split_fp32(scale * LOG2E), *_keys(Lq, Lk), **_meta(q))
    return lse


def atomic_dq_fits(q: torch.Tensor) -> bool:
    """Whether some config of the fast schedule's dK/dV kernel fits the per-block shared memory of q's device (or
    the compile gate's target) at q's head dim and dtype. It does not for fp32 at head dim 256 within the 99 KB of
    sm_86/sm_89, where the deterministic dK/dV kernel still fits."""
    limit = shared_memory_limit(q.device)
    if limit is None:
        return True
    meta = _meta(q)
    dot_bytes = max(2, meta["DOT"].primitive_bitwidth // 8)
    return any(shared_bytes("dkdv_atomic", triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=st),
                            meta["BLOCK_D"], dot_bytes) <= limit for m, n, _, st in _DKDV_BLOCKS)


def attention_bwd(d_out, q, k, v, out, lse, dq, dk, dv, scale: float, deterministic: bool = False) -> None:
    """Write the gradients of attention into ``dq``, ``dk``, ``dv`` given d_out (any strides, including the
    expanded stride-0 gradient of ``.sum()``), the forward's ``out`` and ``lse``. ``deterministic=False``: the fast
    schedule (5 matmuls; dQ accumulated with atomics, so its last bits vary run to run on a GPU); True: the separate
    dQ kernel (7 matmuls, bit-identical run to run). Where the fast schedule does not fit the shared memory
    (``atomic_dq_fits``), the deterministic one runs, with a warning."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    meta = _meta(q)
    if not deterministic and not atomic_dq_fits(q):
        warnings.warn(f"fastcm attention: the fast (atomic dQ) backward does not fit this GPU's shared memory at "
                      f"head dim {D} in {q.dtype}; using the deterministic backward (7 matmuls instead of 5)",
                      stacklevel=2)
        deterministic = True
    delta = torch.empty((B, H, Lq), dtype=lse.dtype, device=q.device)
    # The fast schedule accumulates dQ in the compute dtype: in dq itself when it has that dtype, else in a buffer.
    dq_acc = dq if deterministic or dq.dtype == lse.dtype else torch.empty(dq.shape, dtype=lse.dtype,
                                                                            device=q.device)
    block_m = max(16, min(64, 4096 // meta["BLOCK_D"]))  # an O and a dO tile of <= 4096 elements each
    _attn_bwd_preprocess_kernel[(triton.cdiv(Lq, block_m) * B * H,)](
        out, d_out, delta, dq_acc, *out.stride(), *d_out.stride(), *dq_acc.stride(), H, Lq, D,
        BLOCK_M=block_m, BLOCK_D=meta["BLOCK_D"], ACC=meta["ACC"], ZERO_DQ=not deterministic)
    scales = (*_split_fp32(scale * LOG2E), *_split_fp32(scale), *_keys(Lq, Lk))
    strides = (*q.stride(), *k.stride(), *v.stride(), *d_out.stride())
    _attn_bwd_dkdv_kernel[_grid(Lk, B * H, "BLOCK_N")](
        q, k, v, d_out, dk, dv, dq_acc, lse, delta, *strides, *dk.stride(), *dv.stride(), *dq_acc.stride(),
        H, Lq, Lk, D, *scales, ATOMIC_DQ=not deterministic, **meta)
    if deterministic:
        _attn_bwd_dq_kernel[_grid(Lq, B * H, "BLOCK_M")](
            q, k, v, d_out, dq, lse, delta, *strides, *dq.stride(), H, Lq, Lk, D, *scales, **meta)
    elif dq_acc is not dq:
        dq.copy_(dq_acc)  # fp16/bf16: one rounding of the fp32 sum


def attention_fwd_jvp(q, k, v, tq, tk, tv, out, tout, scale: float) -> torch.Tensor:
    """Write O = softmax(q k^T * scale) v into ``out`` and its tangent along (tq, tk, tv) into ``tout`` in one pass
    (all (B, H, L, D) views with any strides, D <= 256; tangents shaped like their primals). Returns the base-2
    log-sum-exp per query row, (B, H, Lq) in fp32 (fp64 for fp64 inputs), as attention_fwd does."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    lse = torch.empty((B, H, Lq), dtype=accumulate_dtype(q), device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *tq.stride(), *tk.stride(), *tv.stride(), *out.stride(),
               *tout.stride())
    _attn_fwd_jvp_kernel[_grid(Lq, B * H, "BLOCK_M")](
        q, k, v, tq, tk, tv, out, tout, lse, *strides, H, Lq, Lk, D, *_split_fp32(scale * LOG2E),
        *_split_fp32(scale), *_keys(Lq, Lk), **_meta(q))
    return lse


pin_launch_options(globals())  # every kernel above launches with FP contraction pinned on (_utils)
