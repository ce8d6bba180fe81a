"""Host-side helpers shared by the launchers."""
import contextvars
import os

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner, Heuristics

# Under TRITON_INTERPRET=1 kernels run on the CPU through numpy, one program after another (~1 ms per program).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest block one program keeps in registers, in elements: 16,384 fp32 = 64 KB, the cap of Triton's layer-norm
# tutorial (65536 // element_size elements, i.e. 64 KB). Liger's MAX_FUSED_SIZE = 65,536 counts elements, not bytes
# (256 KB of fp32), four times this one.
MAX_FUSED_SIZE = 16384


# FP contraction (a * b + c as one fused multiply-add, one rounding instead of two). Triton up to 3.9 contracts by
# default and warns (3.9) that 3.10 will not. The kernels are written for contraction: no compensated sums that it
# would break, and the FMA form is both the faster and the more accurate one (online-softmax rescales, the variance
# and Pseudo-Huber epilogues, fp32 IEEE dots on FMA units). Pinned per launch, so every triton compiles them alike;
# the CPU interpreter never contracts and drops the option, so no exactness test depends on it.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def pin_launch_options(namespace: dict) -> None:
    """Launch every kernel (``*_kernel``) of a kernels module with :data:`LAUNCH_OPTIONS` (a call's own keywords
    win). Wraps the innermost JIT (or interpreted) function's ``run``, under autotuners and heuristics, and calls
    its class's ``run`` at launch time, so later hooks on that class (the probe's) still apply."""
    for name, kernel in list(namespace.items()):
        if not name.endswith("_kernel"):
            continue
        fn = kernel
        while isinstance(fn, (Autotuner, Heuristics)):
            fn = fn.fn
        if not hasattr(fn, "run") or getattr(fn.run, "pinned_options", None) is LAUNCH_OPTIONS:
            continue  # a host function named *_kernel, or pinned already

        def run(*args, _fn=fn, **kwargs):
            return type(_fn).run(_fn, *args, **{**LAUNCH_OPTIONS, **kwargs})

        run.pinned_options = LAUNCH_OPTIONS
        fn.run = run


def block_size(n: int, cap: int = MAX_FUSED_SIZE, floor: int = 16) -> int:
    """Power-of-two block covering ``n`` elements, clamped to [floor, cap]."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def num_warps(block: int) -> int:
    """Warps for a 1-D block (unsloth/Liger heuristic)."""
    return 4 if block < 2048 else 8 if block < 8192 else 16


def fp32_matmul_precision() -> str:
    """"tf32" when torch allows TF32 tensor cores for fp32 matmuls, else "ieee" (torch's default).

    Reads the new per-backend setting ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9), which
    ``torch.set_float32_matmul_precision("high")`` and ``allow_tf32 = True`` also set; the legacy global getter raises
    on torch 2.13 once a user has set the new one, so it is read only where the new attribute does not exist."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None:
        return "tf32" if precision == "tf32" else "ieee"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"


def compute_dtype(x: torch.Tensor):
    """Triton dtype a kernel computes in: fp64 for fp64 inputs (so gradcheck works), fp32 otherwise."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """Torch dtype of reduction outputs for ``x``: fp64 for fp64 inputs, fp32 for fp32/fp16/bf16."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Per-block shared-memory limit the launchers prune configs against when no CUDA device answers (set by the
# ahead-of-time compile gate, kernels/_aot.py, to the limit of the architecture it compiles for).
TARGET_SHARED_MEMORY: contextvars.ContextVar = contextvars.ContextVar("TARGET_SHARED_MEMORY", default=None)
_DEVICE_SHARED_MEMORY = {}
# Streaming multiprocessors the launchers plan for when no CUDA device answers (set by the compile gate's GroupNorm
# scenarios, fastcm/ops/group_norm.aot_jobs, to the SM count of the GPU it plans for; None: the device's own).
TARGET_SMS: contextvars.ContextVar = contextvars.ContextVar("TARGET_SMS", default=None)


def shared_memory_limit(device: torch.device):
    """Largest dynamic shared memory (bytes) one block may use on ``device``; None when nothing bounds it (CPU /
    interpreter without a compile target)."""
    target = TARGET_SHARED_MEMORY.get()
    if target is not None or device.type != "cuda":
        return target
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_SHARED_MEMORY:  # the limit Triton itself checks before launching (OutOfResources)
        from triton.compiler.compiler import max_shared_mem
        _DEVICE_SHARED_MEMORY[index] = max_shared_mem(index)
    return _DEVICE_SHARED_MEMORY[index]
