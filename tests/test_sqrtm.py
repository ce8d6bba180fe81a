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
    torch.library.opcheck(torch.ops.fastcm.sqrtm_ns.default, (a, 3))
    x = sqrtm_ref(a.detach())
    torch.library.opcheck(torch.ops.fastcm.sqrtm_ns_backward.default, (x, torch.randn_like(x), 3))


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


def test_registry_entry(device):
    spec = REGISTRY["sqrtm"]
    kwargs = spec.make_inputs("tiny", device=device, dtype=torch.float32, requires_grad=False)
    # make_inputs uses condition number 1e3, which 18 steps resolve to fp32 accuracy (README table).
    assert_close(spec.op(**kwargs, impl="triton", num_iters=18), spec.ref(**kwargs), torch.float32, reduce_len=16)
