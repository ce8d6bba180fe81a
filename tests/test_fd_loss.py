"""FD loss: values against the exact metric, gradients against autograd through the full d x d route (fp64),
against the analytic form and finite differences, in batch, queue and EMA modes."""
import math

import numpy as np
import pytest
import torch

from fastcm.fid import FDLoss, fd_loss_full_ref, frechet_distance
from fastcm.ops import sqrtm_ref
from fastcm.ops.frechet import null_threshold

F64 = torch.float64



def _reference(d, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64) @ (torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d))
    return x.mean(0) + 0.5, torch.cov(x.T)


def _batch(b, d, seed=1, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=F64) * 0.8 + 0.3).requires_grad_(requires_grad)


def _value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("b, d", [(12, 40), (32, 256), (60, 40)])  # B << d, and B > d (more null eigenvalues)
def test_batch_mode_matches_metric_and_full_route(b, d):
    mu_r, s_r = _reference(d)
    x = _batch(b, d)
    loss, grad = _value_and_grad(FDLoss(mu_r, s_r), x)
    metric = frechet_distance(x.detach().mean(0), torch.cov(x.detach().T), mu_r, s_r)
    assert loss.dtype == F64 and loss.item() == pytest.approx(metric.item(), rel=1e-10)
    ref_loss, ref_grad = _value_and_grad(lambda t: fd_loss_full_ref(t, mu_r, s_r), x)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    assert _rel(grad, ref_grad) < 1e-6


def test_batch_gradient_analytic_form():
    # dFD/dX = 2 (mu - mu_r) / B + 2 X_c / (B - 1) - 2 K^(+1/2) C^T Sigma_r / sqrt(B - 1), with K = C^T Sigma_r C
    # (d x B layout) and its centring null eigenvalue removed (the low-rank form of FastFID, Mathiasen & Hvilshoej 2020), in numpy.
    d, b = 30, 10
    mu_r, s_r = _reference(d, seed=2)
    x = _batch(b, d, seed=3)
    _, grad = _value_and_grad(FDLoss(mu_r, s_r), x)
    xn, sr = x.detach().numpy(), s_r.numpy()
    xc = xn - xn.mean(0)
    c = xc.T / math.sqrt(b - 1)
    lam, u = np.linalg.eigh(c.T @ sr @ c)
    lam, u = lam[1:], u[:, 1:]  # drop the null eigenvalue
    k_half_pinv = (u / np.sqrt(lam)) @ u.T
    expected = (2 * (xn.mean(0) - mu_r.numpy()) / b + 2 * xc / (b - 1)
                - 2 * k_half_pinv @ c.T @ sr / math.sqrt(b - 1))
    assert _rel(grad, torch.from_numpy(expected)) < 1e-9


@pytest.mark.parametrize("mode", ["batch", "queue", "ema"])
def test_gradcheck(mode):
    d, b = 8, 5
    mu_r, s_r = _reference(d, n=60, seed=4)
    fd = FDLoss(mu_r, s_r, mode=mode, queue_size=12, ema_beta=0.9, queue_dtype=F64)
    if mode != "batch":
        fd.enqueue(_batch(9, d, seed=5, requires_grad=False))
    x = _batch(b, d, seed=6)
    assert torch.autograd.gradcheck(lambda t: fd(t, update=False), (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_degenerate_batches_stay_finite():
    d = 16
    mu_r, s_r = _reference(d, seed=7)
    fd = FDLoss(mu_r, s_r)
    base = _batch(6, d, seed=8, requires_grad=False)
    cases = {
        "duplicated rows": torch.cat([base, base]),
        "zero-variance features": base.clone().index_fill_(1, torch.tensor([0, 5, 9]), 1.5),
        "identical rows": base[:1].repeat(5, 1),
        "B > d": _batch(40, d, seed=9, requires_grad=False),
    }
    for name, x in cases.items():
        loss, grad = _value_and_grad(fd, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
        ref_loss, ref_grad = _value_and_grad(lambda t: fd_loss_full_ref(t, mu_r, s_r), x)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-9), name
        assert _rel(grad, ref_grad) < 1e-6, name


def test_queue_mode_matches_metric_and_full_route():
    d, b, size = 24, 10, 35
    mu_r, s_r = _reference(d, seed=10)
    fd = FDLoss(mu_r, s_r, mode="queue", queue_size=size, queue_dtype=F64)
    rows = []
    for step in range(6):  # the queue fills, then wraps around and evicts its oldest rows
        x = _batch(b, d, seed=20 + step)
        old = torch.cat(rows)[-(size - b):] if rows else None
        loss, grad = _value_and_grad(fd, x)
        everything = torch.cat([old, x.detach()]) if old is not None else x.detach()
        metric = frechet_distance(everything.mean(0), torch.cov(everything.T), mu_r, s_r)
        assert loss.item() == pytest.approx(metric.item(), rel=1e-10), step
        _, ref_grad = _value_and_grad(lambda t: fd_loss_full_ref(t, mu_r, s_r, detached=old), x)
        assert _rel(grad, ref_grad) < 1e-6, step
        rows.append(x.detach())
        assert fd.n == min(size, b * (step + 1))


def test_queue_update_false_prefill_and_fp32_storage():
    d, b = 12, 6
    mu_r, s_r = _reference(d, seed=11)
    fd64 = FDLoss(mu_r, s_r, mode="queue", queue_size=20, queue_dtype=F64)
    fd32 = FDLoss(mu_r, s_r, mode="queue", queue_size=20)
    prefill = _batch(25, d, seed=12, requires_grad=False)  # more than fits: only the newest 20 stay
    for fd in (fd64, fd32):
        fd.enqueue(prefill)
        assert fd.n == 20
    x = _batch(b, d, seed=13)
    first = fd64(x, update=False)
    assert fd64(x, update=False).item() == first.item() and fd64.n == 20
    everything = torch.cat([prefill[-(20 - b):], x.detach()])
    metric = frechet_distance(everything.mean(0), torch.cov(everything.T), mu_r, s_r)
    assert first.item() == pytest.approx(metric.item(), rel=1e-10)
    assert fd32(x).item() == pytest.approx(first.item(), rel=1e-6)  # whitened rows stored in fp32


def _ema_reference(x, history, mu_r, s_r, beta):
    """EMA moments in raw feature space (no whitening), autograd through the d x d eigvalsh route."""
    m1 = torch.zeros_like(mu_r)
    m2 = torch.zeros_like(s_r)
    for h in history:
        hr = h - mu_r
        m1, m2 = beta * m1 + (1 - beta) * hr.mean(0), beta * m2 + (1 - beta) * hr.T @ hr / h.shape[0]
    k = 1 / (1 - beta ** (len(history) + 1))
    xr = x - mu_r
    mean = k * (beta * m1 + (1 - beta) * xr.mean(0))
    sigma_g = k * (beta * m2 + (1 - beta) * xr.T @ xr / x.shape[0]) - torch.outer(mean, mean)
    r = sqrtm_ref(s_r)
    lam = torch.linalg.eigvalsh(r @ sigma_g @ r)
    keep = lam > null_threshold(lam.detach())  # the first steps are rank-deficient (B < d)
    root = lam.where(keep, 1.0).sqrt().where(keep, 0.0)
    return mean.square().sum() + sigma_g.trace() + s_r.trace() - 2 * root.sum()


def test_ema_mode_matches_reference():
    d, b, beta = 20, 8, 0.7
    mu_r, s_r = _reference(d, seed=14)
    fd = FDLoss(mu_r, s_r, mode="ema", ema_beta=beta)
    history = []
    for step in range(5):
        x = _batch(b, d, seed=30 + step)
        loss, grad = _value_and_grad(fd, x)
        ref_loss, ref_grad = _value_and_grad(lambda t: _ema_reference(t, history, mu_r, s_r, beta), x)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10), step
        assert _rel(grad, ref_grad) < 1e-6, step
        history.append(x.detach())
    assert fd.n == 5


def _singular_reference(d, kind):
    """A reference of rank < d: fewer reference samples than feature dims (rank n - 1), or dead feature units
    (exact zero rows and columns, as the digits CNN's ReLU layer has)."""
    if kind == "few_samples":
        return _reference(d, n=d // 2, seed=40)
    mu, s = _reference(d, seed=41)
    dead = torch.zeros(d, dtype=torch.bool)
    dead[[1, 5, d - 2]] = True
    s = s.masked_fill(dead[:, None] | dead[None, :], 0.0)
    return mu.masked_fill(dead, 0.0), s


@pytest.mark.parametrize("kind", ["few_samples", "dead_units"])
@pytest.mark.parametrize("mode", ["batch", "queue", "ema"])
def test_singular_reference_exact_in_every_mode(mode, kind):
    # Value and gradient against autograd through the full d x d route (R = Sigma_r^(1/2), eigvalsh of R Sigma_g R)
    # over the same features, for a reference of rank < d; the queue wraps around (evictions) within the run.
    d, b, size, beta = 24, 10, 25, 0.7
    mu_r, s_r = _singular_reference(d, kind)
    assert torch.linalg.matrix_rank(s_r) < d
    fd = FDLoss(mu_r, s_r, mode=mode, queue_size=size, ema_beta=beta, queue_dtype=F64)
    assert mode == "batch" or fd.rank == torch.linalg.matrix_rank(s_r).item()
    rows = []
    for step in range(4):
        x = _batch(b, d, seed=50 + step)
        loss, grad = _value_and_grad(fd, x)
        if mode == "ema":
            ref, ref_grad = _value_and_grad(lambda t: _ema_reference(t, rows, mu_r, s_r, beta), x)
        else:
            old = torch.cat(rows)[-(size - b):] if rows and mode == "queue" else None
            ref, ref_grad = _value_and_grad(lambda t: fd_loss_full_ref(t, mu_r, s_r, detached=old), x)
            everything = x.detach() if old is None else torch.cat([old, x.detach()])
            metric = frechet_distance(everything.mean(0), torch.cov(everything.T), mu_r, s_r)
            assert loss.item() == pytest.approx(metric.item(), rel=1e-10), step
        assert loss.item() == pytest.approx(ref.item(), rel=1e-9), step
        assert _rel(grad, ref_grad) < 1e-6, step
        rows.append(x.detach())


@pytest.mark.parametrize("mode", ["batch", "queue", "ema"])
def test_collapsed_reference(mode):
    # A zero reference covariance (constant reference images): FD = ||mu_g - mu_r||^2 + tr Sigma_g.
    d = 6
    mu_r = torch.linspace(-1, 1, d, dtype=F64)
    fd = FDLoss(mu_r, torch.zeros(d, d, dtype=F64), mode=mode, queue_size=8, ema_beta=0.0, queue_dtype=F64)
    x = _batch(8, d, seed=60)
    loss, grad = _value_and_grad(fd, x)
    expected, expected_grad = _value_and_grad(lambda t: (t.mean(0) - mu_r).square().sum() + torch.cov(t.T).trace()
                                              * (1.0 if mode != "ema" else (t.shape[0] - 1) / t.shape[0]), x)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_normalize():
    d = 16
    mu_r, s_r = _reference(d, seed=15)
    x = _batch(8, d, seed=16)
    raw, raw_grad = _value_and_grad(FDLoss(mu_r, s_r), x)
    norm, norm_grad = _value_and_grad(FDLoss(mu_r, s_r, normalize=True), x)
    assert norm.item() == pytest.approx(raw.item() / (raw.item() + 0.01), rel=1e-12)
    torch.testing.assert_close(norm_grad, raw_grad / (raw.item() + 0.01), rtol=1e-10, atol=0)


def test_fp32_features_get_fp32_gradients():
    d = 16
    mu_r, s_r = _reference(d, seed=17)
    x = _batch(8, d, seed=18).detach().float().requires_grad_()
    FDLoss(mu_r, s_r)(x).backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_bad_arguments():
    mu_r, s_r = _reference(6, seed=19)
    with pytest.raises(ValueError, match="mode must be one of"):
        FDLoss(mu_r, s_r, mode="online")
    with pytest.raises(ValueError, match="queue_size"):
        FDLoss(mu_r, s_r, mode="queue", queue_size=1)
    with pytest.raises(ValueError, match="ema_beta"):
        FDLoss(mu_r, s_r, mode="ema", ema_beta=1.0)
    with pytest.raises(ValueError, match="sigma_ref must be symmetric"):
        FDLoss(mu_r, s_r + torch.triu(torch.ones(6, 6, dtype=F64), 1))
    with pytest.raises(ValueError, match="sigma_ref is not positive semi-definite"):
        FDLoss(mu_r, torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64).kron(torch.eye(3, dtype=F64)), mode="queue")
    fd = FDLoss(mu_r, s_r)
    with pytest.raises(ValueError, match=r"shape \(B, 6\)"):
        fd(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="at least 2 features"):
        fd(torch.zeros(1, 6))
    with pytest.raises(ValueError, match="NaN or inf"):
        fd(torch.full((3, 6), float("nan")))
    with pytest.raises(TypeError, match="floating"):
        fd(torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit"):
        FDLoss(mu_r, s_r, mode="queue", queue_size=4)(torch.zeros(5, 6, dtype=F64))
    with pytest.raises(ValueError, match="fewer than 2"):
        FDLoss(mu_r, s_r, mode="queue", queue_size=4)(torch.zeros(1, 6, dtype=F64))
    with pytest.raises(ValueError, match="enqueue"):
        fd.enqueue(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="B >= 1"):
        fd(torch.zeros(0, 6))
    with pytest.raises(TypeError, match="float64"):
        FDLoss(mu_r, s_r).float()(torch.zeros(3, 6))  # a parent module's .float() must not degrade the statistics


def test_reset_and_device_state():
    d = 8
    mu_r, s_r = _reference(d, seed=20)
    fd = FDLoss(mu_r, s_r, mode="queue", queue_size=16, queue_dtype=F64)
    x = _batch(6, d, seed=21, requires_grad=False)
    first = fd(x)
    fd(x)
    assert fd.n == 12
    fd.reset()
    assert fd.n == 0 and fd.queue is None
    assert fd(x).item() == pytest.approx(first.item(), rel=1e-12)
    assert {name for name, _ in fd.named_buffers()} >= {"queue", "sum_yy", "sum_sq", "whiten"}  # .to() moves them
    assert fd.state_dict() == {}  # nothing heavy lands in a parent module's checkpoint
