"""Pseudo-Huber loss: Triton (interpreted on CPU) vs reference vs closed form."""
import math

import pytest
import torch

from fastcm.ops import REGISTRY, pseudo_huber_loss, pseudo_huber_loss_ref
from helpers import assert_close

SHAPES = {
    "minimal": (1, 1, 1, 1),
    "odd": (3, 3, 7, 7),
    "cifar": (64, 3, 32, 32),
    "2d": (5, 37),
}


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    target = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    weight = (torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    return pred, target, weight


def _closed_form(pred, target, c, weight, per):
    diff = (pred.double() - target.double()).cpu()
    sq = diff.pow(2).flatten(1).sum(1) if per == "sample" else diff.pow(2)
    loss = (sq + c * c).sqrt() - c
    if weight is not None:
        loss = loss * weight.double().cpu().view(-1, *([1] * (loss.dim() - 1)))
    return loss


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("per", ["sample", "element"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_forward_matches_closed_form(shape, per, reduction, with_weight, device):
    pred, target, weight = _inputs(shape, torch.float32, device)
    weight = weight if with_weight else None
    c = 0.00054 * math.sqrt(pred[0].numel())
    expected = _closed_form(pred, target, c, weight, per)
    expected = {"none": expected, "mean": expected.mean(), "sum": expected.sum()}[reduction]
    n = pred[0].numel() if per == "sample" else 1
    for impl in ("triton", "torch"):
        out = pseudo_huber_loss(pred, target, c, weight, reduction=reduction, per=per, impl=impl)
        assert out.dtype == torch.float32
        assert_close(out, expected, torch.float32, reduce_len=n * (expected.numel() if reduction != "none" else 1),
                     msg=impl)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("per", ["sample", "element"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_gradients_match_reference(shape, per, dtype, device):
    pred, target, weight = _inputs(shape, dtype, device)
    c = 0.03
    grad_out = torch.randn(shape[0] if per == "sample" else shape, dtype=torch.float64, device=device)
    results = {}
    for impl in ("triton", "ref"):
        p = pred.clone().requires_grad_()
        t = target.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if impl == "ref":  # fp64 reference on the same (rounded) inputs
            p, t, w = (a.detach().double().requires_grad_() for a in (p, t, w))
            out = pseudo_huber_loss_ref(p, t, c, w, reduction="none", per=per)
        else:
            out = pseudo_huber_loss(p, t, c, w, reduction="none", per=per, impl="triton")
        out.backward(grad_out.to(out.dtype))
        results[impl] = (out, p.grad, t.grad, w.grad)
    n = pred[0].numel()
    for name, a, e in zip(("loss", "d_pred", "d_target", "d_weight"), results["triton"], results["ref"]):
        assert_close(a, e, dtype, reduce_len=n, msg=name)


@pytest.mark.parametrize("per", ["sample", "element"])
def test_sum_backward_stride0_grad(per, device):
    # .sum().backward() hands backward an expanded (stride-0) gradient.
    pred, target, _ = _inputs((6, 2, 5, 5), torch.float32, device)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    pseudo_huber_loss(p1, target, 0.05, reduction="none", per=per, impl="triton").sum().backward()
    pseudo_huber_loss_ref(p2, target, 0.05, reduction="none", per=per).sum().backward()
    assert_close(p1.grad, p2.grad, torch.float32, reduce_len=50)


def test_noncontiguous_inputs(device):
    base = torch.randn(8, 3, 16, 16, device=device)
    pred = base[:, :, ::2, 1::2]  # strided view
    target = torch.randn(8, 8, 8, 3, device=device).permute(0, 3, 1, 2)  # channels-last-like view
    assert not pred.is_contiguous() and not target.is_contiguous()
    for per in ("sample", "element"):
        out = pseudo_huber_loss(pred, target, 0.02, reduction="none", per=per, impl="triton")
        assert_close(out, _closed_form(pred, target, 0.02, None, per), torch.float32, reduce_len=192)


def _check_value_and_grads(pred_base, target_base, view, c, per, device, reduce_len):
    """Loss and gradients (through the views back to their bases) of the Triton path vs fp64 autograd of the
    closed form, for inputs that are views of larger tensors."""
    results = []
    for impl in ("triton", "oracle"):
        pb, tb = (b.detach().clone().requires_grad_() for b in (pred_base, target_base))
        if impl == "oracle":
            pb, tb = (b.detach().double().requires_grad_() for b in (pb, tb))
        pred, target = view(pb, tb)
        if impl == "oracle":
            diff = pred - target
            sq = diff.pow(2).flatten(1).sum(1) if per == "sample" else diff.pow(2)
            out = (sq + c * c).sqrt() - c
        else:
            out = pseudo_huber_loss(pred, target, c, reduction="none", per=per, impl="triton")
        g = torch.Generator().manual_seed(1)
        out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=device, dtype=out.dtype))
        results.append((out, pb.grad, tb.grad))
    for name, a, e in zip(("loss", "d_pred", "d_target"), *results):
        assert_close(a, e, torch.float32, reduce_len=reduce_len, msg=name)


@pytest.mark.parametrize("per", ["sample", "element"])
def test_rows_longer_than_one_block(per, device):
    # A 3x128x128 sample is 49,152 elements: the per-sample kernel loops over 3 blocks of 16,384 (both passes).
    from fastcm.kernels._utils import MAX_FUSED_SIZE

    pred, target, _ = _inputs((2, 3, 128, 128), torch.float32, device)
    assert pred[0].numel() > MAX_FUSED_SIZE
    _check_value_and_grads(pred, target, lambda p, t: (p, t), 0.05, per, device, pred[0].numel())


@pytest.mark.parametrize("per", ["sample", "element"])
def test_rows_with_non_unit_inner_stride(per, device):
    # Every other column of a (B, 2D) tensor, and every third of a (B, 3D) one: (B, D) views whose rows have inner
    # strides 2 and 3 (read in place by the per-sample kernel); and a 4-D view whose dims merge into stride-2 rows.
    pred, _, _ = _inputs((3, 2 * 37), torch.float32, device)
    target, _, _ = _inputs((3, 3 * 37), torch.float32, device, seed=1)
    _check_value_and_grads(pred, target, lambda p, t: (p[:, ::2], t[:, 1::3]), 0.05, per, device, 37)
    pred4, target4, _ = _inputs((2, 3, 4, 10), torch.float32, device)
    _check_value_and_grads(pred4, target4, lambda p, t: (p[..., ::2], t[..., 1::2]), 0.05, per, device, 60)


@pytest.mark.parametrize("per", ["sample", "element"])
def test_gradients_on_sliced_inputs(per, device):
    # Batch and channel slices, a spatial step and a channels-last permutation: the gradient reaches each base.
    pred, _, _ = _inputs((6, 4, 9, 9), torch.float32, device)
    target, _, _ = _inputs((3, 9, 9, 5), torch.float32, device, seed=2)
    view = lambda p, t: (p[1::2, 1:, ::3, 1:7:2], t.permute(0, 3, 1, 2)[:, 1:4, ::3, 1:7:2])  # noqa: E731
    _check_value_and_grads(pred, target, view, 0.05, per, device, 27)


def test_bfloat16_storage(device):
    # The interpreter cannot compute in bf16; the kernel loads, upcasts to fp32 and stores, which it can.
    pred, target, _ = _inputs((4, 3, 8, 8), torch.bfloat16, device)
    pred.requires_grad_()
    out = pseudo_huber_loss(pred, target, 0.03, reduction="none", impl="triton")
    assert_close(out, _closed_form(pred, target, 0.03, None, "sample"), torch.float32, reduce_len=192)
    out.sum().backward()
    diff = (pred.detach().double() - target.double()).cpu()
    expected = diff / ((diff.pow(2).flatten(1).sum(1) + 0.03 ** 2).sqrt().view(-1, 1, 1, 1))
    assert pred.grad.dtype == torch.bfloat16
    assert_close(pred.grad, expected, torch.bfloat16)


@pytest.mark.parametrize("per", ["sample", "element"])
def test_gradcheck_fp64(per, device):
    pred, target, weight = _inputs((3, 2, 3, 3), torch.float64, device)
    pred.requires_grad_(), target.requires_grad_(), weight.requires_grad_()
    fn = lambda p, t, w: pseudo_huber_loss(p, t, 0.1, w, reduction="none", per=per, impl="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred, target, weight), fast_mode=True)


@pytest.mark.parametrize("per_sample", [True, False])
def test_opcheck(per_sample, device):
    pred, target, _ = _inputs((3, 2, 4, 4), torch.float32, device)
    pred.requires_grad_()
    torch.library.opcheck(torch.ops.fastcm.pseudo_huber_fwd.default, (pred, target, 0.05, per_sample, True))
    torch.library.opcheck(torch.ops.fastcm.pseudo_huber_fwd.default, (pred.detach(), target, 0.05, per_sample, False))


def test_torch_compile_fullgraph(device):
    pred, target, weight = _inputs((4, 3, 8, 8), torch.float32, device)

    def step(p, t, w):
        return pseudo_huber_loss(p, t, 0.03, w, impl="triton")

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    out_c, out_e = compiled(p1, target, weight), step(p2, target, weight)
    out_c.backward(), out_e.backward()
    assert_close(out_c, out_e.detach(), torch.float32)
    assert_close(p1.grad, p2.grad, torch.float32)


def test_no_grad_skips_gradient_buffer(device):
    pred, target, _ = _inputs((2, 3, 4, 4), torch.float32, device)
    loss, grad = torch.ops.fastcm.pseudo_huber_fwd(pred, target, 0.05, True, False)
    assert grad.numel() == 0 and loss.shape == (2,)


def test_registry_entry_runs_every_case():
    spec = REGISTRY["pseudo_huber_loss"]
    for case in spec.make_inputs.cases[:2]:
        kwargs = spec.make_inputs(case, requires_grad=False)
        assert_close(spec.op(**kwargs, impl="triton"), spec.ref(**kwargs).double(), torch.float32, reduce_len=4096)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(c=0.0), ValueError, "c must be a positive"),
        (dict(c=-1.0), ValueError, "c must be a positive"),
        (dict(c=float("nan")), ValueError, "c must be a positive"),
        (dict(target=torch.zeros(4, 3)), ValueError, "target must have shape"),
        (dict(weight=torch.ones(3)), ValueError, "weight must have shape"),
        (dict(pred=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "pred must have a floating dtype"),
        (dict(target=torch.zeros(4, 3, 2, dtype=torch.int32)), TypeError, "target must have a floating dtype"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(per="pixel"), ValueError, "per must be one of"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(pred=[1.0]), TypeError, "pred must be a torch.Tensor"),
        (dict(weight=torch.tensor([1.0, -0.5, 1.0, 1.0])), ValueError, r"weight must be finite and >= 0, got -0.5 at"),
        (dict(weight=torch.tensor([1.0, 1.0, float("nan"), 1.0])), ValueError, "weight must be finite and >= 0, got n"),
        (dict(weight=torch.tensor([float("inf"), 1.0, 1.0, 1.0])), ValueError, "weight must be finite and >= 0"),
        (dict(pred=torch.zeros(0, 3, 2), target=torch.zeros(0, 3, 2), weight=torch.zeros(0)), ValueError,
         r"pred must hold at least one sample for reduction='mean'"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(pred=torch.zeros(4, 3, 2), target=torch.zeros(4, 3, 2), c=0.1, weight=None)
    args.update(kwargs)
    for impl in ("torch", "triton"):
        with pytest.raises(err, match=match):
            pseudo_huber_loss(**{"impl": impl, **args})


@pytest.mark.parametrize("per", ["sample", "element"])
def test_empty_batch_sums_to_zero(per):
    pred = torch.zeros(0, 3, 2, requires_grad=True)
    for impl in ("torch", "triton"):
        assert pseudo_huber_loss(pred, torch.zeros(0, 3, 2), 0.1, reduction="sum", per=per, impl=impl).item() == 0
        assert pseudo_huber_loss(pred, torch.zeros(0, 3, 2), 0.1, reduction="none", per=per, impl=impl).numel() == 0


@pytest.mark.gpu
def test_cuda_deterministic():
    pred, target, _ = _inputs((64, 3, 32, 32), torch.float16, "cuda")
    pred.requires_grad_()
    a = pseudo_huber_loss(pred, target, 0.03, reduction="none")
    b = pseudo_huber_loss(pred, target, 0.03, reduction="none")
    assert torch.equal(a, b)


def _hypot_closed_form(pred, target, c, per):
    """fp64 loss and d loss / d pred from math.hypot, which neither overflows nor underflows in c^2: loss =
    S / (hypot(n, c) + c) with n = ||pred - target||, S = n^2 (both well inside fp64 at the shapes below)."""
    diff = pred.double() - target.double()
    n = diff.flatten(1).norm(dim=1) if per == "sample" else diff.abs()
    h = torch.tensor([math.hypot(float(x), c) for x in n.flatten()], dtype=torch.float64).view(n.shape)
    loss = n.square() / (h + c)
    return loss, diff / (h.view(-1, *([1] * (diff.dim() - 1))) if per == "sample" else h)


# c^2 overflows fp32 at 2e19 and fp64 at 1e300; c = 1e300 is no fp32 number at all (computed in
# fp64, rounded to fp32); c^2 = 1e-60 vanishes in fp32, so pred == target was 0 / 0 in the gradient.
EXTREME_C = [(torch.float32, 2e19, False), (torch.float64, 1e300, False), (torch.float32, 1e300, False),
             (torch.float32, 1e-30, True), (torch.float32, 1e-30, False), (torch.float64, 1e-310, True)]


@pytest.mark.parametrize("dtype, c, same", EXTREME_C, ids=[f"{str(d)[6:]}-c{c:g}-{'equal' if s else 'apart'}"
                                                           for d, c, s in EXTREME_C])
@pytest.mark.parametrize("per", ["sample", "element"])
def test_extreme_c_is_finite_and_exact_on_both_routes(dtype, c, same, per, device):
    pred, target, _ = _inputs((3, 2, 5, 5), dtype, device)
    target = pred.clone() if same else target
    loss_exp, grad_exp = _hypot_closed_form(pred, target, c, per)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for impl in ("triton", "torch"):
        p = pred.clone().requires_grad_()
        loss = pseudo_huber_loss(p, target, c, reduction="none", per=per, impl=impl)
        loss.sum().backward()
        assert loss.dtype == dtype and bool(torch.isfinite(loss).all() and torch.isfinite(p.grad).all()), impl
        torch.testing.assert_close(loss, loss_exp.to(dtype), rtol=rtol, atol=0, msg=lambda m: f"{impl} loss: {m}")
        torch.testing.assert_close(p.grad, grad_exp.to(dtype), rtol=rtol, atol=0, msg=lambda m: f"{impl} grad: {m}")
    if same:
        assert not loss.any() and not p.grad.any()


def test_one_dimensional_pred_is_one_element_per_sample_on_both_routes(device):
    pred, target, _ = _inputs((5,), torch.float32, device)
    expected = _hypot_closed_form(pred[:, None], target[:, None], 0.1, "sample")[0].float()
    for impl in ("triton", "torch"):
        torch.testing.assert_close(pseudo_huber_loss(pred, target, 0.1, reduction="none", impl=impl), expected)


def test_one_pass_and_two_pass_rows_agree_on_large_differences(device, monkeypatch):
    """Differences of 1e30 (squares overflow fp32) give the same loss and gradient through the one-block path and
    through the two-pass path of rows longer than a block (forced here with a 64-element block)."""
    from fastcm.kernels import pseudo_huber as kernels

    pred, target, _ = _inputs((2, 3, 10, 10), torch.float32, device)
    pred = pred * 1e30
    loss_exp, grad_exp = _hypot_closed_form(pred, target, 0.5, "sample")
    for cap in (None, 64):
        if cap:
            monkeypatch.setattr(kernels, "block_size", lambda n: cap)
        p = pred.clone().requires_grad_()
        loss = pseudo_huber_loss(p, target, 0.5, reduction="none", impl="triton")
        loss.sum().backward()
        torch.testing.assert_close(loss, loss_exp.float(), rtol=1e-5, atol=0)
        torch.testing.assert_close(p.grad, grad_exp.float(), rtol=1e-5, atol=1e-30)
