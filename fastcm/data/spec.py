"""The one dataset grammar of fastcm, for every command (``train --data``, ``stats``, ``fid``, ``cas --real``,
``edit --input``) and for the Python API (:func:`load_dataset`, :func:`fastcm.fid.fid`):

    digits                   scikit-learn's handwritten digits, the caller's default split
    digits:train|test|all    one split of it (1,347 / 450 / 1,797 images)
    cifar10:DIR              CIFAR-10 python batches (cifar-10-batches-py or its parent), the default split
    cifar10:DIR:train|test   one split of it
    folder:DIR               an image folder: one subfolder per class, or unlabelled images directly in DIR
    FILE.npz                 arrays x (images) and optionally y (labels)
"""
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .arrays import ArrayDataset, load_npz
from .cifar import load_cifar10
from .digits import load_digits
from .folder import load_image_folder

FORMS = "digits, digits:train, digits:test, digits:all, cifar10:DIR[:train|test], folder:DIR or FILE.npz"
SPLITS = {"digits": ("train", "test", "all"), "cifar10": ("train", "test")}


class DatasetSpec(NamedTuple):
    kind: str             # "digits", "cifar10", "folder" or "npz"
    path: Optional[str]   # the directory or file (None for digits)
    split: Optional[str]  # the split the string names, None when it names none


def parse_dataset(spec) -> DatasetSpec:
    """Parse a dataset string (see the module docstring); one error message lists every form."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"a dataset must be a string ({FORMS}), got {type(spec).__name__}")
    spec = os.fspath(spec)
    kind, sep, rest = spec.partition(":")
    if kind == "digits" and (not sep or rest in SPLITS["digits"]):
        return DatasetSpec("digits", None, rest or None)
    if kind == "cifar10" and rest:
        path, _, split = rest.rpartition(":")
        return DatasetSpec("cifar10", path, split) if path and split in SPLITS["cifar10"] else \
            DatasetSpec("cifar10", rest, None)
    if kind == "folder" and rest:
        return DatasetSpec("folder", rest, None)
    if Path(spec).suffix.lower() == ".npz":
        return DatasetSpec("npz", spec, None)
    hint = f" (for the image folder {spec} write folder:{spec})" if spec and Path(spec).is_dir() else ""
    raise ValueError(f"unknown dataset {spec!r}: expected one of {FORMS}{hint}")


def load_dataset(spec, split: str = "train", resolution: Optional[int] = None,
                 channels: Optional[int] = None) -> ArrayDataset:
    """Load a dataset string. ``split`` is taken when the string names none (digits, CIFAR-10); ``resolution``
    (centre crop + resize) and ``channels`` (1, 3, or None for the first file's) apply to image folders."""
    kind, path, named = parse_dataset(spec)
    split = named or split
    if kind in SPLITS and split not in SPLITS[kind]:
        raise ValueError(f"split must be one of {SPLITS[kind]} for {kind}, got {split!r}")
    if kind == "digits":
        data = load_digits(split)
    elif kind == "cifar10":
        data = load_cifar10(path, split)
    elif kind == "folder":
        data = load_image_folder(path, resolution=resolution, channels=channels)
    else:
        data = load_npz(path)
    # the string it came from, split resolved (recorded by training: fastcm.data.fingerprint)
    data.spec = f"{kind}:{split}" if kind == "digits" else f"{kind}:{path}:{split}" if kind == "cifar10" else \
        f"folder:{path}" if kind == "folder" else str(path)
    return data


def train_test_datasets(spec, test_fraction: float = 0.25, seed: int = 0):
    """(train, test, description) of a labelled dataset string, for protocols that train on real data and test on
    held-out real data (CAS). digits and cifar10:DIR without a split give their standard train and test splits;
    any other form (a named split, a folder, an .npz) is split here: a stratified ``test_fraction`` of each class
    (at least one image of every class with two or more), drawn with ``seed``."""
    kind, _, named = parse_dataset(spec)
    if kind in SPLITS and named is None:
        return load_dataset(spec, "train"), load_dataset(spec, "test"), f"the test split of {spec}"
    data = load_dataset(spec)
    if data.labels is None:
        raise ValueError(f"{spec} has no class labels (a folder needs one subfolder per class, an .npz an array y)")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(data), dtype=torch.bool)
    for c in range(data.num_classes):
        rows = (data.labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        take = max(1, round(test_fraction * len(rows))) if len(rows) >= 2 else 0
        test[rows[:take]] = True
    if not test.any() or test.all():
        raise ValueError(f"{spec} has too few images per class to hold out a test set")
    parts = [ArrayDataset(data.images[m], data.labels[m], data.num_classes, name=f"{data.name}/{part}")
             for m, part in ((~test, "train"), (test, "test"))]
    return parts[0], parts[1], f"a stratified {test_fraction:.0%} hold-out of {spec} (seed {seed})"
