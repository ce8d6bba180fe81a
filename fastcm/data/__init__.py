"""Datasets for fastcm: embedded digits, CIFAR-10 python batches, image folders, .npz arrays; batches; grids.

Every loader returns an :class:`ArrayDataset` (images in [-1, 1] per batch, int64 labels); :func:`load_dataset`
parses the one-string form used by the CLI.
"""
import os
from pathlib import Path
from typing import Optional

from .arrays import ArrayDataset, load_npz
from .cifar import load_cifar10
from .digits import load_digits
from .folder import load_image_folder
from .grid import make_grid, save_grid
from .loader import BatchLoader, derive_seed

__all__ = ["ArrayDataset", "BatchLoader", "derive_seed", "load_cifar10", "load_dataset", "load_digits",
           "load_image_folder", "load_npz", "make_grid", "save_grid"]


def load_dataset(spec: str, split: str = "train", resolution: Optional[int] = None) -> ArrayDataset:
    """Load a dataset from one string: ``digits``, ``cifar10:<dir>``, ``folder:<dir>`` or a ``<file>.npz`` path.

    ``split`` applies to digits ("train", "test", "all") and CIFAR-10 ("train", "test"); ``resolution`` to folders.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a string, got {type(spec).__name__}")
    spec = os.fspath(spec)
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        return load_digits(split)
    if kind == "cifar10" and rest:
        return load_cifar10(rest, split)
    if kind == "folder" and rest:
        return load_image_folder(rest, resolution=resolution)
    if Path(spec).suffix.lower() == ".npz":
        return load_npz(spec)
    raise ValueError(f"unknown dataset {spec!r}: expected 'digits', 'cifar10:<dir>', 'folder:<dir>' or a .npz path")
