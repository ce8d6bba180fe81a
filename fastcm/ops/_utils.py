"""Dispatch for the fast ops (the fast-ops contract, see README). Input validation lives in fastcm._checks (the one
validation module); its names are re-exported here for the op files that import them from this module."""
import os

import torch

from fastcm._checks import FLOAT_DTYPES, IMPLS, check_choice, check_int, check_same_device, check_tensor  # noqa: F401


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """Pick the backend: "auto" runs Triton on CUDA tensors and the reference elsewhere.

    ``impl="triton"`` forces the kernel; on CPU tensors it needs TRITON_INTERPRET=1 (set before triton is
    imported), which is how the tests exercise the kernels without a GPU.
    """
    check_choice("impl", impl, IMPLS)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
    return "triton"
