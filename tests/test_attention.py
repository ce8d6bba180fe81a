"""Flash attention: Triton (interpreted on CPU) vs fp64 math attention and vs torch SDPA; qkv layout; contract checks.

Interpreter cost is per program and per loop step (BLOCK 64 under the interpreter): B*H*L=256 fwd+bwd ~0.8 s,
B*H=1, L=1000 ~4 s. Shapes below keep B*H small and put only one case at L=1000.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastcm.ops import REGISTRY, attention, attention_ref, qkv_attention, qkv_attention_ref

# (atol, rtol) of the output and of the gradients per input dtype, against fp64 math attention evaluated on the
# *same rounded* inputs. The output is a convex combination of v rows, so its error is the output rounding plus the
# dot-product error: fp64 exact up to reordering; fp32 ~1e-6 (GPU ieee dot is as exact); fp16/bf16 follow xformers'
# fmha forward table (fp16 4e-3/4e-4, bf16 2e-2/5e-3) because P is rounded to the input dtype before P@V on GPUs.
# Gradients sum L terms of O(1) and round dS to the input dtype on GPUs: a few times looser (xformers' bwd tables).
TOL = {
    torch.float64: ((1e-12, 1e-10), (1e-11, 1e-10)),
    torch.float32: ((2e-5, 1e-5), (1e-4, 1e-4)),
    torch.float16: ((4e-3, 4e-4), (1e-2, 1e-2)),
    torch.bfloat16: ((2e-2, 5e-3), (6e-2, 2e-2)),
}


def _close(actual, expected, dtype, what, grad=False):
    atol, rtol = TOL[dtype][1 if grad else 0]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def _qkv(shape_q, shape_k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g, dtype=torch.float64)
    k, v = (torch.randn(shape_k, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _run(fn, inputs, grad_out=None):
    """fn(*leaves) and the gradients of its inputs (grad_out=None: .sum().backward(), a stride-0 gradient)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out.sum() if grad_out is None else out).backward(None if grad_out is None else grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _check_against_fp64(fn, ref, inputs, dtype, grad_out):
    out, grads = _run(fn, inputs, grad_out)
    exp_out, exp_grads = _run(ref, [t.double() for t in inputs], None if grad_out is None else grad_out.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    _close(out, exp_out, dtype, "out")
    for name, g, e in zip("qkv", grads, exp_grads):
        _close(g, e, dtype, f"d{name}", grad=True)
    return out, grads


def _triton(q, k, v):
    return attention(q, k, v, impl="triton")


# (B, H, Lq, Lk, D): every L in {1, 17, 64, 256, 1000} and every D in {32, 48, 64, 80, 128}; Lq != Lk once.
# Under the interpreter BLOCK_M = BLOCK_N = 64: L <= 64 takes the single-tile path, larger L the online-softmax loop.
SHAPES = [
    (2, 2, 1, 1, 32),
    (1, 2, 17, 17, 48),
    (2, 2, 64, 64, 64),
    (1, 2, 17, 17, 80),
    (1, 2, 64, 64, 128),
    (1, 2, 256, 256, 64),
    (1, 1, 100, 100, 128),
    (1, 2, 30, 150, 32),
    (1, 1, 1000, 1000, 32),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}H{h}L{lq}x{lk}D{d}" for b, h, lq, lk, d in SHAPES])
def test_fp32_matches_fp64_reference_and_sdpa(shape, device):
    B, H, Lq, Lk, D = shape
    inputs = _qkv((B, H, Lq, D), (B, H, Lk, D), torch.float32, device)
    grad_out = torch.randn(B, H, Lq, D, device=device)
    out, grads = _check_against_fp64(_triton, attention_ref, inputs, torch.float32, grad_out)
    sdpa_out, sdpa_grads = _run(F.scaled_dot_product_attention, inputs, grad_out)
    _close(out, sdpa_out, torch.float32, "out vs SDPA")
    for name, g, e in zip("qkv", grads, sdpa_grads):
        _close(g, e, torch.float32, f"d{name} vs SDPA", grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 17, 17, 48), (1, 1, 100, 100, 64)], ids=["L17D48", "L100D64"])
def test_dtypes_match_fp64_reference(shape, dtype, device):
    # bf16 under the interpreter covers loads/stores (dots upcast to fp32); bf16 dots are checked by the gpu tests.
    B, H, Lq, Lk, D = shape
    inputs = _qkv((B, H, Lq, D), (B, H, Lk, D), dtype, device)
    _check_against_fp64(_triton, attention_ref, inputs, dtype, torch.randn(B, H, Lq, D, device=device))


@pytest.mark.parametrize("shape", [(2, 2, 17, 17, 32), (1, 1, 100, 100, 48)], ids=["single-tile", "loop"])
def test_sum_backward_stride0_grad(shape, device):
    B, H, Lq, Lk, D = shape
    inputs = _qkv((B, H, Lq, D), (B, H, Lk, D), torch.float32, device)
    _check_against_fp64(_triton, attention_ref, inputs, torch.float32, grad_out=None)


def test_custom_scale_and_lse(device):
    # The saved LSE is log2 sum_j exp(s_ij) with s = q k^T * scale: check it against torch.logsumexp.
    q, k, v = _qkv((1, 2, 70, 48), (1, 2, 90, 48), torch.float64, device)
    out, lse = torch.ops.fastcm.attention_fwd(q, k, v, 0.37)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * 0.37
    _close(lse, torch.logsumexp(scores, -1) / math.log(2), torch.float64, "lse")
    _close(out, F.scaled_dot_product_attention(q, k, v, scale=0.37), torch.float64, "out")
    _check_against_fp64(lambda *t: attention(*t, scale=0.37, impl="triton"),
                        lambda *t: attention_ref(*t, scale=0.37), [q, k, v], torch.float64,
                        torch.randn_like(q))


def test_large_logits_online_softmax_is_stable(device):
    # Scores of ~1e3 overflow exp without max subtraction (fp64 at 709); the largest key sits in the second key block,
    # so the running max is raised mid-row and the first block's partial sums must be rescaled.
    q, k, v = _qkv((1, 1, 80, 32), (1, 1, 130, 32), torch.float64, device)
    q, k = q * 40.0, k * 40.0
    k[..., 100, :] = q.mean(2) * 3.0
    assert (torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(32)).abs().max() > 1000
    _check_against_fp64(_triton, attention_ref, [q, k, v], torch.float64, torch.randn_like(q))
    # fp32 (exp overflows at 88): an fp32 score carries an error of ~eps * sum_d |q_d k_d| * scale, which the
    # softmax passes on to the output; compare within that conditioning.
    q, k, v = (t.float() / 4.0 for t in (q, k, v))
    out, grads = _run(_triton, [q, k, v], torch.randn_like(q))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    cond = (q.abs() @ k.abs().transpose(-1, -2)).max().item() / math.sqrt(32)
    torch.testing.assert_close(out.double(), attention_ref(q.double(), k.double(), v.double()),
                               atol=8 * 2.0 ** -24 * cond * v.abs().max().item(), rtol=0)


def test_all_scores_very_negative(device):
    # Every real score is ~ -100, so lse2 ~ -150 and 2^(0 - lse2) overflows fp32: zero-padded key rows (score 0)
    # must be masked out of P explicitly in backward, not merely multiplied by their zero k/v rows (inf * 0 = NaN).
    q = torch.full((1, 1, 17, 32), 4.2, device=device)
    k = -q + 0.1 * torch.randn(1, 1, 17, 32, device=device)
    v = torch.randn(1, 1, 17, 32, device=device)
    out, grads = _check_against_fp64(_triton, attention_ref, [q, k, v], torch.float32, torch.randn_like(q))
    assert all(torch.isfinite(g).all() for g in grads)


def test_noncontiguous_views_of_packed_qkv(device):
    # Token-major packing (B, L, 3, H, D), as a linear qkv projection produces: q, k, v are strided views.
    B, L, H, D = 2, 40, 2, 32
    packed = torch.randn(B, L, 3, H, D, device=device)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not any(t.is_contiguous() for t in (q, k, v))
    _check_against_fp64(_triton, attention_ref, [q, k, v], torch.float32, torch.randn(B, H, L, D, device=device))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cropped"])
def test_qkv_attention_matches_reference(layout, device):
    N, C, heads, side = 2, 96, 2, 7  # head dim 48, 49 tokens
    qkv = torch.randn(N, 3 * C, side + 1, side + 2, device=device, dtype=torch.float64)
    qkv = {"contiguous": qkv[:, :, :side, :side].contiguous(),
           "channels_last": qkv[:, :, :side, :side].contiguous(memory_format=torch.channels_last),
           "cropped": qkv[:, :, 1:, 2:]}[layout]
    fn = lambda x: qkv_attention(x, heads, impl="triton")  # noqa: E731
    ref = lambda x: qkv_attention_ref(x, heads)  # noqa: E731
    grad_out = torch.randn(N, C, side, side, device=device)
    for dtype in (torch.float32, torch.float64):
        out, (grad,) = _run(fn, [qkv.to(dtype)], grad_out)
        exp_out, (exp_grad,) = _run(ref, [qkv.to(dtype).double()], grad_out.double())
        assert out.shape == (N, C, side, side) and grad.shape == qkv.shape and out.is_contiguous()
        _close(out, exp_out, dtype, f"{layout} out")
        _close(grad, exp_grad, dtype, f"{layout} d qkv", grad=True)


def test_qkv_attention_gradients(device):
    N, C, heads, side = 2, 64, 2, 5
    qkv = torch.randn(N, 3 * C, side, side, device=device).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(N, C, side, side, device=device)
    for g in (grad_out, None):
        out, (grad,) = _run(lambda x: qkv_attention(x, heads, impl="triton"), [qkv], g)
        exp_out, (exp_grad,) = _run(lambda x: qkv_attention_ref(x, heads), [qkv.double()],
                                    None if g is None else g.double())
        _close(out, exp_out, torch.float32, "out")
        _close(grad, exp_grad, torch.float32, "d qkv", grad=True)


def test_gradcheck_fp64(device):
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 5, 16), (1, 2, 7, 16), torch.float64, device))
    assert torch.autograd.gradcheck(_triton, (q, k, v), fast_mode=True)
    qkv = torch.randn(1, 3 * 32, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: qkv_attention(x, 2, impl="triton"), (qkv,), fast_mode=True)


def test_opcheck(device):
    q, k, v = _qkv((1, 2, 20, 32), (1, 2, 20, 32), torch.float32, device)
    torch.library.opcheck(torch.ops.fastcm.attention_fwd.default, (q.requires_grad_(), k, v, 0.2))
    out, lse = torch.ops.fastcm.attention_fwd(q.detach(), k, v, 0.2)
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.fastcm.attention_bwd.default, (torch.randn_like(out), q.detach(), k, v,
                                                                       out, lse, 0.2, deterministic))
    qkv = torch.randn(1, 3 * 32, 3, 4, device=device)
    torch.library.opcheck(torch.ops.fastcm.qkv_attention_fwd.default, (qkv.requires_grad_(), 2, 0.25))


def test_torch_compile_fullgraph(device):
    def step(q, k, v, qkv):
        return attention(q, k, v, impl="triton").square().mean() + qkv_attention(qkv, 2, impl="triton").mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    inputs = _qkv((1, 2, 20, 32), (1, 2, 24, 32), torch.float32, device) + [torch.randn(1, 192, 4, 5)]
    out_c, grads_c = _run(compiled, inputs)
    out_e, grads_e = _run(step, inputs)
    _close(out_c, out_e, torch.float32, "compiled out")
    for g, e in zip(grads_c, grads_e):
        _close(g, e, torch.float32, "compiled grad", grad=True)


def test_head_dim_above_256_falls_back_to_sdpa_with_warning(device):
    q, k, v = _qkv((1, 1, 9, 264), (1, 1, 9, 264), torch.float32, device)
    with pytest.warns(UserWarning, match="scaled_dot_product_attention"):
        out = attention(q, k, v, impl="triton")
    _close(out, attention_ref(q.double(), k.double(), v.double()), torch.float32, "out")
    with pytest.warns(UserWarning, match="head dim 272"):
        qkv_attention(torch.randn(1, 3 * 544, 2, 2, device=device), 2, impl="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v)  # "auto": the documented fallback (or the reference on CPU), no warning


# Layouts the U-Net never feeds but users do: q, k, v with three different stride patterns (q a slice of a wider
# tensor, k contiguous, v a transposed view whose head-dim stride is not 1), Lk != Lq on both sides of one block
# (the interpreter's BLOCK_N is 64: Lk = 80 runs the online-softmax loop), head dims from 16 to 256 including
# non-powers of two (masked head-dim tail). No SDPA fallback may happen (its warning is an error).
LAYOUT_CASES = [(33, 80, 16), (17, 5, 40), (40, 70, 96), (9, 20, 256), (70, 9, 200)]


@pytest.mark.parametrize("Lq, Lk, D", LAYOUT_CASES, ids=[f"Lq{a}Lk{b}D{d}" for a, b, d in LAYOUT_CASES])
def test_different_strides_per_input_and_head_dims_to_256(Lq, Lk, D, device):
    B, H = 1, 2
    g = torch.Generator().manual_seed(D)
    q = torch.randn(B, H, Lq, D + 8, generator=g, dtype=torch.float64)[..., 3:D + 3]   # sliced: row stride D+8
    k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64)                     # contiguous
    v = torch.randn(B, H, D, Lk, generator=g, dtype=torch.float64).transpose(-1, -2)   # transposed view
    inputs = [t.to(device=device, dtype=torch.float32) for t in (q, k, v)]
    q, k, v = inputs
    assert len({q.stride(), k.stride(), v.stride()}) == 3 and v.stride(-1) != 1
    with warnings.catch_warnings():  # the SDPA fallback's warning is an error (not the interpreter's own)
        warnings.filterwarnings("error", message="fastcm attention", category=UserWarning)
        _check_against_fp64(_triton, attention_ref, [q, k, v], torch.float32,
                            torch.randn(B, H, Lq, D, generator=g).to(device))


# Both backward schedules (FA2's atomic dQ, the default, and the deterministic dQ kernel) against the fp64 reference:
# several query blocks receiving atomic adds from several key blocks (Lq 70, Lk 130 at the interpreter's 64-blocks),
# a tail of a single key block, per-input strides, head dims above 64, fp32 and fp64.
SCHEDULE_CASES = [(70, 130, 96, torch.float32), (9, 20, 256, torch.float64), (70, 9, 40, torch.float64)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("Lq, Lk, D, dtype", SCHEDULE_CASES, ids=[f"Lq{a}Lk{b}D{d}" for a, b, d, _ in SCHEDULE_CASES])
def test_both_backward_schedules_match_fp64_reference(Lq, Lk, D, dtype, deterministic, device):
    g = torch.Generator().manual_seed(Lq + D)
    q, k, v = (_strided(shape, g, dtype, kind).to(device) for shape, kind in
               (((1, 2, Lq, D), "sliced"), ((1, 2, Lk, D), "contiguous"), ((1, 2, Lk, D), "transposed")))
    grad_out = torch.randn(1, 2, Lq, D, generator=g).to(device)
    _check_against_fp64(lambda *x: attention(*x, impl="triton", deterministic=deterministic), attention_ref,
                        [q, k, v], dtype, grad_out)


def _bwd_launches(fn):
    """Kernel names launched by fn() and the bytes its launches touched with atomics."""
    from fastcm.kernels import _probe

    with _probe.probe(sanitize=False) as p:
        fn()
    return {r.kernel for r in p.launches}, sum(r.atomic for r in p.launches)


def test_deterministic_switch_picks_the_dq_kernel(device):
    """Default: the atomic schedule (no dQ kernel); deterministic=True or torch.use_deterministic_algorithms (read
    at backward time): the separate dQ kernel and no atomics, for attention and qkv_attention alike, with gradients
    equal to fp32 rounding."""
    q, k, v = (t.requires_grad_() for t in _qkv((1, 1, 20, 32), (1, 1, 24, 32), torch.float32, device))
    qkv = torch.randn(1, 96, 4, 4, device=device, requires_grad=True)
    runs = {}
    for label, det in (("fast", False), ("explicit", True), ("torch switch", False)):
        def step(det=det):
            out = attention(q, k, v, impl="triton", deterministic=det)
            out2 = qkv_attention(qkv, 1, impl="triton", deterministic=det)
            if label == "torch switch":
                torch.use_deterministic_algorithms(True)
            try:
                runs[label] = torch.autograd.grad((out.square().sum() + out2.square().sum()), [q, k, v, qkv])
            finally:
                torch.use_deterministic_algorithms(False)
        kernels, atomic = _bwd_launches(step)
        assert ("_attn_bwd_dq_kernel" in kernels) == (label != "fast") and (atomic > 0) == (label == "fast"), label
    for a, b in zip(runs["fast"], runs["explicit"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(runs["explicit"], runs["torch switch"]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        attention(q, k, v, deterministic="yes")


def test_the_one_pass_jvp_route_keeps_the_backward_schedule(device):
    """Under forward-mode duals with autograd on (the one-pass sCT/MeanFlow step), the call's deterministic still
    picks the backward's schedule: the dQ kernel for True, the atomic one for False."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = (t.requires_grad_() for t in _qkv((1, 1, 20, 32), (1, 1, 24, 32), torch.float32, device))
    tangents = [torch.randn_like(t) for t in (q, k, v)]
    for det in (False, True):
        def step(det=det):
            with fwAD.dual_level():
                out = attention(*(fwAD.make_dual(t, dt) for t, dt in zip((q, k, v), tangents)), impl="triton",
                                deterministic=det)
                assert fwAD.unpack_dual(out).tangent is not None
                torch.autograd.grad(fwAD.unpack_dual(out).primal.square().sum(), [q, k, v])
        kernels, atomic = _bwd_launches(step)
        assert ("_attn_bwd_dq_kernel" in kernels) == det and (atomic > 0) == (not det), det


def test_fast_backward_falls_back_explicitly_where_its_shared_memory_does_not_fit(device, monkeypatch):
    """fp32 at head dim 256 within sm_86's 99 KB: no config of the atomic dK/dV kernel fits (the deterministic one's
    smallest does), fp16 fits; where it does not fit, the deterministic schedule runs and a warning says so."""
    from fastcm.kernels import _utils
    from fastcm.kernels import attention as kernels

    token = _utils.TARGET_SHARED_MEMORY.set(101_376)
    try:
        fp32, fp16 = torch.empty(1, 1, 8, 256), torch.empty(1, 1, 8, 256, dtype=torch.float16)
        assert not kernels.atomic_dq_fits(fp32) and kernels.atomic_dq_fits(fp16)
        assert kernels.atomic_dq_fits(torch.empty(1, 1, 8, 128))
    finally:
        _utils.TARGET_SHARED_MEMORY.reset(token)
    monkeypatch.setattr(kernels, "atomic_dq_fits", lambda q: False)
    q, k, v = _qkv((1, 1, 20, 32), (1, 1, 20, 32), torch.float64, device)
    with pytest.warns(UserWarning, match="using the deterministic backward"):
        launched, atomic = _bwd_launches(lambda: _check_against_fp64(_triton, attention_ref, [q, k, v],
                                                                     torch.float64, None))
    assert "_attn_bwd_dq_kernel" in launched and atomic == 0


def test_cifar10_preset_head_dim_256_uses_the_triton_kernels(device):
    # iCT's NCSN++ (cifar10 preset): one 256-channel head at 16x16; here at 4x4 tokens to keep the interpreter fast.
    qkv = torch.randn(1, 3 * 256, 4, 4, device=device, dtype=torch.float64)
    grad_out = torch.randn(1, 256, 4, 4, device=device, dtype=torch.float64)
    with warnings.catch_warnings():  # the SDPA fallback's warning is an error (not the interpreter's own)
        warnings.filterwarnings("error", message="fastcm attention", category=UserWarning)
        out, (grad,) = _run(lambda x: qkv_attention(x, 1, impl="triton"), [qkv], grad_out)
    exp_out, (exp_grad,) = _run(lambda x: qkv_attention_ref(x, 1), [qkv], grad_out)
    _close(out, exp_out, torch.float64, "out")
    _close(grad, exp_grad, torch.float64, "d qkv", grad=True)


def test_autocast_runs_in_autocast_dtype(device):
    # Like SDPA under autocast: fp32 inputs are cast to the autocast dtype, output in that dtype.
    q, k, v = _qkv((1, 2, 17, 32), (1, 2, 17, 32), torch.float32, device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        out = attention(q, k, v, impl="triton")
        out_qkv = qkv_attention(torch.randn(1, 192, 3, 3, device=device), 2, impl="triton")
    assert out.dtype == torch.bfloat16 and out_qkv.dtype == torch.bfloat16
    _close(out, attention_ref(*(t.bfloat16().double() for t in (q, k, v))), torch.bfloat16, "autocast out")


def test_empty_batch_and_registry(device):
    q = torch.randn(0, 2, 5, 32, device=device)
    assert attention(q, q, q, impl="triton").shape == q.shape
    for name in ("attention", "qkv_attention"):
        spec = REGISTRY[name]
        assert spec.make_inputs.cases[0] == "tiny"
        kwargs = spec.make_inputs("tiny", device=device, requires_grad=False)
        expected = spec.ref(**{k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
        _close(spec.op(**kwargs, impl="triton"), expected, torch.float32, name)


def _blocks(kernel, lq, lk, block_d=64, dot=None, configs=None):
    import triton
    import triton.language as tl

    from fastcm.kernels.attention import _pruner

    configs = configs or [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m, n in [(128, 64), (64, 64), (32, 32),
                                                                                  (16, 32)]]
    args = dict(Q=torch.empty(0), Lq=lq, Lk=lk)
    kept = _pruner(kernel)(configs, args, BLOCK_D=block_d, DOT=dot or tl.float16)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept]


def test_autotune_pruning_keeps_blocks_within_the_sequence():
    # GPU-only logic (the interpreter has one config): blocks larger than the padded sequence are pure masked work.
    assert _blocks("fwd", 1, 1) == [(16, 32)]
    assert _blocks("fwd", 17, 64) == [(32, 32), (16, 32)]
    assert _blocks("fwd", 64, 64) == [(64, 64), (32, 32), (16, 32)]
    assert _blocks("fwd", 1000, 1000) == [(128, 64), (64, 64), (32, 32), (16, 32)]


def test_autotune_pruning_drops_configs_over_the_shared_memory_limit():
    import triton
    import triton.language as tl

    from fastcm.kernels import _utils
    from fastcm.kernels.attention import shared_bytes

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s) for m, n, s in [(128, 128, 3), (64, 64, 3),
                                                                                         (16, 32, 2)]]
    sizes = [shared_bytes("dq", c, 256, 4) for c in configs]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 166_912 > sizes[-1]
    token = _utils.TARGET_SHARED_MEMORY.set(166_912)
    try:
        kept = _blocks("dq", 1024, 1024, block_d=256, dot=tl.float32, configs=configs)
        assert (128, 128) not in kept and (16, 32) in kept
        assert kept == [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c, b in zip(configs, sizes) if b <= 166_912]
        _utils.TARGET_SHARED_MEMORY.set(1024)
        with pytest.raises(ValueError, match="no attention config fits 1024 B"):
            _blocks("dq", 64, 64, block_d=256, dot=tl.float32, configs=configs)
    finally:
        _utils.TARGET_SHARED_MEMORY.reset(token)
    assert len(_blocks("dq", 1024, 1024, block_d=256, dot=tl.float32, configs=configs)) == 3  # CPU: no limit


def test_fp32_dot_precision_follows_torchs_matmul_setting(monkeypatch):
    from fastcm.kernels import attention as kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)  # the GPU decision (the interpreter always computes ieee)
    x32, x16 = torch.empty(1), torch.empty(1, dtype=torch.float16)
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:  # the torch >= 2.9 API only (mixing it with set_float32_matmul_precision makes torch raise on reads)
        assert kernels.dot_precision(x32) == ("tf32" if saved == "tf32" else "ieee")
        matmul.fp32_precision = "tf32"
        assert kernels.dot_precision(x32) == "tf32" and kernels.dot_precision(x16) == "ieee"
        matmul.fp32_precision = "ieee"
        assert kernels.dot_precision(x32) == "ieee"
        matmul.fp32_precision = "tf32"
        assert kernels.dot_precision(x32) == "tf32"
    finally:
        matmul.fp32_precision = saved
    torch.get_float32_matmul_precision()  # the legacy reader still works: the test left no mixed state


def test_autotune_key_buckets_sequence_lengths(monkeypatch, device):
    # Two configs and a fake benchmark stand in for a GPU's autotuning: lengths in one power-of-two bucket tune once.
    import triton

    from fastcm.kernels import attention as kernels

    tuner = kernels._attn_fwd_kernel
    config = tuner.configs[0]
    twin = triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=config.num_stages)
    benched = []
    monkeypatch.setattr(tuner, "configs", [config, twin])
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **k: benched.append(config) or [1.0, 1.0, 1.0])
    for L in (40, 50, 64, 33, 100):
        q, k, v = _qkv((1, 1, L, 16), (1, 1, L, 16), torch.float32, device)
        attention(q, k, v, impl="triton")
    assert len(benched) == 4  # two configs for the bucket 64 (L = 40, 50, 64, 33), two for 128 (L = 100)


def _meta_like(shape):
    return torch.zeros(shape, device="meta")


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(k=torch.zeros(2, 3, 5, 16)), ValueError, "k must have shape"),
        (dict(k=torch.zeros(3, 2, 5, 8)), ValueError, "k must have shape"),
        (dict(k=torch.zeros(2, 3, 5, 8)), ValueError, "k must have shape"),
        (dict(v=torch.zeros(2, 2, 5, 16)), ValueError, "v must have shape"),
        (dict(v=torch.zeros(2, 2, 4, 8)), ValueError, "v must have shape"),
        (dict(q=torch.zeros(2, 2, 5)), ValueError, "q must be 4-D"),
        (dict(q=torch.zeros(2, 2, 5, 8, dtype=torch.int64)), TypeError, "q must have a floating dtype"),
        (dict(k=torch.zeros(2, 2, 5, 8, dtype=torch.bool)), TypeError, "k must have a floating dtype"),
        (dict(v=torch.zeros(2, 2, 5, 8, dtype=torch.float64)), TypeError, "share one dtype"),
        (dict(k=_meta_like((2, 2, 5, 8))), ValueError, "one device"),
        (dict(k=torch.zeros(2, 2, 0, 8), v=torch.zeros(2, 2, 0, 8)), ValueError, "at least one token"),
        (dict(scale=-1.0), ValueError, "scale must be a positive"),
        (dict(scale=float("nan")), ValueError, "scale must be a positive"),
        (dict(scale=True), ValueError, "scale must be a positive"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(q=torch.zeros(2, 2, 5, 8), k=torch.zeros(2, 2, 5, 8), v=torch.zeros(2, 2, 5, 8))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        attention(**args)


@pytest.mark.parametrize(
    "qkv, heads, err, match",
    [
        (torch.zeros(2, 96, 4), 2, ValueError, "qkv must be 4-D"),
        (torch.zeros(2, 95, 4, 4), 1, ValueError, "3 \\* C channels"),
        (torch.zeros(2, 96, 4, 4), 5, ValueError, "divisible by num_heads=5"),
        (torch.zeros(2, 96, 4, 4), 0, ValueError, "num_heads must be an integer >= 1"),
        (torch.zeros(2, 96, 4, 4), 2.0, ValueError, "num_heads must be an integer >= 1"),
        (torch.zeros(2, 96, 0, 4), 2, ValueError, "at least one pixel"),
        (torch.zeros(2, 96, 4, 4, dtype=torch.int32), 2, TypeError, "qkv must have a floating dtype"),
        ("qkv", 2, TypeError, "qkv must be a torch.Tensor"),
    ],
)
def test_qkv_bad_input(qkv, heads, err, match):
    with pytest.raises(err, match=match):
        qkv_attention(qkv, heads)


# ---------------------------------------------------------------------------------------------------------------
# GPU only: real tensor-core dots (fp16/bf16), determinism, the CUDA fallback for fp64.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L, D", [(64, 64), (256, 48), (1024, 64), (1000, 128)])
def test_cuda_half_precision_vs_fp64(dtype, L, D):
    inputs = _qkv((4, 8, L, D), (4, 8, L, D), dtype, "cuda")
    _check_against_fp64(_triton, attention_ref, inputs, dtype, torch.randn(4, 8, L, D, device="cuda"))


@pytest.mark.gpu
def test_cuda_deterministic_and_fp64_fallback():
    inputs = _qkv((8, 8, 1024, 64), (8, 8, 1024, 64), torch.float16, "cuda")
    det = lambda *x: attention(*x, impl="triton", deterministic=True)  # noqa: E731
    a, ga = _run(det, inputs, torch.ones(8, 8, 1024, 64, device="cuda"))
    b, gb = _run(det, inputs, torch.ones(8, 8, 1024, 64, device="cuda"))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    c, gc = _run(_triton, inputs, torch.ones(8, 8, 1024, 64, device="cuda"))  # the atomic schedule: close, not equal
    assert torch.equal(a, c)
    for x, y in zip(ga, gc):
        _close(y, x, torch.float16, "atomic vs deterministic", grad=True)
    q, k, v = _qkv((1, 2, 33, 64), (1, 2, 33, 64), torch.float64, "cuda")
    with pytest.warns(UserWarning, match="float64 on CUDA"):
        out = attention(q, k, v, impl="triton")
    _close(out, attention_ref(q, k, v), torch.float64, "fp64 fallback")


# ---------------------------------------------------------------------------------------------------------------
# Forward with tangent in one pass (kernels.attention.attention_fwd_jvp; sCM App. F): against torch.func.jvp of
# the plain-torch reference and against the closed form O' = P V' + (P * S') V - rowsum(P * S') O.

def _jvp_reference(q, k, v, tq, tk, tv, scale):
    return torch.func.jvp(lambda a, b, c: attention_ref(a, b, c, scale), (q, k, v), (tq, tk, tv))


def _jvp_closed_form(q, k, v, tq, tk, tv, scale):
    s = scale * q @ k.mT
    ts = scale * (tq @ k.mT + q @ tk.mT)
    p = torch.softmax(s, -1)
    o = p @ v
    return o, p @ tv + (p * ts) @ v - (p * ts).sum(-1, keepdim=True) * o


def _strided(shape, g, dtype, kind):
    """A (B, H, L, D) tensor as a contiguous tensor, a transposed view, or a slice of a wider one."""
    B, H, L, D = shape
    if kind == "contiguous":
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if kind == "transposed":
        return torch.randn(B, H, D, L, generator=g, dtype=torch.float64).to(dtype).transpose(-1, -2)
    return torch.randn(B, L, H, D + 5, generator=g, dtype=torch.float64).to(dtype)[..., 2:D + 2].transpose(1, 2)


JVP_CASES = [(17, 80, 32), (70, 9, 40), (33, 33, 256)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("Lq, Lk, D", JVP_CASES, ids=[f"Lq{a}Lk{b}D{d}" for a, b, d in JVP_CASES])
def test_fwd_jvp_kernel_matches_torch_func_jvp_and_closed_form(Lq, Lk, D, dtype, device):
    from fastcm.kernels.attention import attention_fwd_jvp

    g = torch.Generator().manual_seed(Lq * Lk + D)
    B, H, scale = 1, 2, 0.7 / math.sqrt(D)
    kinds = ["sliced", "contiguous", "transposed", "transposed", "sliced", "contiguous"]
    shapes = [(B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)] * 2
    q, k, v, tq, tk, tv = (_strided(s, g, dtype, kind).to(device) for s, kind in zip(shapes, kinds))
    out = torch.empty(B, H, D, Lq, dtype=dtype, device=device).transpose(-1, -2)  # outputs through strides too
    tout = torch.empty(B, H, Lq, D, dtype=dtype, device=device)
    lse = attention_fwd_jvp(q, k, v, tq, tk, tv, out, tout, scale)
    args64 = [t.double() for t in (q, k, v, tq, tk, tv)]
    exp_out, exp_tout = _jvp_reference(*args64, scale)
    cf_out, cf_tout = _jvp_closed_form(*args64, scale)
    torch.testing.assert_close(cf_tout, exp_tout, atol=1e-12, rtol=1e-12)  # the formula the kernel implements
    _close(out, exp_out, dtype, "out")
    _close(tout, exp_tout, dtype, "tangent", grad=True)
    exp_lse = torch.logsumexp(scale * args64[0] @ args64[1].mT, -1) / math.log(2)
    _close(lse, exp_lse, dtype, "lse")


def test_fwd_jvp_kernel_zero_tangents_give_zero_and_forward_matches_attention_fwd(device):
    from fastcm.kernels.attention import attention_fwd, attention_fwd_jvp

    q, k, v = _qkv((1, 2, 20, 48), (1, 2, 70, 48), torch.float32, device)
    zeros = [torch.zeros_like(t) for t in (q, k, v)]
    out, tout = torch.empty_like(q), torch.full_like(q, float("nan"))
    lse = attention_fwd_jvp(q, k, v, *zeros, out, tout, 0.3)
    ref_out = torch.empty_like(q)
    ref_lse = attention_fwd(q, k, v, ref_out, 0.3)
    assert torch.equal(tout, torch.zeros_like(tout))
    _close(out, ref_out, torch.float32, "out")
    _close(lse, ref_lse, torch.float32, "lse")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_op_forward_ad_matches_reference_jvp(dtype, device):
    # Before the autograd.Function wrapper, torch.func.jvp through the custom op returned a zero tangent silently.
    import torch.autograd.forward_ad as fwAD

    q, k, v = _qkv((1, 2, 21, 40), (1, 2, 70, 40), dtype, device, seed=3)
    t = [t.to(device) for t in _qkv((1, 2, 21, 40), (1, 2, 70, 40), dtype, "cpu", seed=4)]
    out, t_out = torch.func.jvp(lambda a, b, c: attention(a, b, c, impl="triton"), (q, k, v), tuple(t))
    exp, t_exp = torch.func.jvp(attention_ref, tuple(x.double() for x in (q, k, v)), tuple(x.double() for x in t))
    _close(out, exp, dtype, "out")
    _close(t_out, t_exp, dtype, "tangent", grad=True)
    with torch.no_grad(), fwAD.dual_level():  # the cheap sCM / MeanFlow path: a tangent on k only, no graph
        dual = attention(q, fwAD.make_dual(k, t[1]), v, impl="triton")
        t_k = fwAD.unpack_dual(dual).tangent
    _, t_k_exp = torch.func.jvp(lambda b: attention_ref(q.double(), b, v.double()), (k.double(),), (t[1].double(),))
    _close(t_k, t_k_exp, dtype, "tangent along k", grad=True)


def test_qkv_op_forward_ad_matches_reference_jvp(device):
    qkv = torch.randn(2, 3 * 64, 5, 3, device=device, dtype=torch.float64)[:, :, :4]  # cropped view
    t_qkv = torch.randn(2, 3 * 64, 4, 3, device=device, dtype=torch.float64)
    out, t_out = torch.func.jvp(lambda x: qkv_attention(x, 2, impl="triton"), (qkv,), (t_qkv,))
    exp, t_exp = torch.func.jvp(lambda x: qkv_attention_ref(x, 2), (qkv,), (t_qkv,))
    _close(out, exp, torch.float64, "out")
    _close(t_out, t_exp, torch.float64, "tangent", grad=True)
    # Reverse mode through the primal output of torch.func.jvp still works (same kernels as the custom op).
    leaf = qkv.detach().requires_grad_()
    torch.func.jvp(lambda x: qkv_attention(x, 2, impl="triton"), (leaf,), (t_qkv,))[0].sum().backward()
    exp_leaf = qkv.detach().requires_grad_()
    qkv_attention_ref(exp_leaf, 2).sum().backward()
    _close(leaf.grad, exp_leaf.grad, torch.float64, "d qkv", grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_cuda_head_dim_256_fp32_follows_torchs_tf32_setting(precision):
    # cifar10's 256-wide head; TF32 rounds operands to 10 mantissa bits, as fp16 does: fp16's tolerances.
    from fastcm.kernels import attention as kernels
    from fastcm.kernels._utils import shared_memory_limit

    assert shared_memory_limit(torch.device("cuda")) >= 99 * 1024
    matmul = torch.backends.cuda.matmul
    saved, matmul.fp32_precision = matmul.fp32_precision, precision
    try:
        inputs = _qkv((4, 1, 256, 256), (4, 1, 256, 256), torch.float32, "cuda")
        grad_out = torch.randn(4, 1, 256, 256, device="cuda")
        assert kernels.dot_precision(inputs[0]) == precision
        out, grads = _run(_triton, inputs, grad_out)
    finally:
        matmul.fp32_precision = saved
    exp, exp_grads = _run(attention_ref, [t.double() for t in inputs], grad_out.double())
    tol_dtype = torch.float32 if precision == "ieee" else torch.float16
    _close(out, exp, tol_dtype, f"out {precision}")
    for name, g, e in zip("qkv", grads, exp_grads):
        _close(g, e, tol_dtype, f"d{name} {precision}", grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_head_dim_256_and_jvp_half_precision(dtype):
    inputs = _qkv((2, 1, 256, 256), (2, 1, 256, 256), dtype, "cuda")
    _check_against_fp64(_triton, attention_ref, inputs, dtype, torch.randn(2, 1, 256, 256, device="cuda"))
    tangents = _qkv((2, 1, 256, 256), (2, 1, 256, 256), dtype, "cuda", seed=1)
    _, t_out = torch.func.jvp(_triton, tuple(inputs), tuple(tangents))
    _, t_exp = torch.func.jvp(attention_ref, tuple(t.double() for t in inputs), tuple(t.double() for t in tangents))
    _close(t_out, t_exp, dtype, "tangent", grad=True)
