"""CIFAR-10 from a local ``cifar-10-batches-py`` directory (the standard python pickled batches).

The batches are pickles, so they are read with an unpickler that can build only numpy arrays, dtypes, and the
builtin containers around them: a pickle naming any other class or function is refused, never executed.
"""
import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Union

import numpy as np

from .arrays import ArrayDataset

SPLITS = ("train", "test")
_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_PER_BATCH_MAX = 10_000


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    return core.multiarray._reconstruct


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a pickled dict of numpy arrays needs; everything else raises UnpicklingError."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: codecs.encode,  # bytes written by python 3 at protocol 2
    }

    def find_class(self, module, name):
        get = self._ALLOWED.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only "
                                         "numpy arrays, lists and bytes")
        return get()


def _read_batch(path: Path):
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected a dict, got {type(obj).__name__}")
    obj = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    data, labels = obj.get("data"), obj.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    labels = np.asarray(labels if isinstance(labels, (list, np.ndarray)) else [], dtype=np.int64)
    if labels.shape != (data.shape[0],) or data.shape[0] > _PER_BATCH_MAX:
        raise ValueError(f"{path}: 'labels' must be a list of {data.shape[0]} ints (and N <= {_PER_BATCH_MAX}), "
                         f"got {labels.shape[0]}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: Union[str, os.PathLike], split: str = "train") -> ArrayDataset:
    """CIFAR-10 ``split`` ("train": 50,000 images, "test": 10,000) of (3, 32, 32) uint8 images, 10 classes.

    ``root`` is the extracted ``cifar-10-batches-py`` directory or its parent.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 root {str(root)!r} is not a directory (expected the extracted "
                                "cifar-10-batches-py directory or its parent)")
    missing = [name for name in _FILES[split] if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not a cifar-10-batches-py directory: missing {', '.join(missing)}")
    parts = [_read_batch(root / name) for name in _FILES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ArrayDataset(images, labels, num_classes=10, name=f"cifar10/{split}")
