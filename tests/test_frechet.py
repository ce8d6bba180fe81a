"""Frechet distance: closed forms, metric properties, agreement with the scipy sqrtm and eigvals routes, singular
covariances and input validation."""
import math

import pytest
import torch

from fastcm.ops import FrechetReference, frechet_distance, trace_sqrt_product
from fastcm.ops.frechet import congruence, congruence_torch, psd_factor
from fastcm.perf.baselines import frechet_eigvals, frechet_scipy_sqrtm

F64 = torch.float64



def _rotation(d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


def _stats(n, d, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64) * scale + shift
    return x.mean(0), torch.cov(x.T)


def test_returns_fp64_scalar():
    fd = frechet_distance(torch.zeros(3), torch.eye(3), torch.ones(3), torch.eye(3))
    assert fd.dtype == F64 and fd.dim() == 0 and fd.item() == 3.0


def test_diagonal_and_commuting_closed_form():
    d = 256
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(d, generator=g, dtype=F64) * 3, torch.rand(d, generator=g, dtype=F64) * 2
    mu1, mu2 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    q = _rotation(d)
    for s1, s2 in ((torch.diag(a), torch.diag(b)), ((q * a) @ q.T, (q * b) @ q.T)):
        torch.testing.assert_close(frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-12, atol=1e-10)


def test_one_dimensional_and_scaling():
    # N(1, 4) vs N(3, 9): (1 - 3)^2 + (2 - 3)^2 = 5.
    assert frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]),
                            torch.tensor([[9.0]])).item() == pytest.approx(5.0, rel=1e-14)
    mu, s = _stats(500, 32, seed=2)
    fd = frechet_distance(mu, s, mu, 0.7 ** 2 * s)  # S2 = c^2 S1: (1 - c)^2 tr S1
    torch.testing.assert_close(fd, (1 - 0.7) ** 2 * s.trace(), rtol=1e-12, atol=0)


def test_two_by_two_non_commuting():
    # tr sqrt(P) = sqrt(tr P + 2 sqrt(det P)) for 2x2 P = S1 S2 (Cayley-Hamilton: sqrt(P) for a 2x2 P with real positive eigenvalues).
    s1 = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=F64)
    s2 = torch.tensor([[1.0, -0.5], [-0.5, 2.0]], dtype=F64)
    p = s1 @ s2
    closed = math.sqrt(p.trace() + 2 * math.sqrt(torch.linalg.det(p)))
    assert trace_sqrt_product(s1, s2).item() == pytest.approx(closed, rel=1e-14)
    assert closed == pytest.approx(3.593894792992641, rel=1e-15)
    fd = frechet_distance(torch.zeros(2), s1, torch.zeros(2), s2)
    assert fd.item() == pytest.approx(0.8122104140147179, rel=1e-13)


def test_d2048_oracle():
    # pytorch-fid's test: mu 0 vs 1 and Sigma I vs 4I give 2048 + 2048 (1 - 2)^2 = 4096.
    d = 2048
    fd = frechet_distance(torch.zeros(d), torch.eye(d), torch.ones(d), 4 * torch.eye(d))
    assert fd.item() == pytest.approx(4096.0, rel=1e-12)


def test_identical_symmetric_and_invariant():
    mu1, s1 = _stats(400, 48, seed=3)
    mu2, s2 = _stats(300, 48, seed=4, scale=1.2, shift=0.3)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert abs(frechet_distance(mu1, s1, mu1, s1).item()) <= 1e-10 * s1.trace().item()
    torch.testing.assert_close(frechet_distance(mu2, s2, mu1, s1), fd, rtol=1e-12, atol=0)
    q, t = _rotation(48, seed=5), torch.randn(48, dtype=F64)  # x -> Q x + t on both sets
    rotated = frechet_distance(q @ mu1 + t, q @ s1 @ q.T, q @ mu2 + t, q @ s2 @ q.T)
    torch.testing.assert_close(rotated, fd, rtol=1e-11, atol=0)
    scaled = frechet_distance(3 * mu1, 9 * s1, 3 * mu2, 9 * s2)  # features x -> 3x: FD x 9
    torch.testing.assert_close(scaled, 9 * fd, rtol=1e-12, atol=0)


def test_triangle_inequality_of_sqrt():
    # sqrt(FD) is the 2-Wasserstein distance between Gaussians, a metric.
    stats = [_stats(40, 8, seed=10 + i, scale=0.5 + 0.1 * i, shift=0.1 * i) for i in range(12)]
    dist = [[frechet_distance(*a, *b).sqrt().item() for b in stats] for a in stats]
    for i in range(12):
        for j in range(12):
            for k in range(12):
                assert dist[i][k] <= dist[i][j] + dist[j][k] + 1e-9


def test_agrees_with_scipy_sqrtm_and_eigvals_routes():
    mu1, s1 = _stats(600, 64, seed=6)
    mu2, s2 = _stats(500, 64, seed=7, scale=0.8, shift=-0.2)
    fd = frechet_distance(mu1, s1, mu2, s2).item()
    assert fd == pytest.approx(frechet_scipy_sqrtm(mu1, s1, mu2, s2), rel=1e-10)
    assert fd == pytest.approx(frechet_eigvals(mu1, s1, mu2, s2), rel=1e-10)


def test_nuclear_norm_identity():
    # With S_i = C_i C_i^T, tr (S1 S2)^(1/2) = ||C1^T C2||_* (FastFID's trick, an independent route).
    g = torch.Generator().manual_seed(8)
    c1, c2 = torch.randn(40, 25, generator=g, dtype=F64), torch.randn(40, 30, generator=g, dtype=F64)
    nuclear = torch.linalg.svdvals(c1.T @ c2).sum()
    torch.testing.assert_close(trace_sqrt_product(c1 @ c1.T, c2 @ c2.T), nuclear, rtol=1e-9, atol=0)


@pytest.mark.parametrize("singular", ["first", "second", "both"])
def test_singular_covariances(singular):
    # Fewer samples than dims give rank-deficient covariances: the result must be finite, real and exact (null
    # eigenvalues are dropped instead of contributing sqrt(round-off) ~ 1e-8 each).
    d, q = 64, _rotation(64, seed=9)
    g = torch.Generator().manual_seed(9)
    a, b = torch.rand(d, generator=g, dtype=F64) + 0.1, torch.rand(d, generator=g, dtype=F64) + 0.1
    if singular in ("first", "both"):
        a[:20] = 0
    if singular in ("second", "both"):
        b[10:40] = 0
    mu = torch.zeros(d, dtype=F64)
    fd = frechet_distance(mu, (q * a) @ q.T, mu, (q * b) @ q.T)
    assert torch.isfinite(fd)
    assert fd.item() == pytest.approx(((a.sqrt() - b.sqrt()) ** 2).sum().item(), rel=1e-12)


def test_few_samples_finite_and_close_to_eigvals():
    mu1, s1 = _stats(20, 48, seed=11)
    mu2, s2 = _stats(30, 48, seed=12, shift=0.5)
    fd = frechet_distance(mu1, s1, mu2, s2).item()
    assert math.isfinite(fd) and fd > 0
    assert fd == pytest.approx(frechet_eigvals(mu1, s1, mu2, s2), rel=1e-6)


def test_numpy_and_fp32_inputs():
    mu1, s1 = _stats(200, 16, seed=13)
    mu2, s2 = _stats(200, 16, seed=14, shift=1.0)
    ref = frechet_distance(mu1, s1, mu2, s2)
    torch.testing.assert_close(frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()), ref)
    f32 = [x.float() for x in (mu1, s1, mu2, s2)]
    torch.testing.assert_close(frechet_distance(*f32), frechet_distance(*[x.double() for x in f32]))


def test_congruence_routes_equal_dense():
    d = 600  # three column blocks of the torch triangular product
    s = _stats(900, d, seed=15)[1]
    chol = torch.linalg.cholesky(_stats(900, d, seed=16)[1])
    dense = torch.tril(chol.T @ s @ chol)
    m, uplo = congruence(chol, s)  # LAPACK dsygst on CPU
    assert uplo == "L"
    torch.testing.assert_close(torch.tril(m), dense, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(torch.tril(congruence_torch(chol, s)), dense, rtol=1e-10, atol=1e-9)
    # Only the lower triangle of S is read (as LAPACK's convention everywhere in the route).
    garbled = s + torch.triu(torch.full_like(s, 7.0), 1)
    torch.testing.assert_close(torch.tril(congruence(chol, garbled)[0]), dense, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(torch.tril(congruence_torch(chol, garbled)), dense, rtol=1e-10, atol=1e-9)
    f, triangular = psd_factor(torch.diag(torch.tensor([1.0, 0.0, 4.0], dtype=F64)))
    assert not triangular and torch.allclose(f @ f.T, torch.diag(torch.tensor([1.0, 0.0, 4.0], dtype=F64)))


def test_bad_inputs():
    mu, s = torch.zeros(3), torch.eye(3)
    with pytest.raises(TypeError, match="mu1 must be a torch.Tensor or numpy array"):
        frechet_distance([0, 0, 0], s, mu, s)
    with pytest.raises(TypeError, match="sigma2 must have a floating dtype"):
        frechet_distance(mu, s, mu, torch.eye(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mu2 must have shape"):
        frechet_distance(mu, s, torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"sigma1 must have shape \(3, 3\)"):
        frechet_distance(mu, torch.eye(4), mu, s)
    with pytest.raises(ValueError, match="mu1 must be a non-empty 1-D"):
        frechet_distance(torch.zeros(3, 1), s, mu, s)
    with pytest.raises(ValueError, match="sigma2 must be symmetric"):
        frechet_distance(mu, s, mu, s + torch.triu(torch.ones(3, 3), 1))
    with pytest.raises(ValueError, match="sigma1 contains NaN or inf"):
        frechet_distance(mu, torch.full((3, 3), float("inf")), mu, s)
    with pytest.raises(ValueError, match="sigma1 has a negative variance"):
        frechet_distance(mu, -s, mu, s)
    indefinite = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="sigma1 is not positive semi-definite"):
        frechet_distance(mu, indefinite, mu, s)
    with pytest.raises(ValueError, match="sigma1 is not positive semi-definite"):
        frechet_distance(mu, indefinite, mu, torch.diag(torch.tensor([1.0, 0.0, 1.0])))


class _NoLapack:
    """Stands in for scipy.linalg.lapack: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the torch route called LAPACK's {name} through scipy")


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_torch_route_with_lapack_disabled_matches_scipy_formula(impl, monkeypatch):
    # The route CUDA tensors take, at d > 256 (two column blocks of the torch congruence), with scipy's LAPACK
    # switched off entirely: Cholesky, congruence and eigenvalues all in torch. Checked against pytorch-fid's formula.
    d = 300
    mu1, s1 = _stats(500, d, seed=17)
    mu2, s2 = _stats(500, d, seed=18, scale=0.9, shift=0.1)
    expected = frechet_scipy_sqrtm(mu1, s1, mu2, s2)
    if impl == "torch":
        monkeypatch.setattr("fastcm.ops._lapack.lapack", _NoLapack())
    else:  # "auto" without scipy falls back to torch
        monkeypatch.setattr("fastcm.ops._lapack.lapack", None)
    value = frechet_distance(mu1, s1, mu2, s2, impl=impl)
    assert value.item() == pytest.approx(expected, rel=1e-10)
    ref = FrechetReference(mu2, s2, impl=impl)
    assert ref.distance(mu1, s1).item() == pytest.approx(expected, rel=1e-10)


def test_scipy_route_is_refused_where_it_cannot_run(monkeypatch):
    mu, s = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match="impl must be one of"):
        frechet_distance(mu, s, mu, s, impl="triton")
    monkeypatch.setattr("fastcm.ops._lapack.lapack", None)
    with pytest.raises(ValueError, match="impl='scipy'.*scipy is not installed"):
        frechet_distance(mu, s, mu, s, impl="scipy")


@pytest.mark.parametrize("impl", ["scipy", "torch"])
def test_collapsed_distributions_are_exact(impl):
    # Constant images (mode collapse) give zero covariances: FD = ||mu1 - mu2||^2, on either side.
    d = 5
    mu, zero, eye = torch.arange(d, dtype=F64), torch.zeros(d, d, dtype=F64), torch.eye(d, dtype=F64)
    assert frechet_distance(mu, zero, mu + 1, zero, impl=impl).item() == d
    assert frechet_distance(mu.numpy(), zero.numpy(), mu.numpy() + 2, zero.numpy(), impl=impl).item() == 4 * d
    assert frechet_distance(mu, zero, mu, zero, impl=impl).item() == 0
    # One side collapsed: (S1 S2)^(1/2) = 0, FD = ||dmu||^2 + tr S.
    assert frechet_distance(mu, zero, mu + 1, 4 * eye, impl=impl).item() == pytest.approx(5 * d, rel=1e-14)
    assert frechet_distance(mu, 4 * eye, mu + 1, zero, impl=impl).item() == pytest.approx(5 * d, rel=1e-14)
    # Rank-deficient on both sides with disjoint ranges: no overlap, FD = tr S1 + tr S2.
    a, b = torch.diag(torch.tensor([2.0, 0, 0, 0, 0], dtype=F64)), torch.diag(torch.tensor([0, 3.0, 0, 0, 0], dtype=F64))
    assert frechet_distance(mu, a, mu, b, impl=impl).item() == pytest.approx(5.0, rel=1e-14)
    assert trace_sqrt_product(zero, zero, impl=impl).item() == 0


def test_asymmetric_covariance_is_rejected_not_symmetrised():
    # 2e-3 relative asymmetry in one off-diagonal entry: LAPACK would read one triangle and never notice.
    mu, s = _stats(300, 40, seed=22)
    bad = s.clone()
    bad[3, 17] += 2e-3 * torch.linalg.matrix_norm(s)
    assert torch.linalg.matrix_norm(bad - bad.T) / torch.linalg.matrix_norm(bad) > 2e-3
    for impl in ("scipy", "torch"):
        with pytest.raises(ValueError, match="sigma2 must be symmetric"):
            frechet_distance(mu, s, mu, bad, impl=impl)
        with pytest.raises(ValueError, match="sigma1 must be symmetric"):
            frechet_distance(mu, bad.T, mu, s, impl=impl)
    # Rounding-level asymmetry (a covariance built in fp32) is accepted.
    tiny = s.clone()
    tiny[3, 17] *= 1 + 1e-7
    assert torch.isfinite(frechet_distance(mu, s, mu, tiny))


def test_registry_entry_op_matches_reference():
    from fastcm.ops import REGISTRY

    spec = REGISTRY["frechet_distance"]
    assert spec.impls == ("auto", "scipy", "torch") and not spec.differentiable
    for case in spec.make_inputs.cases[:3]:
        kw = spec.make_inputs(case)
        expected = spec.ref(**kw).item()
        for impl in spec.impls:
            assert spec.op(**kw, impl=impl).item() == pytest.approx(expected, rel=1e-10)


def test_cached_reference():
    mu1, s1 = _stats(400, 40, seed=19)
    mu2, s2 = _stats(300, 40, seed=20, shift=0.2)
    ref = FrechetReference(mu1, s1)
    torch.testing.assert_close(ref.distance(mu2, s2), frechet_distance(mu2, s2, mu1, s1), rtol=1e-12, atol=0)
    singular = FrechetReference(*_stats(20, 40, seed=21))  # no Cholesky factor: the general route
    torch.testing.assert_close(singular.distance(mu2, s2), frechet_distance(mu2, s2, *_stats(20, 40, seed=21)),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="mu must have shape"):
        ref.distance(torch.zeros(3), torch.eye(3))


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_covariances_far_from_unit_scale_are_rescaled(scale):
    """Covariances of 1e200 made LAPACK fail (dsyevr info=1). Features scaled by a = sqrt(scale)
    (covariances by scale) give scale * FD of the unscaled problem, as scipy computes it; covariances alone scaled
    (means kept) work too; a distance beyond fp64 is refused in one line."""
    mu1, s1 = _stats(100, 16, seed=3)
    mu2, s2 = _stats(100, 16, seed=4, scale=1.5, shift=0.3)
    expected = frechet_scipy_sqrtm(mu1, s1, mu2, s2)
    a = math.sqrt(scale)
    for impl in ("auto", "torch"):
        fd = frechet_distance(mu1 * a, s1 * scale, mu2 * a, s2 * scale, impl=impl)
        assert fd.item() == pytest.approx(expected * scale, rel=1e-10)
    diff = float(((mu1 - mu2) ** 2).sum())
    assert frechet_distance(mu1, s1 * scale, mu2, s2 * scale).item() == pytest.approx(
        diff + (expected - diff) * scale, rel=1e-10)
    with pytest.raises(ValueError, match="exceeds the fp64 range"):
        frechet_distance(mu1 * 1e160, s1 * 1e306, mu2 * 1e160, s2 * 1e306)
    # The cached reference: a scaled reference, and unit-scale statistics against a scaled one, as frechet_distance.
    assert FrechetReference(mu2 * a, s2 * scale).distance(mu1 * a, s1 * scale).item() == pytest.approx(
        expected * scale, rel=1e-10)
    assert FrechetReference(mu2, s2).distance(mu1 * a, s1 * scale).item() == pytest.approx(
        frechet_distance(mu1 * a, s1 * scale, mu2, s2).item(), rel=1e-12)
