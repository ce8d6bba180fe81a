"""Shared input validation and dispatch for the fast ops (the fast-ops contract, see README)."""
import os
from typing import Iterable, Optional

import torch

IMPLS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 dtypes: Iterable[torch.dtype] = FLOAT_DTYPES, shape: Optional[tuple] = None) -> torch.Tensor:
    """Raise TypeError/ValueError naming ``name`` unless ``x`` is a tensor of an allowed dtype and shape.

    ``shape`` may contain ``None`` for "any size" in that position.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    dtypes = tuple(dtypes)
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}")
    if shape is not None:
        ok = x.dim() == len(shape) and all(s is None or s == xs for s, xs in zip(shape, x.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    return x


def check_same_device(**tensors) -> None:
    """Raise ValueError when the given (non-None) tensors live on different devices."""
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    devices = {v.device for _, v in items}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in items)
        raise ValueError(f"all tensors must be on one device, got {where}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


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
