"""Frechet distance and FD loss, side by side in one run (the project's goals; d = 2048, B = 256, fp64).

frechet:metric:<d>      the whole FD from (mu, Sigma) pairs of 8k-sample covariances:
                          scipy-sqrtm  pytorch-fid / clean-fid / EDM2: scipy.linalg.sqrtm(S1 @ S2), real trace
                          eigvals      torchmetrics: torch.linalg.eigvals(S1 @ S2).sqrt().real.sum()
                          eigvals-numpy  torch-fidelity: np.linalg.eigvals(S1 @ S2) as complex128, sqrt, real sum
                          fastcm       fastcm.ops.frechet_distance (Cholesky, LAPACK dsygst congruence, eigvalsh)
                          fastcm-ref   FrechetReference(mu2, S2).distance(mu1, S1): the reference's Cholesky factor
                                       computed once (repeated FIDs against one dataset), not part of the goals
                        goals: fastcm >= 15x scipy-sqrtm and >= 4x eigvals, values equal to 1e-9 relative.
fdloss:<B>x<d>          FD loss forward + backward for a (B, d) batch against full-rank reference statistics:
                          full         autograd through the d x d route (FD-loss: cov, R Sigma_g R, eigvalsh),
                                       R = Sigma_r^(1/2) precomputed
                          batch        FDLoss(mode="batch"): the B x B route with its analytic gradient
                        goal: batch >= 25x full, gradients equal to 1e-6 relative.
fdloss-queue:<d>        one training step of FDLoss(mode="queue") / (mode="ema") with a full queue, forward + backward
                        + enqueue, next to one eigvalsh (values only), one eigh of a d x d matrix, and one
                        eigvalsh with its backward (eigvalsh+grad: the eigen step of FD-loss's own code).
                        goal: queue step <= 1.5x eigvalsh.
Groups run with the default thread counts (what a user gets; torch = the cores). BENCH_THREADS=both repeats them
with one thread for torch and OpenBLAS alike (group suffix ":1thread"): multi-threaded LAPACK on 2 cores is erratic
as soon as anything else runs (thread barriers: the same eigvals call measured 2.7 s and 15 s, scipy sqrtm 20 s and
75 s), so on a shared machine the single-threaded group is the reproducible comparison. Values are checked outside
the timed region.
"""
import contextlib
import math
import os

import numpy as np
import pytest
import torch

from _harness import SMOKE, bench, record
from fastcm.fid import FDLoss, fd_loss_full_ref
from fastcm.ops import FrechetReference, frechet_distance, sqrtm_ref
from fastcm.perf.baselines import frechet_eigvals, frechet_scipy_sqrtm

D = 64 if SMOKE else 2048
B = 16 if SMOKE else 256
QUEUE = 4 * B if SMOKE else 8192  # the per-step cost of a full queue does not depend on its length
F64 = torch.float64


# BENCH_THREADS=both adds the one-thread repeat (doubles this suite's run time); BENCH_THREADS=1 runs only it.
THREADS = {"both": ["default", 1], "1": [1]}.get("" if SMOKE else os.environ.get("BENCH_THREADS", ""), ["default"])


@pytest.fixture(params=THREADS, ids=lambda t: f"threads={t}")
def threads(request):
    """Pin torch's and OpenBLAS's (scipy / numpy) thread counts alike for one benchmark entry."""
    if request.param == "default":
        yield ""
        return
    try:  # threadpoolctl comes with scikit-learn
        from threadpoolctl import threadpool_limits
    except ImportError:  # only torch's threads can be pinned then
        threadpool_limits = contextlib.nullcontext
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    with threadpool_limits(request.param):
        yield f":{request.param}thread"
    torch.set_num_threads(before)


def _features(n, d, seed, scale=1.0):
    """Features with a decaying spectrum (like Inception's: a few strong directions, a long tail)."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -3, d, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return (torch.randn(n, d, generator=g, dtype=F64) * spectrum) @ q.T * scale + 0.1 * seed


@pytest.fixture(scope="module")
def stats():
    out = []
    for seed, scale in ((1, 1.0), (2, 1.1)):
        x = _features(4 * D if SMOKE else 8192, D, seed, scale)
        out.append((x.mean(0), torch.cov(x.T)))
    return out


def _eigvals_numpy(mu1, s1, mu2, s2):
    ev = np.linalg.eigvals(s1.numpy() @ s2.numpy()).astype(np.complex128)
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.sqrt(ev).real.sum())


_REF = {}


def _cached_reference(mu1, s1, mu2, s2):
    if id(s2) not in _REF:  # built once, outside the timed rounds (warm-up call)
        _REF[id(s2)] = FrechetReference(mu2, s2)
    return float(_REF[id(s2)].distance(mu1, s1))


METRIC = {"scipy-sqrtm": frechet_scipy_sqrtm, "eigvals": frechet_eigvals, "eigvals-numpy": _eigvals_numpy,
          "fastcm": lambda *a: float(frechet_distance(*a)), "fastcm-ref": _cached_reference}


@pytest.mark.parametrize("provider", list(METRIC))
def test_frechet_metric(benchmark, stats, provider, threads):
    (mu1, s1), (mu2, s2) = stats
    fn = METRIC[provider]
    value, exact = fn(mu1, s1, mu2, s2), float(frechet_distance(mu1, s1, mu2, s2))
    assert abs(value - exact) <= 1e-9 * abs(exact), (provider, value, exact)
    record(benchmark, group=f"frechet:metric:{D}{threads}", op="frechet_distance", case=f"d={D}", dtype="float64",
           mode="fwd", provider=provider, value=value, rel_diff_vs_fastcm=abs(value - exact) / exact,
           threads=torch.get_num_threads())
    slow = not provider.startswith("fastcm") and not SMOKE  # 3-20 s per call
    bench(benchmark, lambda: fn(mu1, s1, mu2, s2), rounds=3 if slow else (2 if SMOKE else 7),
          warmup=0 if slow else 1)


@pytest.fixture(scope="module")
def loss_setup(stats):
    mu_r, s_r = stats[0]
    x = (_features(B, D, seed=3, scale=1.2) + 0.05).requires_grad_()
    sqrt_ref = sqrtm_ref(s_r)  # FD-loss precomputes Sigma_r^(1/2) once
    fd_batch = FDLoss(mu_r, s_r, mode="batch")
    return mu_r, s_r, x, sqrt_ref, fd_batch


def _loss_runs(loss_setup):
    mu_r, s_r, x, sqrt_ref, fd_batch = loss_setup
    return {"full": lambda: fd_loss_full_ref(x, mu_r, s_r, sqrt_ref=sqrt_ref), "batch": lambda: fd_batch(x)}


def _fwd_bwd(fn, x):
    def run():
        x.grad = None
        loss = fn()
        loss.backward()
        return loss
    return run


@pytest.mark.parametrize("provider", ["full", "batch"])
def test_fd_loss_batch(benchmark, loss_setup, provider, threads):
    x = loss_setup[2]
    runs = _loss_runs(loss_setup)
    grads = {}
    for name, fn in runs.items():
        _fwd_bwd(fn, x)()
        grads[name] = x.grad.clone()
    rel = ((grads["batch"] - grads["full"]).norm() / grads["full"].norm()).item()
    assert rel < 1e-6, rel
    record(benchmark, group=f"fdloss:{B}x{D}{threads}", op="FDLoss", case=f"B={B},d={D}", dtype="float64",
           mode="fwd+bwd", provider=provider, grad_rel_diff=rel, threads=torch.get_num_threads())
    slow = provider == "full" and not SMOKE
    bench(benchmark, _fwd_bwd(runs[provider], x), rounds=2 if SMOKE else (5 if slow else 10), warmup=1)


@pytest.fixture(scope="module")
def queue_setup(stats):
    mu_r, s_r = stats[0]
    losses = {}
    for mode in ("queue", "ema"):
        fd = FDLoss(mu_r, s_r, mode=mode, queue_size=QUEUE)
        fd.enqueue(_features(QUEUE, D, seed=4, scale=1.2))
        losses[mode] = fd
    mat = stats[1][1]
    x = _features(B, D, seed=5, scale=1.2).requires_grad_()
    return losses, mat, x


def _eigvalsh_with_grad(mat):
    """What FD-loss's own step runs: a differentiable eigvalsh (torch computes eigenvectors for the backward)."""
    leaf = mat.clone().requires_grad_()

    def run():
        leaf.grad = None
        torch.linalg.eigvalsh(leaf).sqrt().sum().backward()
    return run


@pytest.mark.parametrize("provider", ["eigvalsh", "eigh", "eigvalsh+grad", "queue", "ema"])
def test_fd_loss_queue_step(benchmark, queue_setup, provider, threads):
    losses, mat, x = queue_setup
    if provider == "eigvalsh":
        run = lambda: torch.linalg.eigvalsh(mat)  # noqa: E731
    elif provider == "eigh":
        run = lambda: torch.linalg.eigh(mat)  # noqa: E731
    elif provider == "eigvalsh+grad":
        run = _eigvalsh_with_grad(mat)
    else:
        run = _fwd_bwd(lambda: losses[provider](x), x)
    record(benchmark, group=f"fdloss-queue:{D}{threads}", op="FDLoss", case=f"B={B},d={D},queue={QUEUE}",
           dtype="float64", mode="fwd" if provider in ("eigvalsh", "eigh") else "fwd+bwd", provider=provider,
           threads=torch.get_num_threads())
    result = bench(benchmark, run, rounds=2 if SMOKE else 7, warmup=1)
    if provider in ("queue", "ema"):
        assert math.isfinite(float(result.detach()))
