"""Attention at U-Net token counts (8x8, 16x16, 32x32 maps; head dim 64; the cifar10 preset's one 256-wide head at
16x16), forward and forward+backward.

Providers: the Triton flash kernel (CUDA only; the interpreter is no benchmark), torch SDPA with a *pinned* backend
(``torch.nn.attention.sdpa_kernel``: math and flash everywhere, efficient / cuDNN on CUDA, because SDPA's default
backend choice differs between releases and GPUs), and the eager math reference (the report's baseline).
``qkv_attention`` entries time the U-Net layout, packed (N, 3C, H, W) in and (N, C, H, W) out, where the Triton path
reads through strides and the others pay the rearrangement copies.

Each entry records ``flops`` (forward 4*B*H*Lq*Lk*D: two matmuls; backward 2.5x that, five matmuls - the Triton
tutorial's count) so the report prints TFLOP/s. Goal on a GPU: Triton forward not slower than the flash
backend at L <= 1024.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _harness import DEVICE, SMOKE, bench, record, timed_call
from fastcm.ops import attention, attention_ref, qkv_attention, qkv_attention_ref

DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
# (B, H, L, D): B*H in {8, 64} at 64, 256 and 1024 tokens, head dim 64, and the cifar10 preset's single
# 256-wide head at 16x16; one tiny size under BENCH_SMOKE=1.
SHAPES = [(1, 2, 64, 64)] if SMOKE else [(b, 4, L, 64) for b in (2, 16) for L in (64, 256, 1024)] + [(16, 1, 256, 256)]
# torch also has a CPU flash kernel: on the CPU it shows what impl="auto" (the eager reference there) leaves behind.
SDPA = {"sdpa-math": SDPBackend.MATH, "sdpa-flash": SDPBackend.FLASH_ATTENTION}
if DEVICE == "cuda":
    SDPA.update({"sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION})
PROVIDERS = ["eager", *SDPA] + (["triton"] if DEVICE == "cuda" else [])


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def _sdpa_qkv(backend):
    def run(qkv, num_heads):
        n, c3, h, w = qkv.shape
        # Fused SDPA kernels need a unit last stride, so the tokens-major copies are part of this path's cost.
        q, k, v = qkv.reshape(n, 3, num_heads, c3 // (3 * num_heads), h * w).transpose(-1, -2).contiguous().unbind(1)
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, D)
        return out.transpose(-1, -2).reshape(n, c3 // 3, h, w)
    return run


def _fn(layout, provider):
    if provider == "eager":
        return attention_ref if layout == "bhld" else qkv_attention_ref
    if provider == "triton":
        if layout == "bhld":
            return lambda **kw: attention(**kw, impl="triton")
        return lambda **kw: qkv_attention(**kw, impl="triton")
    return (_sdpa if layout == "bhld" else _sdpa_qkv)(SDPA[provider])


def _inputs(layout, B, H, L, D, requires_grad):
    make = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)  # noqa: E731
    if layout == "bhld":
        return dict(q=make(B, H, L, D), k=make(B, H, L, D), v=make(B, H, L, D))
    side = int(round(L ** 0.5))
    return dict(qkv=make(B, 3 * H * D, side, side), num_heads=H)


def _supported(provider, mode):
    """Whether a pinned SDPA backend can run this dtype on this GPU (e.g. flash needs sm80+ for bf16, cuDNN a
    recent cuDNN); unsupported entries are skipped, not reported as slow."""
    if not provider.startswith("sdpa") or provider == "sdpa-math":
        return True
    q = torch.randn(1, 1, 64, 64, device=DEVICE, dtype=DTYPE, requires_grad=(mode != "fwd"))
    try:
        out = _sdpa(SDPA[provider])(q, q, q)
        if mode != "fwd":
            out.sum().backward()
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", ["bhld", "qkv"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}H{h}L{L}D{d}" for b, h, L, d in SHAPES])
def test_attention(benchmark, shape, layout, provider, mode):
    if not _supported(provider, mode):
        pytest.skip(f"{provider} cannot run {DTYPE} {mode} on this device")
    B, H, L, D = shape
    kwargs = _inputs(layout, B, H, L, D, requires_grad=(mode != "fwd"))
    run = timed_call(_fn(layout, provider), kwargs, mode)
    flops = 4 * B * H * L * L * D * (1.0 if mode == "fwd" else 3.5)
    op = "attention" if layout == "bhld" else "qkv_attention"
    case = f"B{B}H{H}L{L}D{D}"
    record(benchmark, group=f"op:{op}:{case}:{mode}", op=op, case=case, dtype=DTYPE, mode=mode, provider=provider,
           flops=flops)
    bench(benchmark, run, rounds=3 if SMOKE else 20)
