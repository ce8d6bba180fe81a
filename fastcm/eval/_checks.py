"""Input validation shared by the evaluation functions: images, labels, arrays from files."""
from typing import Optional

import numpy as np
import torch


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


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
