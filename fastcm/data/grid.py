"""Image grids: a batch in [-1, 1] → one uint8 picture (PNG via pillow), written atomically (fastcm._io)."""
import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from fastcm._checks import check_int
from fastcm._io import atomic_write


def make_grid(x: torch.Tensor, nrow: Optional[int] = None, padding: int = 1, scale: int = 1) -> np.ndarray:
    """Tile images ``x`` (B, C, H, W), values in [-1, 1] (clamped), into an (rows, cols, C) uint8 array.

    ``nrow`` images per row (default: ceil(sqrt(B))); ``padding`` pixels of black between cells; ``scale`` an
    integer nearest-neighbour magnification (8x8 digits are unreadable at scale 1).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty floating tensor of shape (B, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"x must have 1 or 3 channels, got {x.shape[1]}")
    if torch.isnan(x).any():
        raise ValueError("x contains NaN")
    b, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    for name, v, lo in (("nrow", nrow, 1), ("padding", padding, 0), ("scale", scale, 1)):
        check_int(name, v, lo)
    img = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if scale > 1:
        img = img.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    ncol, nrows = min(nrow, b), math.ceil(b / nrow)
    grid = torch.zeros(c, nrows * (h + padding) + padding, ncol * (w + padding) + padding, dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = img[i]
    return grid.permute(1, 2, 0).numpy()


def save_grid(x: torch.Tensor, path: Union[str, os.PathLike], nrow: Optional[int] = None, padding: int = 1,
              scale: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write ``x`` (B, C, H, W) in [-1, 1] as a PNG grid at ``path`` and return the path.

    ``scale`` defaults to enough magnification for cells of at least 32 pixels. An existing file is replaced only
    with ``overwrite=True``, and then atomically (temporary file + rename).
    """
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if scale is None and isinstance(x, torch.Tensor) and x.dim() == 4:
        scale = max(1, 32 // max(x.shape[-2:]))
    a = make_grid(x, nrow, padding, scale or 1)
    image = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), overwrite=overwrite)
