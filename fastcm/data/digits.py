"""scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes): the embedded default dataset, no files needed.

Pixels are integers 0..16; x / 8 - 1 maps them onto [-1, 1]. The split is the project's fixed one:
``train_test_split(test_size=0.25, stratify=labels, random_state=0)`` (1,347 train / 450 test).
"""
import functools

import numpy as np

from .arrays import ArrayDataset

SPLITS = ("train", "test", "all")


def load_digits(split: str = "train") -> ArrayDataset:
    """The digits ``split`` ("train", "test" or "all") as an :class:`ArrayDataset` of (1, 8, 8) images."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _splits()[split]
    return ArrayDataset(images.copy(), labels.copy(), num_classes=10, name=f"digits/{split}")


@functools.lru_cache(maxsize=1)
def _splits():
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is a test/demo dependency
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = _sk_load_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # (1797, 1, 8, 8) in [-1, 1]
    labels = bunch.target.astype(np.int64)
    out = {"all": (images, labels)}
    # Same rows in the same order as train_test_split(images, labels, ...) on the arrays themselves.
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.25, stratify=labels, random_state=0)
    out["train"], out["test"] = (x_tr, y_tr), (x_te, y_te)
    return out
