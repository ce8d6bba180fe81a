"""Test set-up: Triton kernels run under the interpreter (TRITON_INTERPRET=1) when there is no CUDA device.

The interpreter is an import-time switch of triton, so it is set here, before anything imports triton.
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
