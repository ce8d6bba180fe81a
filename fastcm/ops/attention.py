"""Non-causal multi-head self-attention for U-Nets (Vaswani et al. 2017, Eq. 1), flash-style on the Triton path.

    O = softmax(Q K^T * scale) V,        scale = 1 / sqrt(D) unless given

Consistency-model U-Nets attend over small token maps (8x8 = 64 ... 32x32 = 1024 tokens, head dim 32-256). The Triton
path (kernels/attention.py) is FlashAttention-2 (Dao 2023): an online softmax that never materialises the L x L
matrix, the row log-sum-exp saved for backward, and a backward of two schedules: FA2's (dQ added with atomics by the
dK/dV kernel, 5 matmuls, the default) or a deterministic one (a separate dQ kernel, 7 matmuls). Any L >= 1 and any
D <= 256 work (masked tails, padded head-dim block), which the Triton tutorial's kernel does not.

``qkv_attention`` takes the packed output of a 1x1 convolution, (N, 3*C, H, W), and reads q, k, v through strides,
so the U-Net needs no permute/contiguous copies around attention.

This file holds the public ops, their references, validation and dispatch, the registry inputs and the fast-ops
contract declarations; the Triton route (custom ops, autograd and forward-mode rules) is ``_attention_triton.py``.
"""
import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from fastcm._checks import check_bool, check_int, check_real

from . import _describe
from ._attention_triton import out_view, qkv_views, triton_attention, triton_qkv_attention
from ._jvp import has_tangent, split_dual
from ._utils import check_same_device, check_tensor, resolve_impl

# FlashAttention-2's limit, and kernels/attention.py's MAX_HEAD_DIM (the iCT cifar10 preset has one 256-wide head);
# larger head dims go to torch's SDPA instead (documented fallback, see attention()).
MAX_HEAD_DIM = 256
# dtypes the Triton path computes on a GPU; fp64 runs only under the interpreter (for gradcheck on CPU).
TRITON_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, impl: str = "auto",
              deterministic: bool = False) -> Tensor:
    """Non-causal attention ``softmax(q k^T * scale) v`` over the last two dims.

    Args:
        q: (B, H, Lq, D) queries; k, v: (B, H, Lk, D) keys and values (Lk may differ from Lq). One floating dtype
            (fp16, bf16, fp32, fp64) and one device for all three; any strides (views of a packed qkv are read in
            place on the Triton path).
        scale: positive softmax scale; default 1 / sqrt(D).
        impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "torch" (the reference).
        deterministic: the Triton backward's schedule. False (default): FlashAttention-2's, the fastest (5 matmuls
            instead of 7), dQ summed over key blocks with fp32 atomics, so dq's last bits may differ run to run on a
            GPU. True, or whenever ``torch.are_deterministic_algorithms_enabled()`` at backward time: a separate dQ
            kernel, bit-identical run to run. (Also under forward-mode AD.)
    Returns (B, H, Lq, D) in q's dtype. fp16/bf16 inputs are computed with fp32 accumulation and softmax. Under
    ``torch.autocast`` fp32 inputs are first cast to the autocast dtype, as autocast does for SDPA.

    Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) works on every path: the Triton path computes
    the output and its tangent in one kernel pass (sCM App. F); the SDPA fallback runs the reference when a tangent
    is present. Under ``torch.compile`` a tangent on the Triton path raises (compiled ``torch.func.jvp`` drops custom
    jvp rules, pytorch#192985, and would return a wrong tangent); the reference route compiles.

    The Triton path never materialises the L x L scores; its forward is deterministic (no atomics) and, on CUDA,
    its kernels autotune their block sizes on the first call per dtype, head-dim block and power-of-two bucket of
    Lq and Lk.
    fp32 inputs on CUDA use TF32 tensor cores when torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which ``set_float32_matmul_precision("high")`` and
    ``allow_tf32 = True`` also set), IEEE fp32 otherwise, as torch's own matmuls do.

    Fallback (never silent): the Triton kernels support D <= 256 and, on CUDA, fp16/bf16/fp32. For D > 256, or fp64 on
    CUDA, the Triton path runs ``torch.nn.functional.scaled_dot_product_attention`` instead; with ``impl="triton"``
    requested explicitly this also emits a ``UserWarning``. Where the fast backward's dK/dV kernel fits no block of
    shared memory (fp32 at head dim 256 on sm_86/sm_89's 99 KB), the deterministic backward runs, with a
    ``UserWarning``.
    """
    scale = _validate(q, k, v, scale)
    _check_deterministic(deterministic)
    q, k, v = _autocast(q, k, v)
    backend = _backend(impl, q, q.shape[-1])
    if backend == "torch":
        return split_dual(attention_ref, q, k, v, scale, closed_form=_ref_dual)
    if backend == "sdpa":
        return _sdpa(q, k, v, scale)
    return triton_attention(q, k, v, scale, deterministic)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Readable reference of :func:`attention`: the L x L score matrix, a softmax, a weighted sum of values.

    Computes in fp32 (fp64 for fp64 inputs) and returns q's dtype.
    """
    return _attend(q, k, v, scale)[0].to(q.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]):
    """(softmax(q k^T * scale) v, the softmax weights), both in the compute dtype (fp32, or fp64 for fp64)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(acc), k.to(acc)) * scale  # (B, H, Lq, Lk)
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", weights, v.to(acc)), weights


def _ref_dual(primals, tangents):
    """The reference route's (output with its graph, tangent without one) in one pass (fastcm.ops._jvp.split_dual),
    the tangent from the trainable pass's softmax weights P (sCM App. F): S' = (q' k^T + q k'^T) * scale,
    P' = P (S' - rowsum(P S')), O' = P' v + P v'. 4 matmuls; forward AD of the reference would add the 2 of a
    second primal. ``scale`` is the float the public routes resolved (_check_scale)."""
    q, k, v, scale = primals
    tq, tk, tv, _ = tangents
    out, weights = _attend(q, k, v, scale)
    acc = out.dtype
    with torch.no_grad():
        P, q, k, v = weights.detach(), q.detach().to(acc), k.detach().to(acc), v.detach().to(acc)
        s_dot = None if tq is None else torch.einsum("bhid,bhjd->bhij", tq.to(acc), k)
        if tk is not None:
            qk_dot = torch.einsum("bhid,bhjd->bhij", q, tk.to(acc))
            s_dot = qk_dot if s_dot is None else s_dot.add_(qk_dot)
        out_dot = torch.zeros_like(out) if s_dot is None else torch.einsum(
            "bhij,bhjd->bhid", s_dot.sub_(torch.linalg.vecdot(P, s_dot).unsqueeze(-1)).mul_(P).mul_(scale), v)
        if tv is not None:
            out_dot = out_dot.add_(torch.einsum("bhij,bhjd->bhid", P, tv.to(acc)))
    return out.to(primals[0].dtype), out_dot.to(primals[0].dtype)


def qkv_attention(qkv: Tensor, num_heads: int, scale: Optional[float] = None, impl: str = "auto",
                  deterministic: bool = False) -> Tensor:
    """Self-attention over the pixels of a packed qkv feature map, as a U-Net attention block uses it.

    Args:
        qkv: (N, 3*C, H, W), the output of a 1x1 conv. Channels are ordered (3, num_heads, C // num_heads), i.e.
            ``qkv.view(N, 3, num_heads, C // num_heads, H * W)``: q, k, v, then heads, then head dims.
        num_heads: number of heads; C must be divisible by it.
        scale: softmax scale; default 1 / sqrt(C // num_heads).
        impl: as in :func:`attention` (same SDPA fallback for head dims > 256 or fp64 on CUDA).
        deterministic: the backward's schedule, as in :func:`attention`.
    Returns (N, C, H, W) in qkv's dtype; output channel ``head * head_dim + d``.

    The Triton path reads q, k, v and writes the output through strides (no permute copies); its backward writes
    dq, dk, dv straight into one (N, 3*C, H, W) gradient.
    """
    head_dim = _validate_qkv(qkv, num_heads)
    scale = _check_scale(scale, head_dim)
    _check_deterministic(deterministic)
    (qkv,) = _autocast(qkv)
    backend = _backend(impl, qkv, head_dim)
    if backend == "torch":
        return split_dual(qkv_attention_ref, qkv, num_heads, scale, closed_form=_qkv_ref_dual)
    if backend == "sdpa":
        return _merge_heads(_sdpa(*_split_heads(qkv, num_heads), scale), qkv.shape)
    return triton_qkv_attention(qkv, num_heads, scale, deterministic)


def qkv_attention_ref(qkv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    """Readable reference of :func:`qkv_attention`: rearrange to (N, heads, H*W, head_dim), attend, rearrange back."""
    q, k, v = _split_heads(qkv, num_heads)
    return _merge_heads(attention_ref(q, k, v, scale), qkv.shape)


def _qkv_ref_dual(primals, tangents):
    """:func:`_ref_dual` of :func:`qkv_attention_ref`: the heads of the packed map and of its tangent."""
    qkv, num_heads, scale = primals
    t_qkv = tangents[0]
    out, tangent = _ref_dual((*_split_heads(qkv, num_heads), scale), (*_split_heads(t_qkv, num_heads), None))
    return _merge_heads(out, qkv.shape), _merge_heads(tangent, qkv.shape)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The SDPA fallback. Its fused backends need a unit last stride, else it would drop to the math backend.
    They have no forward-mode AD (pytorch#128971, #117629): a call carrying a tangent runs the reference."""
    if has_tangent(q, k, v):
        return attention_ref(q, k, v, scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _split_heads(qkv: Tensor, num_heads: int):
    return rearrange(qkv, "n (three h d) x y -> three n h (x y) d", three=3, h=num_heads).unbind(0)


def _merge_heads(out: Tensor, qkv_shape) -> Tensor:
    return rearrange(out, "n h (x y) d -> n (h d) x y", x=qkv_shape[2], y=qkv_shape[3])


# ----------------------------------------------------------------------------------------------------------------
# Validation and dispatch.

def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    return check_real("scale", scale, positive=True)


def _check_deterministic(deterministic) -> None:
    check_bool("deterministic", deterministic)


def _validate(q, k, v, scale) -> float:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    B, H, _, D = q.shape
    check_tensor("k", k, shape=(B, H, None, D))
    check_tensor("v", v, shape=tuple(k.shape))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if k.shape[2] < 1 or D < 1:
        raise ValueError(f"k needs at least one token and a head dim >= 1, got shape {tuple(k.shape)}")
    return _check_scale(scale, D)


def _validate_qkv(qkv, num_heads) -> int:
    check_tensor("qkv", qkv, ndim=4)
    num_heads = check_int("num_heads", num_heads)
    channels = qkv.shape[1]
    if channels % (3 * num_heads) != 0 or channels == 0:
        raise ValueError(f"qkv must have 3 * C channels with C divisible by num_heads={num_heads}, "
                         f"got {channels} channels")
    if qkv.shape[2] * qkv.shape[3] < 1:
        raise ValueError(f"qkv needs at least one pixel, got shape {tuple(qkv.shape)}")
    return channels // (3 * num_heads)


def _autocast(*tensors: Tensor):
    """Inside torch.autocast, fp32 inputs run in the autocast dtype (custom ops are not autocast by themselves)."""
    device = tensors[0].device.type
    if tensors[0].dtype != torch.float32 or device == "meta" or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def _backend(impl: str, x: Tensor, head_dim: int) -> str:
    """"torch" (reference), "triton", or "sdpa" when the Triton path was chosen but the kernels cannot run it."""
    if resolve_impl(impl, x) == "torch":
        return "torch"
    if x.numel() == 0:
        return "torch"  # nothing to launch; the reference returns the right empty shape
    reason = None
    if head_dim > MAX_HEAD_DIM:
        reason = f"head dim {head_dim} > {MAX_HEAD_DIM}"
    elif x.is_cuda and x.dtype not in TRITON_CUDA_DTYPES:
        reason = f"dtype {x.dtype} on CUDA"
    if reason is None:
        return "triton"
    if impl == "triton":
        warnings.warn(f"fastcm attention: {reason} is not supported by the Triton kernels; "
                      "using torch.nn.functional.scaled_dot_product_attention", stacklevel=3)
    return "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# Registry inputs at U-Net shapes: tokens = pixels of the 8x8, 16x16 and 32x32 feature maps, head dim 64.

_ATTN_CASES = {"tiny": (1, 2, 16, 32), "unet8x8": (16, 4, 64, 64), "unet16x16": (16, 4, 256, 64),
               "unet32x32": (2, 4, 1024, 64)}
_QKV_CASES = {"tiny": (2, 64, 2, 4), "unet8x8": (16, 256, 4, 8), "unet16x16": (16, 256, 4, 16),
              "unet32x32": (2, 256, 4, 32)}  # (N, C, num_heads, side)


def make_inputs(case: str, device="cpu", dtype=torch.float32, requires_grad: bool = True) -> dict:
    """Inputs of :func:`attention`: (B, H, L, D) q, k, v for a named U-Net case."""
    shape = _ATTN_CASES[case]
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    return dict(q=q, k=k, v=v)


make_inputs.cases = tuple(_ATTN_CASES)


def make_qkv_inputs(case: str, device="cpu", dtype=torch.float32, requires_grad: bool = True) -> dict:
    """Inputs of :func:`qkv_attention`: a packed (N, 3*C, side, side) qkv map and its number of heads."""
    N, C, heads, side = _QKV_CASES[case]
    qkv = torch.randn((N, 3 * C, side, side), device=device, dtype=dtype, requires_grad=requires_grad)
    return dict(qkv=qkv, num_heads=heads)


make_qkv_inputs.cases = tuple(_QKV_CASES)


# ----------------------------------------------------------------------------------------------------------------
# Fast-ops contract declarations (fastcm/ops/_describe.py): minimum work per call and the compile gate's launches.
# FLOPs in matmul units of 2*B*H*Lq*Lk*D: forward 2 (S = QK^T, O = PV), backward 4 (dV, dP, dQ, dK), forward and
# tangent in one pass 6. Bytes: read q, k, v, write out; the backward also reads d_out, out and the log-sum-exp.

def min_work(direction: str, q: Tensor, k: Tensor, v: Tensor, **_) -> "_describe.Work":
    B, H, Lq, D = q.shape
    unit = 2 * B * H * Lq * k.shape[2] * D
    out = B * H * Lq * v.shape[-1] * q.element_size()
    lse = B * H * Lq * (8 if q.dtype == torch.float64 else 4)
    qkv = _describe.nbytes(q, k, v)
    fwd = _describe.Work(qkv + out, 2 * unit)
    bwd = _describe.Work(2 * lse + qkv + 2 * out + qkv, 4 * unit)  # lse written by fwd; read q,k,v,out,dO; write dq,dk,dv
    return _describe.fwd_bwd(direction, fwd, bwd, _describe.Work(2 * qkv + 2 * out, 6 * unit))


def qkv_min_work(direction: str, qkv: Tensor, num_heads: int, **_) -> "_describe.Work":
    return min_work(direction, *qkv_views(qkv, num_heads))


def qkv_aot_jobs(call: dict, dtypes, sm_counts=()):
    """Forward, backward and forward-with-tangent launches through the packed-qkv views the U-Net passes."""
    from fastcm.kernels import attention as kernels
    N, C3, Hs, Ws = call["qkv"].shape
    heads = call["num_heads"]
    for dtype in (d for d in dtypes if d in TRITON_CUDA_DTYPES):
        for precision in _describe.fp32_precisions(dtype):
            def run(dtype=dtype, precision=precision):
                qkv, out = _describe.meta(N, C3, Hs, Ws, dtype=dtype), _describe.meta(N, C3 // 3, Hs, Ws, dtype=dtype)
                q, k, v = qkv_views(qkv, heads)
                o = out_view(out, heads)
                with _describe.fp32_matmul(precision):
                    lse = kernels.attention_fwd(q, k, v, o, 0.125)
                    for deterministic in (False, True):  # both backward schedules
                        kernels.attention_bwd(o, q, k, v, o, lse, *qkv_views(torch.empty_like(qkv), heads), 0.125,
                                              deterministic)
                    kernels.attention_fwd_jvp(q, k, v, *qkv_views(torch.empty_like(qkv), heads), o,
                                              out_view(torch.empty_like(out), heads), 0.125)
            yield _describe.Job("attention", f"qkv {N}x{C3}x{Hs}x{Ws} heads={heads} D={C3 // 3 // heads}"
                                + (f" fp32 matmuls {precision}" if precision else ""), dtype, "attention", run,
                                functools.partial(_aot_check, dtype))


_AOT_KINDS = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq",
              "_attn_fwd_jvp_kernel": "jvp"}


def _aot_check(dtype, c) -> dict:
    """fp16/bf16/tf32 dots on tensor cores; shared memory within kernels.attention.shared_bytes, the bound the
    autotuner's prune hook assumed for this config."""
    import triton

    from fastcm.kernels import attention as kernels
    problems, bound, kw = [], None, c.kwargs
    if (dtype in (torch.float16, torch.bfloat16) or kw.get("PRECISION") == "tf32") and not c.mma \
            and "_preprocess_" not in c.kernel:
        problems.append("fp16/bf16/tf32 dots did not lower to MMA")
    if c.kernel in _AOT_KINDS:
        config = triton.Config({"BLOCK_M": kw["BLOCK_M"], "BLOCK_N": kw["BLOCK_N"]}, num_stages=kw["num_stages"])
        kind = _AOT_KINDS[c.kernel] + ("_atomic" if kw.get("ATOMIC_DQ") else "")
        bound = kernels.shared_bytes(kind, config, kw["BLOCK_D"],
                                     max(2, kw["DOT"].primitive_bitwidth // 8))
        if c.shared > bound:
            problems.append(f"shared memory {c.shared} B above the prune hook's bound {bound} B")
    return dict(problems=problems, bound=bound)
