"""An image folder: one subfolder per class holding PNG/JPEG files (read with pillow), or images directly in the
root for an unlabelled set (never both: root images beside class folders are refused, not dropped). Classes are the
subfolder names in sorted order; images are loaded into memory as uint8.

Pixel values are scaled, never clipped: 16-bit grey PNGs (pillow's "I;16" modes) map 0..65535 to 0..255 by
round(v / 257) (exact for 8-bit values stored as 16 bits); pillow itself keeps the high byte of 16-bit colour PNGs.
The channel count is the caller's (``channels=1`` or ``3``) or, with ``channels=None``, the majority of the files'
(grey vs colour; a tie goes to colour, which loses nothing); files of the other kind are converted with a one-line
note that gives the counts, and so are alpha channels that are dropped.
"""
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import numpy as np

from fastcm._checks import check_int, note

from .arrays import ArrayDataset

EXTENSIONS = (".png", ".jpg", ".jpeg")
OTHER_IMAGES = (".bmp", ".gif", ".tif", ".tiff", ".webp")  # pillow reads them, fastcm does not: reported, not read
_MODES = {1: "L", 3: "RGB"}
_GREY = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}
_WIDE = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # more than 8 bits per pixel


def load_image_folder(root: Union[str, os.PathLike], resolution: Optional[int] = None,
                      channels: Optional[int] = 3) -> ArrayDataset:
    """Load ``root``/<class>/*.{png,jpg,jpeg} (or ``root``/*.png … unlabelled) as (channels, H, W) uint8 images.

    Args:
        resolution: when given, each image is centre-cropped to a square and resized to resolution x resolution;
            when None every image must already have the same size.
        channels: 3 (RGB) or 1 (grey): every file is converted to it. None: the majority of the files' kinds
            (module docstring), with a note giving the counts when some files are converted.
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
    files, classes = _list_files(root)
    modes = [_mode_of(f) for f, _ in files]
    channels = _choose_channels(root, modes, channels)
    arrays = [_read_image(f, resolution, channels) for f, _ in files]
    _check_sizes(arrays, files)
    images = np.stack(arrays)
    labels = np.array([label for _, label in files], dtype=np.int64) if classes else None
    ds = ArrayDataset(images, labels, len(classes) if classes else None, name=f"folder:{root.name}")
    ds.class_names = classes
    return ds


def _list_files(root: Path):
    """([(file, label)], class names): one subfolder per class, or images in the root (-1 labels), never both."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = _images_in(root)
    if classes and loose:
        raise ValueError(f"{root} holds both images ({len(loose)}, e.g. {loose[0].name}) and class subfolders "
                         f"({', '.join(classes[:3])}{' …' if len(classes) > 3 else ''}): move every image into a "
                         "class subfolder, or the subfolders out, for an unlabelled set")
    folders = [root / c for c in classes] or [root]
    for folder in folders:
        nested = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if classes and nested:
            raise ValueError(f"class folder {folder} holds subfolders ({', '.join(sorted(nested)[:3])}); classes "
                             "are one level deep: move their images up or out")
    others = [p for folder in folders for p in folder.iterdir() if p.is_file() and p.suffix.lower() in OTHER_IMAGES]
    if others:
        note(f"{root}: skipped {len(others)} image file(s) in formats other than .png/.jpg/.jpeg (e.g. "
             f"{others[0].name}); convert them to PNG to include them")
    if classes:
        empty = [c for c in classes if not _images_in(root / c)]
        if empty:
            raise ValueError(f"{root}: class folders without .png/.jpg/.jpeg images: {', '.join(empty[:5])}")
        files = [(f, label) for label, c in enumerate(classes) for f in _images_in(root / c)]
    else:
        files = [(f, -1) for f in loose]
    if not files:
        raise ValueError(f"{root} holds no .png/.jpg/.jpeg images (expected root/<class>/<image> files)")
    return files, classes


def _images_in(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _choose_channels(root: Path, modes, channels: Optional[int]) -> int:
    """The caller's channel count, or the files' majority (a note gives the counts of what gets converted)."""
    grey = sum(m in _GREY for m in modes)
    colour = len(modes) - grey
    alpha = sum(m in _ALPHA for m in modes)
    chosen = channels if channels is not None else (1 if grey > colour else 3)
    if channels is None and grey and colour:
        kind, other = ("grey", "colour") if chosen == 1 else ("colour", "grey")
        note(f"{root}: {grey} grey and {colour} colour images; converting the {min(grey, colour)} {other} one(s) "
             f"to {kind} ({_MODES[chosen]}, the majority); pass channels=1 or 3 to choose")
    if alpha:
        found = Counter(m for m in modes if m in _ALPHA)
        counts = ", ".join(f"{n} {m}" for m, n in found.items())
        note(f"{root}: dropping the alpha channel of {alpha} image(s) ({counts})")
    return chosen


def _check_sizes(arrays, files) -> None:
    sizes = {}
    for a, (f, _) in zip(arrays, files):
        sizes.setdefault(a.shape[1:], f)
    if len(sizes) > 1:
        desc = ", ".join(f"{w}x{h} ({p.name})" for (h, w), p in list(sizes.items())[:3])
        raise ValueError(f"images have different sizes ({desc}); pass resolution=<int> to crop and resize them")


def _open(path: Path):
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated or foreign files
        raise ValueError(f"cannot read image {path}: {e}") from e
    return img


def _mode_of(path: Path) -> str:
    """The pillow mode of a file, from its header only (pillow opens lazily)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _to_8bit(path: Path, img):
    """``img`` with at most 8 bits per channel: 16-bit grey scaled by round(v / 257), never clipped."""
    from PIL import Image

    if img.mode == "F":
        raise ValueError(f"cannot read image {path}: floating-point pixels (mode F) have no defined range")
    if img.mode not in _WIDE:
        return img
    a = np.asarray(img).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError(f"cannot read image {path}: its {img.mode} pixels lie in [{a.min()}, {a.max()}], outside "
                         "the 16-bit range 0..65535")
    return Image.fromarray(((a + 128) // 257).astype(np.uint8), mode="L")


def _read_image(path: Path, resolution: Optional[int], channels: int) -> np.ndarray:
    from PIL import Image

    img = _to_8bit(path, _open(path)).convert(_MODES[channels])
    if resolution is not None:
        w, h = img.size
        s = min(w, h)  # centre crop to a square, then one Lanczos resize
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        if s != resolution:
            img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
