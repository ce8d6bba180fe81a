"""fastcm's one validation module: every public function checks its arguments with these helpers, so a mistake ends
in one line that names the argument and says what was expected (TypeError for a wrong kind of object, ValueError for
a wrong value).

    check_tensor, check_same_device, check_choice   tensors, devices and choices (the fast ops' contract)
    is_int, check_int, check_bool, check_real       scalar arguments (bool is never an int here)
    check_ascending                                 strictly ascending 1-D grids (noise levels)
    as_images, as_labels                            image batches in [-1, 1] and integer class labels
    note, FastcmNote                                a one-line note (a warning) for input fastcm accepted but changed
                                                    or could not verify
"""
import numbers
import warnings
from typing import Iterable, Optional

import numpy as np
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
        kind = "a floating" if all(d.is_floating_point for d in dtypes) else "a"
        raise TypeError(f"{name} must have {kind} dtype ({names}), got {str(x.dtype).replace('torch.', '')}")
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


def is_int(value, minimum: Optional[int] = None) -> bool:
    """True for an integer (Python or numpy, never bool) that is >= ``minimum`` when one is given."""
    ok = isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))
    return ok and (minimum is None or value >= minimum)


def check_int(name: str, value, minimum: Optional[int] = 1) -> int:
    """``value`` as an int, or ValueError naming ``name`` unless it is an integer >= ``minimum``."""
    if not is_int(value, minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """``value`` unless it is not a bool (1, "yes" and numpy bools included): ValueError naming ``name``, as
    check_int and check_real."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def is_real(value) -> bool:
    """True for a finite real number (Python or numpy, never bool)."""
    # value - value == 0 is False exactly for inf and NaN; unlike math.isfinite it also traces under
    # torch.compile(dynamic=True), where a float attribute becomes a SymFloat.
    return isinstance(value, (numbers.Real, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and bool(value - value == 0)


def check_real(name: str, value, *, positive: bool = False, minimum: Optional[float] = None,
               maximum: Optional[float] = None) -> float:
    """``value`` as a float, or ValueError naming ``name`` unless it is a finite real, > 0 with ``positive`` and
    within the closed bounds ``minimum`` / ``maximum`` where given."""
    if not (is_real(value) and (value > 0 or not positive) and (minimum is None or value >= minimum)
            and (maximum is None or value <= maximum)):
        bounds = (f" in [{minimum:g}, {maximum:g}]" if minimum is not None and maximum is not None else
                  f" >= {minimum:g}" if minimum is not None else f" <= {maximum:g}" if maximum is not None else "")
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite number{bounds}, got {value!r}")
    return float(value)


def check_ascending(name: str, grid: torch.Tensor, minimum: int = 2, positive: bool = False) -> torch.Tensor:
    """A 1-D tensor of at least ``minimum`` entries, strictly ascending (equal neighbours are rejected: a grid
    such as [1, 1, 2] has an empty interval), all > 0 with ``positive``."""
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() < minimum:
        raise ValueError(f"{name} must be a 1-D tensor of >= {minimum} values, got {getattr(grid, 'shape', grid)}")
    if not bool(torch.isfinite(grid).all()) or (positive and not bool((grid > 0).all())):
        raise ValueError(f"{name} must hold finite{' positive' if positive else ''} values, got {grid.tolist()}")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"{name} must be strictly ascending, got {grid.tolist()}")
    return grid


def as_images(name: str, x, *, channels: Optional[int] = None, size: Optional[tuple] = None,
              min_count: int = 1, check_range: bool = True) -> torch.Tensor:
    """Return ``x`` as a float32 CPU tensor of images (N, C, H, W) in [-1, 1], or raise naming ``name``.

    Accepts numpy arrays and tensors. Values outside [-1, 1] (beyond a 1e-3 rounding margin) and NaN/inf are
    rejected, because every network here was trained on images scaled to [-1, 1].
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch.Tensor of images, got {type(x).__name__}")
    if not (x.dtype.is_floating_point or x.dtype == torch.uint8):
        raise TypeError(f"{name} must hold float images in [-1, 1], got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}")
    if size is not None and tuple(x.shape[2:]) != tuple(size):
        raise ValueError(f"{name} must be {size[0]}x{size[1]} images, got shape {tuple(x.shape)}")
    if x.shape[0] < min_count:
        raise ValueError(f"{name} needs at least {min_count} images, got {x.shape[0]}")
    if x.dtype == torch.uint8:
        raise TypeError(f"{name} holds uint8 pixels; scale them to float in [-1, 1] first (x / 127.5 - 1)")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")
    if check_range and x.numel() and (x.min() < -1.001 or x.max() > 1.001):
        raise ValueError(f"{name} must be scaled to [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}]")
    return x.contiguous()


def as_labels(name: str, y, n: int, num_classes: Optional[int] = None) -> torch.Tensor:
    """Return ``y`` as an int64 CPU tensor of shape (n,), or raise naming ``name``."""
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.ascontiguousarray(y))
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch.Tensor of class labels, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if tuple(y.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the images, got {tuple(y.shape)}")
    y = y.to("cpu", torch.int64)
    if n and y.min() < 0:
        raise ValueError(f"{name} must be class indices >= 0, got {int(y.min())}")
    if num_classes is not None and n and y.max() >= num_classes:
        raise ValueError(f"{name} must be class indices < {num_classes}, got {int(y.max())}")
    return y.contiguous()


class FastcmNote(UserWarning):
    """Input fastcm accepted but converted or could not verify (an old file without a checksum, mixed image modes).
    The `fastcm` command prints each as one line ``fastcm <command>: note: …``."""


def note(message: str, stacklevel: int = 3) -> None:
    """Warn with a one-line FastcmNote (newlines are folded, so the note stays one line)."""
    warnings.warn(" ".join(str(message).split()), FastcmNote, stacklevel=stacklevel)
