"""FID in one call: images, features, FeatureStats or statistics files on either side.

    fid(images_a, "cifar10-train.npz", features=inception_v3(weights_path))

Images are (N, 3, H, W) float in [0, 1] or uint8 in [0, 255] (tensors, or an iterable of such batches); features
are computed batch by batch without gradient, accumulated in fp64 (FeatureStats) and compared with the exact
fp64 Frechet distance.
"""
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from fastcm.ops.frechet import frechet_distance

from .stats import FeatureStats

Source = Union[Tensor, FeatureStats, str, Path, tuple, Iterable]


def fid(a: Source, b: Source, features: Optional[Callable] = None, batch_size: int = 50, device=None) -> float:
    """Frechet distance between two sources, each one of: images (N, C, H, W) (float in [0, 1] or uint8) or an
    iterable of image batches; features (N, d); a FeatureStats; a path to a ``.npz`` / ``.safetensors``
    statistics file; or a (mu, sigma) pair. ``features`` maps image batches to (B, d) features; it defaults to
    :func:`fastcm.fid.inception_v3` (weights from FASTCM_INCEPTION_WEIGHTS), built only if images are given."""
    cache = {}

    def net():
        if "net" not in cache:
            if features is None:
                from .inception import inception_v3

                cache["net"] = inception_v3()
            else:
                cache["net"] = features
        return cache["net"]

    sa = as_stats(a, net, batch_size, device, "a")
    sb = as_stats(b, net, batch_size, device, "b")
    if sa.dim != sb.dim:
        raise ValueError(f"a and b have different feature widths ({sa.dim} vs {sb.dim})")
    return float(frechet_distance(sa.mu, sa.sigma, sb.mu.to(sa.mu.device), sb.sigma.to(sa.mu.device)))


def compute_stats(images, features: Callable, batch_size: int = 50, device=None) -> FeatureStats:
    """FeatureStats of ``features(batch)`` over images (a tensor, split into ``batch_size`` batches, or an
    iterable of batches), without gradient."""
    if not callable(features):
        raise TypeError(f"features must be callable (images -> (B, d) features), got {type(features).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = device if device is not None else _module_device(features)
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    stats = None
    with torch.no_grad():
        for batch in batches:
            x = _as_images(batch)
            f = features(x.to(device) if device is not None else x)
            if not isinstance(f, Tensor) or f.dim() != 2:
                raise ValueError(f"features must return (B, d) tensors, got {getattr(f, 'shape', type(f))}")
            if stats is None:
                stats = FeatureStats(f.shape[1])
            stats.update(f)
    if stats is None:
        raise ValueError("no images were given")
    return stats


def as_stats(x: Source, features: Callable[[], Callable], batch_size: int, device, name: str) -> FeatureStats:
    """Turn one ``fid`` source into FeatureStats (``features`` is a thunk returning the feature network)."""
    if isinstance(x, FeatureStats):
        return x
    if isinstance(x, (str, Path)):
        return FeatureStats.load(x)
    if isinstance(x, tuple) and len(x) == 2:
        return FeatureStats.from_moments(*x)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if isinstance(x, Tensor) and x.dim() == 2:
        return FeatureStats.from_features(x)
    if isinstance(x, Tensor) and x.dim() != 4:
        raise ValueError(f"{name} must be images (N, C, H, W) or features (N, d), got shape {tuple(x.shape)}")
    if not isinstance(x, (Tensor, Iterable)):
        raise TypeError(f"{name} must be images, features, FeatureStats, a statistics file or (mu, sigma); "
                        f"got {type(x).__name__}")
    return compute_stats(x, features(), batch_size, device)


def _as_images(x) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"image batches must be (N, C, H, W) tensors, got {getattr(x, 'shape', type(x))}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating, got {x.dtype}")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                         "(map [-1, 1] images with (x + 1) / 2)")
    return x


def _module_device(f) -> Optional[torch.device]:
    if isinstance(f, nn.Module):
        p = next(f.parameters(), None)
        return p.device if p is not None else None
    return None
