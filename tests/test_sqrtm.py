"""Matrix square root: Triton Newton-Schulz (interpreted on CPU) and the eigh reference vs closed forms
Q diag(sqrt(lambda)) Q^T, the Lyapunov backward vs the Daleckii-Krein formula and the defining equation."""
import pytest
import torch

from fastcm.ops import REGISTRY, sqrtm, sqrtm_newton_schulz, sqrtm_ref
from fastcm.ops.sqrtm import lyapunov_newton_schulz
from helpers import assert_close



def _spd(n, batch=(), cond=1e2, seed=0, rank=None):
    """(A, sqrt(A)) with A = Q diag(lambda) Q^T, lambda log-spaced over [1/cond, 1] (the last n - rank set to 0)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(-torch.log10(torch.tensor(cond)).item(), 0, n, dtype=torch.float64)
    if rank is not None:
        lam[: n - rank] = 0
    a = (q * lam) @ q.mT
    return (a + a.mT) / 2, (q * lam.sqrt()) @ q.mT


@pytest.mark.parametrize("n, batch", [(1, ()), (7, (3,)), (33, (2, 2))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_closed_form(n, batch, dtype):
    a, root = _spd(n, batch, cond=1e3)
    out = sqrtm_ref(a.to(dtype))
    assert out.dtype == dtype and out.shape == a.shape
    assert_close(out, root, dtype, reduce_len=n)
    assert_close(sqrtm(a.to(dtype), impl="torch"), root, dtype, reduce_len=n)


@pytest.mark.parametrize("n, dtype", [(1, torch.float64), (20, torch.float32), (64, torch.float64)])
def test_triton_matches_closed_form(n, dtype, device):
    a, root = _spd(n, (2,), cond=1e2)
    out = sqrtm(a.to(device=device, dtype=dtype), impl="triton", num_iters=15)  # table: 15 steps at cond 1e2
    assert out.dtype == dtype
    assert_close(out, root, dtype, reduce_len=n)


def test_triton_equals_torch_iteration_on_partial_tiles(device):
    # n = 70 needs four 64-wide tiles with masked edges; four steps stop far from convergence, so this compares
    # the iteration itself, step for step, with the torch version.
    a, _ = _spd(70, (1, 2), cond=1e3, seed=1)
    a = a.to(device)
    out = sqrtm(a, impl="triton", num_iters=4)
    assert out.shape == (1, 2, 70, 70)
    assert_close(out, sqrtm_newton_schulz(a, num_iters=4), torch.float64, reduce_len=70)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(dtype, device):
    a, root = _spd(24, (2,), cond=10)
    for impl in ("triton", "torch"):
        out = sqrtm(a.to(device=device, dtype=dtype), impl=impl, num_iters=12)
        assert out.dtype == dtype
        assert_close(out, root, dtype, reduce_len=24, msg=impl)


def test_rank_deficient_and_zero(device):
    # Null eigenvalues come out of any fp64 method as round-off of ~1e-16, whose square root (~1e-8) is the
    # attainable accuracy: both routes are compared at that level.
    a, root = _spd(16, (), cond=1e2, rank=10)
    torch.testing.assert_close(sqrtm_ref(a), root, atol=1e-7, rtol=0)
    torch.testing.assert_close(sqrtm(a.to(device), impl="triton").cpu(), root, atol=1e-6, rtol=0)
    zero = torch.zeros(1, 5, 5, dtype=torch.float64, device=device)
    assert not sqrtm(zero, impl="triton").any() and not sqrtm_ref(zero).any()


def test_accuracy_vs_iterations():
    # The README's table: 30 steps (the default) resolve condition numbers up to 1e8 in fp64; convergence is
    # quadratic once the smallest eigenvalue has been reached (about log(cond) / log(2.25) + 5 steps).
    a, root = _spd(64, (), cond=1e6)
    errors = [((sqrtm_newton_schulz(a, k) - root).norm() / root.norm()).item() for k in (5, 10, 15, 20, 25, 30)]
    assert all(e1 > e2 for e1, e2 in zip(errors[:4], errors[1:5])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-12, errors
    a8, root8 = _spd(64, (), cond=1e8, seed=3)
    assert ((sqrtm_newton_schulz(a8) - root8).norm() / root8.norm()).item() < 1e-11


def test_backward_matches_daleckii_krein_and_lyapunov_equation(device):
    a, root = _spd(12, (1,), cond=10, seed=2)
    grad = torch.randn(1, 12, 12, dtype=torch.float64)  # not symmetric: the adjoint is defined for any G
    results = {}
    for impl in ("triton", "torch"):
        leaf = a.clone().to(device).requires_grad_()
        sqrtm(leaf, impl=impl, num_iters=12).backward(grad.to(device))
        results[impl] = leaf.grad.cpu()
    assert_close(results["triton"], results["torch"], torch.float64, reduce_len=144)
    # The defining equation of the adjoint: X W + W X = G with X = sqrt(A).
    w = results["torch"]
    assert_close(root @ w + w @ root, grad, torch.float64, reduce_len=144)
    # Autograd through the unrolled (converged) iteration is an independent third route.
    leaf = a.clone().requires_grad_()
    sqrtm_newton_schulz(leaf, 25).backward(grad)
    assert_close(leaf.grad, w, torch.float64, reduce_len=144)


def test_gradient_at_identity_is_finite():
    # eigh-based autograd divides by lambda_i - lambda_j (NaN at A = I, POT#773); X W + W X = G gives W = G / 2.
    eye = torch.eye(6, dtype=torch.float64)
    grad = torch.randn(6, 6, dtype=torch.float64)
    for fn in (sqrtm_ref, lambda x: sqrtm(x, impl="triton", num_iters=8)):
        leaf = eye.clone().requires_grad_()
        fn(leaf).backward(grad)
        assert_close(leaf.grad, grad / 2, torch.float64)
    assert_close(lyapunov_newton_schulz(eye, grad, 8), grad / 2, torch.float64)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gradcheck_fp64(impl, device):
    # A symmetric parametrization: eigh reads one triangle, so entry-wise perturbations of A itself are not
    # perturbations of the matrix that is square-rooted.
    s = torch.randn(6, 6, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x):
        return sqrtm(x @ x.mT + torch.eye(6, dtype=x.dtype, device=x.device), impl=impl, num_iters=16)

    assert torch.autograd.gradcheck(fn, (s,), fast_mode=True)


def test_opcheck(device):
    a, _ = _spd(8, (1,), cond=10)
    a = a.to(device).requires_grad_()
    torch.library.opcheck(torch.ops.fastcm.sqrtm_fwd.default, (a, 3))
    x = sqrtm_ref(a.detach())
    torch.library.opcheck(torch.ops.fastcm.sqrtm_bwd.default, (x, torch.randn_like(x), 3))


def test_torch_compile_fullgraph(device):
    a, _ = _spd(16, (2,), cond=10)

    def step(x):
        return sqrtm(x, impl="triton", num_iters=6).square().sum()

    # aot_eager traces exactly what inductor would see (the op is opaque to both) in a fraction of the time.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a1, a2 = a.clone().to(device).requires_grad_(), a.clone().to(device).requires_grad_()
    out_c, out_e = compiled(a1), step(a2)
    out_c.backward(), out_e.backward()
    assert_close(out_c, out_e.detach(), torch.float64)
    assert_close(a1.grad, a2.grad, torch.float64, reduce_len=256)


def test_bad_inputs():
    good, _ = _spd(4)
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        sqrtm(good.numpy())
    with pytest.raises(TypeError, match="floating"):
        sqrtm(good.long())
    with pytest.raises(ValueError, match="square"):
        sqrtm(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        sqrtm(torch.zeros(4))
    with pytest.raises(ValueError, match="symmetric"):
        sqrtm(good + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1))
    bad = good.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sqrtm(bad)
    with pytest.raises(ValueError, match="num_iters"):
        sqrtm(good, num_iters=0)
    with pytest.raises(ValueError, match="impl"):
        sqrtm(good, impl="cuda")
    with pytest.raises(ValueError, match="psd_projection must be a bool"):
        sqrtm(good, psd_projection=1)


def test_registry_entry(device):
    spec = REGISTRY["sqrtm"]
    kwargs = spec.make_inputs("tiny", device=device, dtype=torch.float32, requires_grad=False)
    # make_inputs uses condition number 1e3, which 18 steps resolve to fp32 accuracy (README table).
    assert_close(spec.op(**kwargs, impl="triton", num_iters=18), spec.ref(**kwargs), torch.float32, reduce_len=16)


def _with_eigenvalues(lam, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = torch.as_tensor(lam, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    a = (q * lam) @ q.mT
    return (a + a.mT) / 2, (q * lam.clamp(min=0).sqrt()) @ q.mT


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_negative_eigenvalue_raises_and_names_it(impl, dtype, device):
    minus_eye = -torch.eye(4, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=r"most negative eigenvalue is -1 .*psd_projection=True"):
        sqrtm(minus_eye, impl=impl)
    a, root = _with_eigenvalues([1.0, 0.5, 0.25, -0.01])
    batch = torch.stack([_spd(4)[0], a]).to(device=device, dtype=dtype)  # the second matrix of a batch
    with pytest.raises(ValueError, match=r"most negative eigenvalue is -0\.01"):
        sqrtm(batch, impl=impl)
    # The opt-in projection sets negative eigenvalues to 0 (the Triton route falls back to the eigendecomposition
    # when Newton-Schulz overflows on them).
    out = sqrtm(batch, impl=impl, psd_projection=True)
    assert_close(out[1], root, dtype, reduce_len=4)
    assert not sqrtm(minus_eye, impl=impl, psd_projection=True).any()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_round_off_negative_eigenvalues_are_accepted(impl, device):
    # A singular covariance in fp64 has eigenvalues of ~-1e-16 ||a||: within PSD_RTOL they count as 0. With 60
    # steps Newton-Schulz overflows on -1e-13 (x 2.25 per step); the result comes from the projection instead.
    a, root = _with_eigenvalues([1.0, 0.3, 0.0, -1e-13])
    out = sqrtm(a.to(device), impl=impl, num_iters=60)
    torch.testing.assert_close(out.cpu(), root, atol=1e-6, rtol=0)


def test_plan_batch_in_grid_dim_0_and_precision_follows_torch():
    from fastcm.kernels.sqrtm import sqrtm_plan

    plan = sqrtm_plan(70_000, 16, torch.float32)  # more matrices than grid dimension 1 allows (65,535)
    assert plan.grid == (70_000, 1) and plan.meta["PRECISION"] == "ieee"
    assert sqrtm_plan(4, 256, torch.float32, "high").meta["PRECISION"] == "tf32"
    assert sqrtm_plan(4, 256, torch.float32, "medium").meta["PRECISION"] == "tf32"
    assert sqrtm_plan(4, 256, torch.float64, "high").meta["PRECISION"] == "ieee"


def test_tf32_setting_reaches_the_kernel(device, monkeypatch):
    # With torch's fp32 matmul precision at "high", the launcher asks for TF32 dots (recorded at launch).
    import fastcm.kernels.sqrtm as K

    seen = []
    plan = K.sqrtm_plan
    monkeypatch.setattr(K, "sqrtm_plan", lambda *args: seen.append(plan(*args)) or seen[-1])
    a, root = _spd(8, (1,), cond=10)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        out = sqrtm(a.to(device=device, dtype=torch.float32), impl="triton", num_iters=12)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen[-1].meta["PRECISION"] == "tf32"
    torch.testing.assert_close(out.double().cpu(), root, atol=1e-2, rtol=0)  # TF32: ~1e-3 relative


def test_signature_impl_last():
    import inspect

    assert list(inspect.signature(sqrtm).parameters) == ["a", "num_iters", "psd_projection", "impl"]


def test_projection_on_the_triton_route_with_few_steps(device):
    # -1e-3 ||a|| is far past the tolerance but too small for 5 Newton-Schulz steps to overflow: the projection
    # must still be exact (the route takes the eigendecomposition for an indefinite matrix).
    a, root = _with_eigenvalues([1.0, 0.5, 0.2, -1e-3])
    out = sqrtm(a.to(device), impl="triton", num_iters=5, psd_projection=True)
    torch.testing.assert_close(out.cpu(), root, atol=1e-12, rtol=0)
