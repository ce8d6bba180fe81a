"""fastcm/ops/_lapack.py (scipy LAPACK routes) against torch.linalg, and the FD-loss queue gradient through the
tridiagonal route against the dense-eigenvector route."""
import pytest
import torch

from fastcm.fid import FDLoss
from fastcm.ops import _lapack
from fastcm.ops._lapack import DenseEigh, TridiagonalEigh, cholesky_lower, eigvalsh_lower, factored_eigh, use_lapack

F64 = torch.float64
needs_scipy = pytest.mark.skipif(_lapack.lapack is None, reason="scipy's LAPACK is not installed")


def _spd(d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d + 3, generator=g, dtype=F64)
    return a @ a.T


def _garble_upper(m):
    """Garbage in the strict upper triangle: only the lower one may be read."""
    return torch.tril(m) + torch.triu(torch.full_like(m, 7.0), 1)


@needs_scipy
@pytest.mark.parametrize("d", [1, 2, 7, 64, 129])
def test_eigvalsh_and_cholesky_match_torch(d):
    m = _spd(d, seed=d)
    torch.testing.assert_close(eigvalsh_lower(_garble_upper(m)), torch.linalg.eigvalsh(m), rtol=0,
                               atol=1e-12 * m.norm().item())
    torch.testing.assert_close(cholesky_lower(_garble_upper(m)), torch.linalg.cholesky(m), rtol=1e-12, atol=1e-12)


@needs_scipy
def test_eigvalsh_overwrite_only_touches_its_argument():
    m = _spd(32)
    before = m.clone()
    eigvalsh_lower(m, overwrite=True)  # C-contiguous: LAPACK gets a column-major copy, m stays
    assert torch.equal(m, before)
    # column-major storage: LAPACK works in place on it (reading its lower triangle), no copy
    for fn in (eigvalsh_lower, lambda a, overwrite: TridiagonalEigh(a, overwrite=overwrite).lam):
        col_major = _garble_upper(before).mT.contiguous().mT
        assert not col_major.is_contiguous()
        lam = fn(col_major, overwrite=True)
        torch.testing.assert_close(lam, torch.linalg.eigvalsh(before), rtol=0, atol=1e-12 * before.norm().item())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cholesky_rejects_indefinite_and_singular(dtype):
    assert cholesky_lower(torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=dtype))) is None
    assert cholesky_lower(torch.zeros(3, 3, dtype=dtype)) is None
    assert cholesky_lower(torch.eye(3, dtype=dtype)) is not None


def test_torch_fallback_for_other_dtypes():
    m = _spd(16).float()
    assert not use_lapack(m)
    torch.testing.assert_close(eigvalsh_lower(m), torch.linalg.eigvalsh(m), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="float64 CPU"):
        TridiagonalEigh(m)


@needs_scipy
@pytest.mark.parametrize("d,rank", [(1, None), (2, None), (9, None), (70, None), (70, 20)])
def test_tridiagonal_eigh_apply_matches_dense_eigh(d, rank):
    """U diag(f(lambda)) U^T X with U = Q Z kept factored equals the dense eigh product, including a singular M
    (rank 20 of 70) with the null eigenvalues masked as FDLoss masks them."""
    m = _spd(d, rank, seed=3)
    x = torch.randn(d, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    te = TridiagonalEigh(_garble_upper(m))
    lam_ref = torch.linalg.eigvalsh(m)
    torch.testing.assert_close(te.lam, lam_ref, rtol=0, atol=1e-12 * lam_ref.abs().max().item())

    def fn(lam):
        keep = lam > 1e-9 * lam.abs().max()
        return torch.where(keep, lam.where(keep, 1.0).rsqrt(), 0.0)

    lam, u = torch.linalg.eigh(m)
    ref = u @ (fn(lam).unsqueeze(1) * (u.mT @ x))
    torch.testing.assert_close(te.apply(x, fn(te.lam)), ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


@needs_scipy
@pytest.mark.parametrize("mode", ["queue", "ema"])
def test_fd_loss_gradient_same_on_both_eigen_routes(mode, monkeypatch):
    """The CPU tridiagonal route and the dense eigh route (GPU / no scipy) give one loss and one gradient."""
    g = torch.Generator().manual_seed(0)
    d = 24
    ref = torch.randn(200, d, generator=g, dtype=F64)
    mu_r, s_r = ref.mean(0), torch.cov(ref.T)
    prefill = torch.randn(64, d, generator=g, dtype=F64) * 1.3 + 0.2
    batch = torch.randn(16, d, generator=g, dtype=F64) * 1.1

    def run():
        fd = FDLoss(mu_r, s_r, mode=mode, queue_size=80, queue_dtype=F64)
        fd.enqueue(prefill)
        x = batch.clone().requires_grad_()
        loss = fd(x)
        loss.backward()
        return loss.detach(), x.grad

    assert isinstance(factored_eigh(torch.eye(2, dtype=F64)), TridiagonalEigh)
    loss_tri, grad_tri = run()
    monkeypatch.setattr(_lapack, "use_lapack", lambda *t, **kw: False)
    assert isinstance(factored_eigh(torch.eye(2, dtype=F64)), DenseEigh)
    loss_dense, grad_dense = run()
    torch.testing.assert_close(loss_tri, loss_dense, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_tri, grad_dense, rtol=1e-9, atol=1e-12)
