"""Test set-up: Triton kernels run under the interpreter (TRITON_INTERPRET=1) when there is no CUDA device.

The interpreter is an import-time switch of triton, so it is set here, before anything imports triton.
Every interpreted launch of every test runs under the sanitizer of kernels/_probe.py (out-of-bounds accesses and
races between programs, which the interpreter itself tolerates): a test whose launches produce a finding fails
with the kernel, the kind and the first offending program. FASTCM_SANITIZE=0 switches it off (to time its cost).
"""
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
SANITIZE = not HAS_CUDA and os.environ.get("FASTCM_SANITIZE", "1") != "0"

# One intra-op thread for torch and for the BLAS/LAPACK behind numpy/scipy: the test tensors are small, results do
# not depend on it, and on a 2-core machine shared with other processes a second OpenMP/LAPACK thread only adds
# spin-waiting (measured 10-100x slow-downs of eigensolvers and 8x8 U-Net steps under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    try:  # threadpoolctl comes with scikit-learn (a test dependency)
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(1):
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """The test's call inside a sanitizing probe; findings that the test did not claim with a probe of its own
    fail it (after its own outcome: a test that already failed keeps its error, with the findings appended)."""
    if not SANITIZE:
        return (yield)
    from fastcm.kernels import _probe

    with _probe.probe(sanitize=True, count=False) as sanitizer:
        try:
            result = yield
        except BaseException as e:
            if sanitizer.findings:
                e.add_note(_probe.format_findings(sanitizer.findings))
            raise
    sanitizer.check()
    return result


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield 0


@pytest.fixture
def device():
    """Where kernels run: CUDA when present, else the CPU (through the Triton interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"
