"""Dispatch for the fast ops (the fast-ops contract, see README). Input validation lives in fastcm._checks (the one
validation module); its names are re-exported here for the op files that import them from this module."""
import contextlib
import os
from typing import Optional

import torch

from fastcm._checks import FLOAT_DTYPES, IMPLS, check_choice, check_int, check_same_device, check_tensor  # noqa: F401


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_override: Optional[str] = None  # the backend of the innermost use_impl block, None outside every block


@contextlib.contextmanager
def use_impl(impl: str):
    """Run every fastcm op called inside the block on backend ``impl`` ("auto", "triton" or "torch"), whatever
    its caller or module asked for; blocks nest and the previous backend comes back on exit, also on error.

        with fastcm.ops.use_impl("torch"):   # the PyTorch reference of every op, e.g. as an oracle
            ref = model(x, sigma)

    The setting is process-wide (not per thread). Under torch.compile it is read at trace time and guarded, so a
    compiled function recompiles when it changes."""
    global _override
    check_choice("impl", impl, IMPLS)
    previous, _override = _override, impl
    try:
        yield
    finally:
        _override = previous


def current_impl() -> Optional[str]:
    """The backend of the innermost :func:`use_impl` block, or None outside every block."""
    return _override


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """Pick the backend: "auto" runs Triton on CUDA tensors and the reference elsewhere; inside a
    :func:`use_impl` block its backend replaces ``impl``.

    ``impl="triton"`` forces the kernel; on CPU tensors it needs TRITON_INTERPRET=1 (set before triton is
    imported), which is how the tests exercise the kernels without a GPU.
    """
    check_choice("impl", impl, IMPLS)
    if _override is not None:
        impl = _override
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
    return "triton"
