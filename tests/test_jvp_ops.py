"""Forward-mode AD (JVP) through the ops: torch.func.jvp and torch.autograd.forward_ad, on the reference and the
Triton (interpreted) routes, vs torch.func.jvp of plain fp64 oracles written here from the definitions.

A custom_op alone gives a silently zero tangent (torch 2.13 has no forward-AD hook for a custom_op); every test below fails on such a route.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from fastcm.ops import group_norm, pseudo_huber_loss, sqrtm
from helpers import assert_close

IMPLS = ["torch", "triton"]


def _rand(*shape, seed, dtype=torch.float64, std=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + offset).to(dtype)


def _jvp_both_ways(fn, primals, tangents):
    """(output, tangent) from torch.func.jvp and from forward_ad dual tensors; both must agree exactly."""
    out, out_dot = torch.func.jvp(fn, primals, tangents)
    with fwAD.dual_level():
        dual = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        fw_out, fw_dot = fwAD.unpack_dual(dual)
    assert fw_dot is not None, "forward_ad returned no tangent"
    torch.testing.assert_close(fw_out, out, atol=0, rtol=0)
    torch.testing.assert_close(fw_dot, out_dot, atol=0, rtol=0)
    return out, out_dot


# ----------------------------------------------------------------------------------------------------------------
# GroupNorm + affine + (1 + scale) / shift + SiLU

def _gn_oracle(x, G, weight, bias, scale, shift, act):
    """fp64 definition on a contiguous copy (F.group_norm's forward AD works on contiguous NCHW)."""
    per_nc = x.shape[:2] + (1,) * (x.dim() - 2)
    y = F.group_norm(x.contiguous(), G, weight, bias, 1e-5) * (1 + scale.view(per_nc)) + shift.view(per_nc)
    return F.silu(y) if act == "silu" else y


GN_LAYOUTS = {
    "nchw": lambda x: x,
    "channels_last": lambda x: x.to(memory_format=torch.channels_last),
    "sliced": lambda x: torch.cat([x, x], 1)[:, 2:2 + x.shape[1]],   # channel slice: read in place
}


def _gn_case(shape, G, dtype, layout, seed=0):
    N, C = shape[:2]
    x = GN_LAYOUTS[layout](_rand(*shape, seed=seed, offset=0.5)).detach()
    x_dot = GN_LAYOUTS[layout](_rand(*shape, seed=seed + 1)).detach()
    params = [_rand(C, seed=seed + 2, std=0.5, offset=1.0), _rand(C, seed=seed + 3, std=0.5),
              _rand(N, C, seed=seed + 4, std=0.5), _rand(N, C, seed=seed + 5, std=0.5)]
    dots = [_rand(*p.shape, seed=seed + 6 + i) for i, p in enumerate(params)]
    primals = (x.to(dtype), *(p.to(dtype) for p in params))
    tangents = (x_dot.to(dtype), *(d.to(dtype) for d in dots))
    return primals, tangents


def _check_gn(shape, G, impl, layout, act, dtype):
    primals, tangents = _gn_case(shape, G, dtype, layout)

    def fn(x, w, b, s, sh):
        return group_norm(x, G, w, b, 1e-5, s, sh, act, impl=impl)

    out, out_dot = _jvp_both_ways(fn, primals, tangents)
    oracle = lambda *a: _gn_oracle(*a[:1], G, *a[1:], act)  # noqa: E731
    ref, ref_dot = torch.func.jvp(oracle, tuple(p.double() for p in primals), tuple(t.double() for t in tangents))
    assert out_dot.dtype == dtype and out_dot.shape == out.shape and ref_dot.abs().max() > 0.1
    M = shape[1] // G * primals[0][0, 0].numel()
    assert_close(out, ref, dtype, reduce_len=M)
    assert_close(out_dot, ref_dot, dtype, reduce_len=M)
    return primals, tangents, fn


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("layout", GN_LAYOUTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_jvp_fp64(impl, layout, act):
    _check_gn((2, 6, 3, 5), 2, impl, layout, act, torch.float64)  # 3 channels per group: masked channel lanes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", GN_LAYOUTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_jvp_low_precision(impl, layout, dtype):
    _check_gn((2, 8, 4, 4), 4, impl, layout, "silu", dtype)


def test_group_norm_jvp_small_groups_use_the_kernel(monkeypatch):
    # Groups that fit the tile take the one-pass kernel, not the torch formula.
    import sys

    def fail(*args):
        raise AssertionError("the reference tangent ran")

    monkeypatch.setattr(sys.modules["fastcm.ops.group_norm"], "group_norm_tangent_ref", fail)
    _check_gn((2, 6, 3, 5), 2, "triton", "channels_last", "silu", torch.float64)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_jvp_3d_and_tangent_on_x_only(impl):
    # A transposed (B, C, L) view, and tangents on x alone (parameters without tangents, sCM's weights).
    x = _rand(2, 10, 8, seed=3).transpose(1, 2)
    x_dot = _rand(2, 8, 10, seed=4)
    w, b = _rand(8, seed=5, offset=1.0), _rand(8, seed=6)
    fn = lambda x: group_norm(x, 4, w, b, act="silu", impl=impl)  # noqa: E731
    _, out_dot = _jvp_both_ways(fn, (x,), (x_dot,))
    oracle = lambda x: F.silu(F.group_norm(x.contiguous(), 4, w, b, 1e-5))  # noqa: E731
    assert_close(out_dot, torch.func.jvp(oracle, (x,), (x_dot,))[1], torch.float64, reduce_len=20)


def test_group_norm_jvp_large_group_takes_the_reference_tangent():
    # 4 x 4096 elements per group: past the tangent kernel's tile, the Triton route's jvp uses the reference
    # formula (the primal still runs the split kernels); same answer.
    from fastcm.kernels.group_norm import jvp_fits

    primals, _ = _gn_case((1, 4, 64, 64), 1, torch.float64, "nchw")
    assert not jvp_fits(primals[0], 1)
    _check_gn((1, 4, 64, 64), 1, "triton", "nchw", "silu", torch.float64)


def test_group_norm_backward_through_jvp_primal():
    # The primal output of torch.func.jvp stays differentiable (the Function's backward is the op's backward).
    primals, tangents = _gn_case((2, 4, 3, 3), 2, torch.float64, "channels_last")
    leaves = [p.clone().requires_grad_() for p in primals]
    out, _ = torch.func.jvp(lambda *a: group_norm(a[0], 2, *a[1:3], 1e-5, *a[3:], "silu", impl="triton"),
                            tuple(leaves), tangents)
    dy = _rand(*out.shape, seed=9)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [p.detach().clone().requires_grad_() for p in primals]
    ref = _gn_oracle(ref_leaves[0], 2, *ref_leaves[1:], "silu")
    for g, e in zip(grads, torch.autograd.grad(ref, ref_leaves, dy)):
        assert_close(g, e, torch.float64, reduce_len=18)


def test_group_norm_jvp_kernel_writes_y_and_tangent_in_one_pass():
    # The fused kernel alone (WRITE_Y): y and y' from one read of x and x'.
    primals, tangents = _gn_case((2, 6, 3, 5), 3, torch.float64, "channels_last")
    x, w, b, s, sh = primals
    y, y_dot, mean, rstd = torch.ops.fastcm.group_norm_jvp(x, tangents[0], 3, w, b, 1e-5, s, sh, *tangents[1:],
                                                           True, True)
    ref, ref_dot = torch.func.jvp(lambda *a: _gn_oracle(a[0], 3, *a[1:], "silu"), primals, tangents)
    assert y.stride() == x.stride()
    xg = x.reshape(2, 3, -1)  # the statistics the backward reads, as the forward kernel writes them
    assert_close(mean, xg.mean(-1), torch.float64, reduce_len=10)
    assert_close(rstd, (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), torch.float64, reduce_len=10)
    assert_close(y, ref, torch.float64, reduce_len=30)
    assert_close(y_dot, ref_dot, torch.float64, reduce_len=30)


def test_custom_op_alone_gives_no_tangent():
    # Why the rule exists: the bare custom op's tangent is silently zero under torch.func.jvp.
    primals, tangents = _gn_case((1, 4, 2, 2), 2, torch.float64, "nchw")
    fn = lambda x: torch.ops.fastcm.group_norm_fwd(x, 2, None, None, 1e-5, None, None, False, 0)[0]  # noqa: E731
    assert not torch.func.jvp(fn, primals[:1], tangents[:1])[1].any()


def test_compiled_jvp_through_triton_raises():
    primals, tangents = _gn_case((1, 4, 2, 2), 2, torch.float64, "nchw")
    fn = lambda x, x_dot: torch.func.jvp(lambda x: group_norm(x, 2, impl="triton"), (x,), (x_dot,))  # noqa: E731
    with pytest.raises(Exception, match="pytorch/issues/192985"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(primals[0], tangents[0])


def test_compiled_plain_forward_backward_unaffected():
    # No tangent: the custom op is what Dynamo sees (fullgraph), as before the rule existed.
    primals, _ = _gn_case((2, 4, 3, 3), 2, torch.float64, "channels_last")
    x = primals[0].clone().requires_grad_()
    step = lambda x: group_norm(x, 2, *primals[1:3], 1e-5, *primals[3:], "silu", impl="triton").sum()  # noqa
    torch.compile(step, fullgraph=True, backend="aot_eager")(x).backward()
    x_ref = primals[0].clone().requires_grad_()
    _gn_oracle(x_ref, 2, *primals[1:], "silu").sum().backward()
    assert_close(x.grad, x_ref.grad, torch.float64, reduce_len=18)


# ----------------------------------------------------------------------------------------------------------------
# Pseudo-Huber loss

def _ph_oracle(pred, target, c, weight, reduction, per):
    diff = pred - target
    sq = diff.square().flatten(1).sum(1) if per == "sample" else diff.square()
    loss = (torch.sqrt(sq + c * c) - c) * weight.view(-1, *([1] * (sq.dim() - 1)))
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("per", ["sample", "element"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pseudo_huber_jvp(impl, per, reduction, dtype):
    base = _rand(3, 2, 5, 12, seed=0)
    pred = base[..., ::2].to(dtype)                               # strided rows
    target = _rand(3, 6, 5, 2, seed=1).permute(0, 3, 2, 1).to(dtype)
    weight = (_rand(3, seed=2).abs() + 0.5).to(dtype)
    primals = (pred, target, weight)
    tangents = tuple(_rand(*p.shape, seed=10 + i).to(dtype) for i, p in enumerate(primals))
    fn = lambda p, t, w: pseudo_huber_loss(p, t, 0.05, w, reduction=reduction, per=per, impl=impl)  # noqa: E731
    out, out_dot = _jvp_both_ways(fn, primals, tangents)
    ref, ref_dot = torch.func.jvp(lambda *a: _ph_oracle(*a[:2], 0.05, a[2], reduction, per),
                                  tuple(p.double() for p in primals), tuple(t.double() for t in tangents))
    assert ref_dot.abs().max() > 0.1
    assert_close(out, ref, dtype, reduce_len=60)
    assert_close(out_dot, ref_dot, dtype, reduce_len=60)


# ----------------------------------------------------------------------------------------------------------------
# Matrix square root

def _sqrtm_oracle(a):
    lam, v = torch.linalg.eigh(a)  # distinct eigenvalues: eigh's forward AD is exact
    return (v * lam.sqrt().unsqueeze(-2)) @ v.mT


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("impl", IMPLS)
def test_sqrtm_jvp(impl, dtype):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(2, 6, 6, generator=g, dtype=torch.float64))
    a = (q * torch.linspace(0.2, 1.0, 6, dtype=torch.float64)) @ q.mT
    a = (a + a.mT) / 2
    e = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    e = e + e.mT
    fn = lambda a: sqrtm(a, num_iters=30, impl=impl)  # noqa: E731
    out, out_dot = _jvp_both_ways(fn, (a.to(dtype),), (e.to(dtype),))
    ref, ref_dot = torch.func.jvp(_sqrtm_oracle, (a,), (e,))
    assert ref_dot.abs().max() > 0.1 and out_dot.dtype == dtype
    assert_close(out, ref, dtype, reduce_len=6)
    assert_close(out_dot, ref_dot, dtype, reduce_len=36)


@pytest.mark.parametrize("use", [(), ("weight",), ("bias", "scale"), ("weight", "bias", "scale", "shift")],
                         ids=lambda u: "+".join(u) or "none")
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_tangent_reference_formula(use, silu):
    # The torch form of the tangent (large groups' route) with absent parameters and absent tangents.
    from fastcm.ops.group_norm import group_norm_tangent_ref

    primals, tangents = _gn_case((2, 6, 3, 5), 3, torch.float64, "channels_last")
    names = ("weight", "bias", "scale", "shift")
    params = [p if n in use else None for n, p in zip(names, primals[1:])]
    dots = [d if n in use[:1] else None for n, d in zip(names, tangents[1:])]  # only the first one has a tangent
    y_dot = group_norm_tangent_ref(primals[0], tangents[0], 3, *params[:2], 1e-5, *params[2:], *dots, silu)

    def oracle(x, *present):
        full = iter(present)
        w, b, s, sh = (next(full) if p is not None else None for p in params)
        y = F.group_norm(x.contiguous(), 3, w, b if w is not None else None, 1e-5)
        y = y if w is not None or b is None else y + b.view(1, -1, 1, 1)
        y = y if s is None else y * (1 + s.view(2, 6, 1, 1))
        y = y if sh is None else y + sh.view(2, 6, 1, 1)
        return F.silu(y) if silu else y

    present = [p for p in params if p is not None]
    present_dots = [d if d is not None else torch.zeros_like(p) for p, d in zip(params, dots) if p is not None]
    ref_dot = torch.func.jvp(oracle, (primals[0], *present), (tangents[0], *present_dots))[1]
    assert_close(y_dot, ref_dot, torch.float64, reduce_len=45)


def test_group_norm_jvp_opcheck():
    primals, tangents = _gn_case((2, 4, 2, 3), 2, torch.float32, "channels_last")
    x, w, b, s, sh = primals
    for write_y in (True, False):
        torch.library.opcheck(torch.ops.fastcm.group_norm_jvp.default,
                              (x, tangents[0], 2, w, b, 1e-5, s, sh, *tangents[1:], True, write_y))
    torch.library.opcheck(torch.ops.fastcm.group_norm_jvp.default,
                          (x, None, 2, None, None, 1e-5, None, None, None, None, None, None, False, False))


def test_compiled_jvp_through_the_reference_route():
    # The reference route's mean/var form compiles under torch.func.jvp (aten's group_norm fails there).
    primals, tangents = _gn_case((2, 4, 3, 3), 2, torch.float64, "channels_last")

    def fn(*primals_and_tangents):
        p, t = primals_and_tangents[:5], primals_and_tangents[5:]
        return torch.func.jvp(lambda x, w, b, s, sh: group_norm(x, 2, w, b, 1e-5, s, sh, "silu", impl="torch"), p, t)

    _, out_dot = torch.compile(fn, fullgraph=True, backend="aot_eager")(*primals, *tangents)
    ref_dot = torch.func.jvp(lambda *a: _gn_oracle(a[0], 2, *a[1:], "silu"), primals, tangents)[1]
    assert_close(out_dot, ref_dot, torch.float64, reduce_len=18)


# ----------------------------------------------------------------------------------------------------------------
# Attention (the one-pass forward-with-tangent kernel, sCM App. F) and qkv_attention, through the same JvpRule.

def _attn_oracle(q, k, v, scale):
    """fp64 definition: softmax(s Q K^T) V."""
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


def _attn_case(B, H, Lq, Lk, D, dtype, seed=10):
    q = _rand(B, H, Lq, D, seed=seed)
    k = _rand(B, H, D, Lk, seed=seed + 1).transpose(-1, -2)     # a transposed view: other strides than q
    v = torch.cat([_rand(B, H, Lk, D, seed=seed + 2)] * 2, -1)[..., 1:D + 1]   # a sliced view, non-unit stride 0
    tangents = tuple(_rand(*t.shape, seed=seed + 3 + i) for i, t in enumerate((q, k, v)))
    return tuple(t.to(dtype) for t in (q, k, v)), tuple(t.to(dtype) for t in tangents)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("Lq, Lk, D", [(7, 12, 16), (20, 5, 40)])
def test_attention_jvp(impl, dtype, Lq, Lk, D):
    from fastcm.ops import attention
    primals, tangents = _attn_case(2, 2, Lq, Lk, D, dtype)
    scale = D ** -0.5
    out, out_dot = _jvp_both_ways(lambda q, k, v: attention(q, k, v, scale, impl=impl), primals, tangents)
    ref, ref_dot = torch.func.jvp(lambda q, k, v: _attn_oracle(q, k, v, scale), tuple(p.double() for p in primals),
                                  tuple(t.double() for t in tangents))
    assert out_dot.dtype == dtype and ref_dot.abs().max() > 0.1
    assert_close(out, ref, dtype, reduce_len=Lk)
    assert_close(out_dot, ref_dot, dtype, reduce_len=Lk)


@pytest.mark.parametrize("impl", IMPLS)
def test_qkv_attention_jvp_and_backward_through_the_primal(impl):
    from fastcm.ops import qkv_attention, qkv_attention_ref
    qkv, t_qkv = _rand(2, 3 * 32, 3, 5, seed=20), _rand(2, 3 * 32, 3, 5, seed=21)
    out, out_dot = _jvp_both_ways(lambda x: qkv_attention(x, 2, impl=impl), (qkv,), (t_qkv,))
    ref, ref_dot = torch.func.jvp(lambda x: qkv_attention_ref(x, 2), (qkv,), (t_qkv,))
    assert ref_dot.abs().max() > 0.1
    assert_close(out_dot, ref_dot, torch.float64, reduce_len=15)
    leaf = qkv.clone().requires_grad_()
    torch.func.jvp(lambda x: qkv_attention(x, 2, impl=impl), (leaf,), (t_qkv,))[0].square().sum().backward()
    leaf_ref = qkv.clone().requires_grad_()
    qkv_attention_ref(leaf_ref, 2).square().sum().backward()
    assert_close(leaf.grad, leaf_ref.grad, torch.float64, reduce_len=15)


def test_compiled_attention_jvp_through_triton_raises_and_the_reference_compiles():
    from fastcm.ops import attention
    # Contiguous inputs: Dynamo's fake tensors of strided views with differently laid-out tangents fail earlier
    # (an internal assert of torch 2.13), which is an error too, but not the one this test pins.
    (q, k, v), (tq, tk, tv) = (tuple(t.contiguous() for t in ts) for ts in _attn_case(1, 1, 4, 6, 16, torch.float64))

    def jvp(impl):
        return lambda q, k, v, tq, tk, tv: torch.func.jvp(lambda a, b, c: attention(a, b, c, impl=impl), (q, k, v),
                                                         (tq, tk, tv))

    with pytest.raises(Exception, match="pytorch/issues/192985"):
        torch.compile(jvp("triton"), fullgraph=True, backend="aot_eager")(q, k, v, tq, tk, tv)
    _, got = torch.compile(jvp("torch"), fullgraph=True, backend="aot_eager")(q, k, v, tq, tk, tv)
    _, want = torch.func.jvp(lambda a, b, c: _attn_oracle(a, b, c, 16 ** -0.5), (q, k, v), (tq, tk, tv))
    assert_close(got, want, torch.float64, reduce_len=6)
