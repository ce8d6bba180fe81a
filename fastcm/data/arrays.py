"""In-memory image datasets: (N, C, H, W) images in [-1, 1] with optional integer class labels; `.npz` files.

Every loader in fastcm.data returns an :class:`ArrayDataset`. Images are kept as stored (uint8 0..255 stays uint8,
four times smaller than fp32) and converted to float32 in [-1, 1] per batch.
"""
import os
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from fastcm._checks import check_int
from fastcm._io import check_input_file


class ArrayDataset(torch.utils.data.Dataset):
    """Images in memory, returned as float32 in [-1, 1], with int64 labels (or -1 when unlabelled).

    Args:
        images: (N, C, H, W) uint8 tensor/array in 0..255, or a floating one already in [-1, 1].
        labels: optional (N,) integer class labels in [0, num_classes).
        num_classes: number of classes (default: max label + 1); must be None without labels.
        name: a short description shown in errors and logs.
    """

    def __init__(self, images, labels=None, num_classes: Optional[int] = None, name: str = "arrays"):
        images = _as_tensor("images", images)
        if images.dim() != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3, 4):
            raise ValueError(f"{name}: images must have shape (N, C, H, W) with N >= 1 and C in (1, 3, 4), "
                             f"got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise TypeError(f"{name}: images must be uint8 (0..255) or floating in [-1, 1], got {images.dtype}")
            images = images.float()
            if not torch.isfinite(images).all():
                raise ValueError(f"{name}: images contain NaN or inf")
            lo, hi = images.min().item(), images.max().item()
            if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
                raise ValueError(f"{name}: floating images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
        self.images = images.contiguous()
        self.labels, self.num_classes = _check_labels(name, labels, num_classes, images.shape[0])
        self.name, self.spec = name, None  # spec: the dataset string load_dataset read it from

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def get_batch(self, index: Tensor):
        """Images (B, C, H, W) float32 in [-1, 1] and labels (B,) int64 (None when unlabelled) at ``index``."""
        x = self.images[index]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.clone()
        y = None if self.labels is None else self.labels[index]
        return x, y

    def __getitem__(self, i: int):
        x, y = self.get_batch(torch.tensor([int(i)]))
        return x[0], (torch.tensor(-1) if y is None else y[0])

    def __repr__(self) -> str:
        return (f"ArrayDataset({self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes}, dtype={str(self.images.dtype).replace('torch.', '')})")


def load_npz(path: Union[str, os.PathLike], num_classes: Optional[int] = None) -> ArrayDataset:
    """Read a ``.npz`` holding ``x`` (images) and optionally ``y`` (labels); arrays only, no pickled objects.

    ``x`` is (N, H, W) grey, (N, C, H, W) or (N, H, W, C) with C in (1, 3, 4) (read as (N, C, H, W) whenever
    x.shape[1] is 1, 3 or 4); uint8 0..255 or float in [-1, 1]. ``y`` holds integer labels (N,).
    """
    path = check_input_file(path, "npz dataset", "a .npz file with arrays x, y")
    with open(path, "rb") as f:
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # an .npz is a zip archive
            raise ValueError(f"{path} is not a .npz file (expected a zip archive of arrays x, y)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if "x" not in keys:
                raise ValueError(f"{path}: expected an array named 'x' (images) and optionally 'y' (labels), "
                                 f"found {sorted(keys)}")
            x = f["x"]
            y = f["y"] if "y" in keys else None
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(f"{path}: object arrays are not accepted (store plain numeric arrays x, y)") from e
        raise
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # truncated or damaged archive
        raise ValueError(f"{path} is not a readable .npz file: {e}") from e
    return ArrayDataset(_to_nchw(str(path), x), y, num_classes, name=path.name)


def _to_nchw(name: str, x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    # (N, C, H, W) whenever dim 1 can be a channel count, else (N, H, W, C).
    if x.ndim == 4 and x.shape[1] in (1, 3, 4):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise ValueError(f"{name}: x must be (N, H, W), (N, C, H, W) or (N, H, W, C) with C in (1, 3, 4), "
                     f"got shape {x.shape}")


def _as_tensor(name: str, a) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().cpu()
    if isinstance(a, np.ndarray):
        if a.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got an object array")
        return torch.from_numpy(np.ascontiguousarray(a))
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}")


def _check_labels(name: str, labels, num_classes: Optional[int], n: int):
    if labels is None:
        if num_classes is not None:
            raise ValueError(f"{name}: num_classes={num_classes} given but there are no labels")
        return None, None
    labels = _as_tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name}: labels must be integers, got {labels.dtype}")
    labels = labels.reshape(-1).long() if labels.dim() <= 1 else labels
    if labels.shape != (n,):
        raise ValueError(f"{name}: labels must have shape ({n},) to match the images, got {tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if num_classes is None:
        num_classes = hi + 1
    num_classes = check_int(f"{name}: num_classes", num_classes)
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return labels.contiguous(), num_classes
