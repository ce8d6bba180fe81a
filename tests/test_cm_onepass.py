"""sCT and MeanFlow in one network pass (jvp_mode="one_pass": forward-AD duals under autograd) against the
two-pass oracle (torch.func.jvp without graph, then a trainable forward with the same dropout seed): the loss and
every parameter gradient agree, with dropout on and off, on the reference ops (fp64, tight) and on the Triton route
under the interpreter (fp32); per attention / GroupNorm layer one forward-side launch; a module without a forward-AD
rule is named."""
import contextlib

import pytest
import torch
from torch import nn

from fastcm.cm.jvp import check_triton_tangents
from fastcm.cm.meanflow import MeanFlowLoss, MeanFlowModel
from fastcm.cm.sct import SCTLoss, TrigFlowModel
from fastcm.models import build_unet


def _model(method, dtype, dropout, impl="torch"):
    torch.manual_seed(0)
    kw = dict(time_scale=1.0) if method == "sct" else dict(time_inputs=2)
    net = build_unet("tiny", impl=impl, dropout=dropout, **kw)
    for m in net.modules():  # random last layers: outputs and tangents are not identically zero
        if isinstance(m, nn.Conv2d) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.2)
    model = TrigFlowModel(net) if method == "sct" else MeanFlowModel(net)
    if method == "sct":
        nn.init.normal_(model.weight.linear.weight, std=0.3)  # a non-trivial w_phi(t)
    return model.to(dtype).train()


def _loss(method, mode):
    if method == "sct":  # warm-up r = 0.5 and normalisation on: the whole of Alg. 1
        return SCTLoss(warmup_steps=10, jvp_mode=mode)
    return MeanFlowLoss(jvp_mode=mode)


def _loss_and_grads(model, loss, x0):
    per = loss(model, x0, 5, generator=torch.Generator().manual_seed(7))
    params = [p for p in model.parameters() if p.requires_grad]
    return per.detach(), torch.autograd.grad(per.mean(), params)


@pytest.mark.parametrize("method", ["sct", "meanflow"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_one_pass_equals_two_pass_on_the_reference_ops(method, dropout):
    model = _model(method, torch.float64, dropout)
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    per1, g1 = _loss_and_grads(model, _loss(method, "one_pass"), x0)
    per2, g2 = _loss_and_grads(model, _loss(method, "two_pass"), x0)
    assert per1.abs().min() > 0
    torch.testing.assert_close(per1, per2, rtol=1e-12, atol=1e-12)
    assert len(g1) == len(list(model.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert sum(g.abs().sum() for g in g1) > 0


def _launches(monkeypatch):
    """Records the attention / GroupNorm kernel launches by kernel name."""
    from fastcm.kernels import attention as A, group_norm as G

    seen = []

    class Recorder:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            seen.append(self.name)
            return self.kernel[grid]

    for module in (A, G):
        for name in dir(module):
            if name.endswith("_kernel") and name.startswith(("_attn", "_group_norm")):
                monkeypatch.setattr(module, name, Recorder(getattr(module, name), name))
    return seen


@pytest.mark.parametrize("method", ["sct", "meanflow"])
def test_one_pass_on_the_triton_route_one_launch_per_layer(method, monkeypatch):
    """Interpreted Triton route, fp32, dropout on: one_pass equals the reference ops' two_pass to fp32 round-off,
    and the step launches, per GroupNorm and per attention layer, the output-and-tangent kernel once and no plain
    forward kernel, plus the backward's launches."""
    model = _model(method, torch.float32, 0.3)
    x0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    per2, g2 = _loss_and_grads(model, _loss(method, "two_pass"), x0)
    model.unet.set_impl("triton")
    check_triton_tangents(x0.device)  # the once-per-device route probe launches too: not part of the step
    seen = _launches(monkeypatch)
    per1, g1 = _loss_and_grads(model, _loss(method, "one_pass"), x0)
    n_gn = sum(type(m).__name__ == "GroupNorm" for m in model.modules())
    n_attn = sum(bool(getattr(m, "num_heads", 0)) and hasattr(m, "qkv") for m in model.modules())
    count = {k: seen.count(k) for k in set(seen)}
    assert n_gn > 0 and n_attn > 0
    assert count.pop("_group_norm_jvp_fused_kernel") == n_gn and count.pop("_attn_fwd_jvp_kernel") == n_attn
    assert count.pop("_group_norm_bwd_fused_kernel") == n_gn  # the backward's launches, and nothing else
    # FA2's backward (the default schedule): dQ is added with atomics by the dK/dV kernel, no dQ kernel
    assert count == {"_attn_bwd_preprocess_kernel": n_attn, "_attn_bwd_dkdv_kernel": n_attn}, count
    torch.testing.assert_close(per1, per2, rtol=2e-5, atol=2e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@torch.library.custom_op("fastcm_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


class _NoForwardAD(torch.autograd.Function):
    """An op with a backward but no forward-AD rule: under forward_ad its output carries no tangent."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class _Opaque(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


def _double_no_grad(x):
    with torch.no_grad():  # a custom_op outside autograd: its output silently carries no tangent
        return _double(x)


@pytest.mark.parametrize("op, what", [(_NoForwardAD.apply, "raised NotImplementedError"), (_double, "raised"),
                                      (_double_no_grad, "no tangent")])
def test_a_module_without_a_forward_ad_rule_is_named(op, what):
    """A Function without jvp or a bare custom_op raises; a custom_op run without autograd drops the tangent
    silently: each names the module."""
    model = _model("meanflow", torch.float64, 0.0)
    model.unet.conv_out = nn.Sequential(model.unet.conv_out, _Opaque(op))
    x0 = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=rf"module unet.conv_out.1 \(_Opaque\) has no forward-AD rule .*{what}"
                       r".*jvp_mode='two_pass'"):
        MeanFlowLoss()(model, x0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="jvp_mode must be one of"):
        SCTLoss(jvp_mode="fused")


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.n[name] = self.n.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_the_one_pass_runs_two_convolutions_per_conv_layer_and_the_native_group_norm():
    """Primal and tangent conv(x_t, W) only (torch's own rule adds a third, of the input with a zero weight
    tangent); the trainable GroupNorm output is torch.group_norm's, whose fused backward the plain step uses."""
    from fastcm.ops import GroupNorm

    model = _model("sct", torch.float32, 0.0)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_norms = sum(isinstance(m, GroupNorm) for m in model.modules())
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with _OpCounter() as count:
        SCTLoss(warmup_steps=10)(model, x0, 5, generator=torch.Generator().manual_seed(7)).mean().backward()
    assert count.n["convolution"] == 2 * n_convs
    assert count.n["native_group_norm"] == n_norms and count.n["native_group_norm_backward"] == n_norms


@pytest.mark.parametrize("conv", [
    dict(stride=2, padding=1), dict(groups=2, dilation=2, padding=2), dict(padding=1, padding_mode="reflect")])
def test_the_conv_tangent_matches_torch_func_jvp(conv):
    from fastcm.cm.jvp import dual_pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, **conv), nn.SiLU(), nn.Conv2d(6, 2, 1)).double()
    x, v = torch.randn(2, 4, 9, 9, dtype=torch.float64), torch.randn(2, 4, 9, 9, dtype=torch.float64)
    out, tangent = dual_pass(model, model, (x,), (v,))
    want_out, want_tangent = torch.func.jvp(model, (x,), (v,))
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(tangent, want_tangent)
    (g,) = torch.autograd.grad(out.sum(), model[0].weight)
    (want_g,) = torch.autograd.grad(model(x).sum(), model[0].weight)
    torch.testing.assert_close(g, want_g)


@pytest.mark.parametrize("op", ["group_norm", "qkv_attention"])
def test_split_duals_saves_no_tangents_and_keeps_value_tangent_and_gradient(op):
    """Under split_duals (entered by the one pass) a reference route on forward-AD duals takes its trainable output
    from the primals, so autograd saves plain tensors (no tangent kept alive until the level closes), and computes
    the tangent without a graph: value, tangent and gradient equal torch.func.jvp / autograd of the reference."""
    import torch.autograd.forward_ad as fwAD

    from fastcm.ops import group_norm, qkv_attention
    from fastcm.ops._jvp import split_duals

    g = torch.Generator().manual_seed(0)
    if op == "group_norm":
        x, v = torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64), torch.randn(2, 8, 5, 5, generator=g,
                                                                                        dtype=torch.float64)
        w = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
        f = lambda x: group_norm(x, 4, w, None, 1e-5, None, None, "silu", impl="torch")  # noqa: E731
    else:
        x, v = torch.randn(2, 24, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 24, 3, 5, generator=g,
                                                                                         dtype=torch.float64)
        w = x.requires_grad_()  # the gradient is taken with respect to the primal input itself
        f = lambda x: qkv_attention(x, 2, impl="torch")  # noqa: E731
    with torch.no_grad():
        want, want_t = torch.func.jvp(f, (x,), (v,))
    (want_g,) = torch.autograd.grad(f(x).square().sum(), w)
    for split, saved_duals in ((True, 0), (False, None)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with fwAD.dual_level(), (split_duals() if split else contextlib.nullcontext()):
                y, t = fwAD.unpack_dual(f(fwAD.make_dual(x, v)))
                n = sum(fwAD.unpack_dual(s).tangent is not None for s in saved)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(t, want_t)
        (got_g,) = torch.autograd.grad(y.square().sum(), w)  # after the level closes, as in the one pass
        torch.testing.assert_close(got_g, want_g)
        assert (n == 0) if split else (n > 0), (split, n)


def _dual_call(f, primals, tangents):
    """f on forward-AD duals under split_duals, as the one pass calls it: (value, tangent) after the level closes."""
    import torch.autograd.forward_ad as fwAD

    from fastcm.ops._jvp import split_duals

    with fwAD.dual_level(), split_duals():
        duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        y, t = fwAD.unpack_dual(f(*duals))
    return y, t


@pytest.mark.parametrize("case", ["all-cl", "bias-only", "scale-tangents", "no-act-weightless", "1x1-groups"])
def test_the_group_norm_closed_form_tangent_equals_forward_ad_of_the_reference(case):
    """The reference route's one-pass rule (torch.native_group_norm's statistics and pre-activation feed the
    closed-form tangent) against torch.func.jvp of the reference: value, tangent and every parameter gradient,
    with channels_last, absent parameters and tangents on scale/shift (the U-Net's embedding)."""
    from fastcm.ops import group_norm, group_norm_ref

    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    shape, G = ((1, 6, 1, 1), 6) if case == "1x1-groups" else ((2, 6, 5, 3), 3)
    x, x_t = r(*shape), r(*shape)
    if case == "all-cl":
        x, x_t = x.to(memory_format=torch.channels_last), x_t.to(memory_format=torch.channels_last)
    N, C = shape[:2]
    w, b, s, sh = r(C), r(C), r(N, C), r(N, C)
    use = {"all-cl": "wbst", "bias-only": "b", "scale-tangents": "wbst", "no-act-weightless": "bs",
           "1x1-groups": "wbst"}[case]
    params = [p.requires_grad_() if n in use else None for n, p in zip("wbst", (w, b, s, sh))]
    p_tangents = [r(*p.shape) if p is not None and (case == "scale-tangents" or n in "st") else None
                  for n, p in zip("wbst", params)]
    act = None if case == "no-act-weightless" else "silu"
    present = [i for i, p in enumerate(params) if p is not None]

    def call(fn, x, *ps):
        full = list(params)
        for i, p in zip(present, ps):
            full[i] = p
        return fn(x, G, full[0], full[1], 1e-5, full[2], full[3], act)

    ps = [params[i] for i in present]
    pts = [p_tangents[i] for i in present]
    with torch.no_grad():
        want, want_t = torch.func.jvp(lambda *a: call(group_norm_ref, *a), (x, *ps),
                                      (x_t, *[torch.zeros_like(p) if t is None else t for p, t in zip(ps, pts)]))
    y, t = _dual_call(lambda *a: call(lambda *b: group_norm(*b, impl="torch"), *a), (x, *ps), (x_t, *pts))
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(t, want_t)
    got = torch.autograd.grad(y.square().sum(), ps)
    ref = torch.autograd.grad(call(group_norm_ref, x, *ps).square().sum(), ps)
    for a, b_ in zip(got, ref):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("which", ["qkv", "q", "kv", "v"])
def test_the_attention_closed_form_tangent_equals_forward_ad_of_the_reference(which):
    """attention(impl="torch")'s one-pass rule (4 matmuls from the trainable pass's softmax weights) against
    torch.func.jvp of the reference, with tangents on any subset of q, k, v, sliced (non-contiguous) inputs and
    Lq != Lk; the gradients of the trainable output equal autograd of the reference."""
    from fastcm.ops import attention, attention_ref

    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = r(2, 3, 7, 10)[..., :8].requires_grad_()
    k, v = r(2, 3, 5, 8).requires_grad_(), r(2, 3, 5, 8).transpose(-1, -2).contiguous().transpose(-1, -2)
    v.requires_grad_()
    tangents = [r(*a.shape) if n in which else None for n, a in zip("qkv", (q, k, v))]
    with torch.no_grad():
        want, want_t = torch.func.jvp(lambda a, b, c: attention_ref(a, b, c, 0.3), (q, k, v),
                                      tuple(torch.zeros_like(a) if t is None else t
                                            for a, t in zip((q, k, v), tangents)))
    y, t = _dual_call(lambda a, b, c: attention(a, b, c, 0.3, impl="torch"), (q, k, v), tangents)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(t, want_t)
    got = torch.autograd.grad(y.square().sum(), (q, k, v))
    ref = torch.autograd.grad(attention_ref(q, k, v, 0.3).square().sum(), (q, k, v))
    for a, b_ in zip(got, ref):
        torch.testing.assert_close(a, b_)
