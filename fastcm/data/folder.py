"""An image folder: one subfolder per class holding PNG/JPEG files (read with pillow), or images directly in the
root for an unlabelled set. Classes are the subfolder names in sorted order; images are loaded into memory as uint8.
"""
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from fastcm._checks import check_int

from .arrays import ArrayDataset

EXTENSIONS = (".png", ".jpg", ".jpeg")
_MODES = {1: "L", 3: "RGB"}


def load_image_folder(root: Union[str, os.PathLike], resolution: Optional[int] = None,
                      channels: Optional[int] = 3) -> ArrayDataset:
    """Load ``root``/<class>/*.{png,jpg,jpeg} (or ``root``/*.png … unlabelled) as (channels, H, W) uint8 images.

    Args:
        resolution: when given, each image is centre-cropped to a square and resized to resolution x resolution;
            when None every image must already have the same size.
        channels: 3 (RGB) or 1 (grey); pillow converts each file's mode. None: 1 when the first file is
            greyscale, else 3.
    The dataset's ``class_names`` lists the subfolders in label order.
    """
    if channels is not None and channels not in _MODES:
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if resolution is not None:
        check_int("resolution", resolution)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} is not a directory (expected one subfolder per class "
                                "holding .png/.jpg/.jpeg files)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [(f, label) for label, c in enumerate(classes) for f in _images_in(root / c)]
        empty = [c for c in classes if not _images_in(root / c)]
        if empty:
            raise ValueError(f"{root}: class folders without .png/.jpg/.jpeg images: {', '.join(empty[:5])}")
    else:
        files = [(f, -1) for f in _images_in(root)]
    if not files:
        raise ValueError(f"{root} holds no .png/.jpg/.jpeg images (expected root/<class>/<image> files)")
    if channels is None:
        channels = _channels_of(files[0][0])
    arrays = [_read_image(f, resolution, channels) for f, _ in files]
    _check_sizes(arrays, files)
    images = np.stack(arrays)
    labels = np.array([label for _, label in files], dtype=np.int64) if classes else None
    ds = ArrayDataset(images, labels, len(classes) if classes else None, name=f"folder:{root.name}")
    ds.class_names = classes
    return ds


def _images_in(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _check_sizes(arrays, files) -> None:
    sizes = {}
    for a, (f, _) in zip(arrays, files):
        sizes.setdefault(a.shape[1:], f)
    if len(sizes) > 1:
        desc = ", ".join(f"{w}x{h} ({p.name})" for (h, w), p in list(sizes.items())[:3])
        raise ValueError(f"images have different sizes ({desc}); pass resolution=<int> to crop and resize them")


def _open(path: Path, Image):
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError) as e:  # pillow raises these for truncated or foreign files
        raise ValueError(f"cannot read image {path}: {e}") from e
    return img


def _channels_of(path: Path) -> int:
    from PIL import Image

    with _open(path, Image) as img:
        return 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3


def _read_image(path: Path, resolution: Optional[int], channels: int) -> np.ndarray:
    from PIL import Image

    img = _open(path, Image).convert(_MODES[channels])
    if resolution is not None:
        w, h = img.size
        s = min(w, h)  # centre crop to a square, then one Lanczos resize
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        if s != resolution:
            img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
