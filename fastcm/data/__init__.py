"""Datasets for fastcm: embedded digits, CIFAR-10 python batches, image folders, .npz arrays; batches; grids.

Every loader returns an :class:`ArrayDataset` (images in [-1, 1] per batch, int64 labels); :func:`load_dataset`
parses the one dataset grammar of every command and of the Python API (spec.py): ``digits[:train|test|all]``,
``cifar10:DIR[:train|test]``, ``folder:DIR``, ``FILE.npz``.
"""
from .arrays import ArrayDataset, load_npz
from .cifar import load_cifar10
from .digits import load_digits
from .fingerprint import data_change, data_fingerprint
from .folder import load_image_folder
from .grid import make_grid, save_grid
from .loader import BatchLoader, derive_seed
from .spec import FORMS, DatasetSpec, load_dataset, parse_dataset, train_test_datasets

__all__ = ["ArrayDataset", "BatchLoader", "DatasetSpec", "FORMS", "data_change", "data_fingerprint", "derive_seed",
           "load_cifar10", "load_dataset", "load_digits", "load_image_folder", "load_npz", "make_grid",
           "parse_dataset", "save_grid", "train_test_datasets"]
