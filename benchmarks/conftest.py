"""Benchmarks run with `make bench` (pytest-benchmark). Under `make test`, BENCH_SMOKE=1 runs each suite once at a
tiny size so the suites cannot rot."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
