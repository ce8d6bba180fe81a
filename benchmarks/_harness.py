"""Shared pieces of the pytest-benchmark suites: devices, providers and timed closures.

Every entry records what the report needs in ``benchmark.extra_info``: op or pipeline, case/shape, dtype, mode
("fwd" or "fwd+bwd"), provider ("eager", "compiled", "triton"), the device name, and optional work units
(bytes or flops per call) from which the report derives GB/s or TFLOP/s.
"""
import os

import torch

# BENCH_SMOKE=1 (set by tests/test_benchmarks_smoke.py under `make test`): each suite once, at a tiny size.
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str = DEVICE) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def sync(device: str = DEVICE) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def op_providers(device: str = DEVICE):
    """Reference eager and compiled everywhere; the Triton kernel only on CUDA (the interpreter is no benchmark)."""
    return ["eager", "compiled"] + (["triton"] if device == "cuda" else [])


def leaves(kwargs: dict):
    return [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def timed_call(fn, kwargs: dict, mode: str, device: str = DEVICE):
    """A closure running ``fn(**kwargs)`` (mode "fwd") or forward + backward (mode "fwd+bwd"), synchronised."""
    inputs = leaves(kwargs)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(**kwargs)
        else:
            for t in inputs:
                t.grad = None
            out = fn(**kwargs)
            out.backward(torch.ones_like(out))
        sync(device)
        return out

    return run


def record(benchmark, **info) -> None:
    info.setdefault("device", device_name())
    info.setdefault("torch", torch.__version__)
    benchmark.extra_info.update({k: (str(v) if not isinstance(v, (int, float)) else v) for k, v in info.items()})


def peak_memory_mb(run, device: str = DEVICE):
    """Peak allocated memory of one call in MiB on CUDA; None on the CPU, whose allocator keeps no such counter."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(benchmark, run, rounds: int = 10, warmup: int = 2):
    """Time ``run`` with pedantic rounds after warm-up calls (which also trigger torch.compile)."""
    for _ in range(warmup):
        run()
    peak = peak_memory_mb(run)
    if peak is not None:
        benchmark.extra_info["peak_mb"] = round(peak, 2)
    return benchmark.pedantic(run, rounds=1 if SMOKE else rounds, iterations=1)
