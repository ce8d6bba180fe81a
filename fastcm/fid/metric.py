"""FID in one call: images, datasets, features, FeatureStats or statistics files on either side.

    fid(sample(model, 1000, labels), "cifar10:data/cifar-10-batches-py:test", features=inception_v3(weights))

Images are (N, C, H, W) in the sampler's range [-1, 1] (``image_range=(0, 1)`` for [0, 1] floats; uint8 is always
0..255), as tensors, iterables of batches or datasets; a string is a statistics file or a dataset in fastcm.data's
grammar (``digits[:train|test|all]``, ``cifar10:DIR[:train|test]``, ``folder:DIR``, ``FILE.npz``). Features are
computed batch by batch without gradient, accumulated in fp64 (FeatureStats) and compared with the exact fp64
Fréchet distance (fastcm.ops.frechet_distance).
"""
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from fastcm._checks import check_int
from fastcm.ops import frechet_distance
from fastcm.ops.frechet import FrechetOverflowError

from .stats import FeatureStats, is_stats_file

Source = Union[Tensor, FeatureStats, str, Path, tuple, Iterable]
IMAGE_RANGES = ((-1, 1), (0, 1))


def fid(a: Source, b: Source, features: Optional[Callable] = None, batch_size: int = 50, device=None,
        image_range: tuple = (-1, 1)) -> float:
    """Fréchet distance between two sources, each one of: images (N, C, H, W) (float in ``image_range``, [-1, 1]
    by default as fastcm.cm.sample returns them, or uint8 0..255), an iterable of image batches or a dataset
    (fastcm.data.ArrayDataset); a dataset string (fastcm.data grammar); features (N, d); a FeatureStats; a path to
    a ``.npz`` / ``.safetensors`` statistics file; or a (mu, sigma) pair. ``features`` maps [-1, 1] image batches to
    (B, d) features; it defaults to :func:`fastcm.fid.inception_v3` (weights from FASTCM_INCEPTION_WEIGHTS), built
    only if images are given."""
    cache = {}

    def net():
        if "net" not in cache:
            if features is None:
                from .inception import inception_v3

                cache["net"] = inception_v3()
            else:
                cache["net"] = features
        return cache["net"]

    sa = as_stats(a, net, batch_size, device, "a", image_range)
    sb = as_stats(b, net, batch_size, device, "b", image_range)
    return stats_distance(sa, sb, (_label("a", a), _label("b", b)))


def stats_distance(sa: FeatureStats, sb: FeatureStats, labels=("a", "b")) -> float:
    """The Fréchet distance of two FeatureStats (what :func:`fid` and `fastcm fid` report), refusing in one line
    statistics of different widths or of different named feature spaces (``FeatureStats.features``: "digits" vs
    "pixels" …), and a result that is not finite (statistics that overflow float64), naming the culprit by its
    label."""
    for s, label in zip((sa, sb), labels):
        if not isinstance(s, FeatureStats):
            raise TypeError(f"{label} must be a FeatureStats, got {type(s).__name__}")
    if sa.dim != sb.dim:
        raise ValueError(f"{labels[0]} and {labels[1]} have different feature widths ({sa.dim} vs {sb.dim}): "
                         "compare statistics computed with the same feature network")
    if sa.features is not None and sb.features is not None and sa.features != sb.features:
        raise ValueError(f"{labels[0]} holds {sa.features!r} statistics but {labels[1]} holds {sb.features!r} "
                         "statistics: distances between two feature spaces mean nothing; compute both in one")
    try:
        value = float(frechet_distance(sa.mu, sa.sigma, sb.mu.to(sa.mu.device), sb.sigma.to(sa.mu.device)))
    except FrechetOverflowError:
        value = math.inf  # named below: which statistics overflow is what the user can act on
    if not math.isfinite(value):
        raise ValueError(_not_finite(value, (sa, sb), labels))
    return value


def _label(name: str, source) -> str:
    return f"{name} ({os.fspath(source)!r})" if isinstance(source, (str, os.PathLike)) else name


def _not_finite(value: float, stats, labels) -> str:
    """Which statistics make the distance overflow: those whose own ||mu||^2 or tr(sigma) is not finite in fp64
    (both when neither is, as when only their difference overflows)."""
    sizes = []
    for s in stats:
        mu, var = s.mu.abs().max().item(), s.sigma.diagonal().max().item()
        own = float((s.mu.square().sum() + s.sigma.diagonal().sum()).item())
        sizes.append((mu, var, not math.isfinite(own)))
    culprits = [i for i, (_, _, bad) in enumerate(sizes) if bad] or [0, 1]
    what = "; ".join(f"{labels[i]}: |mu| up to {sizes[i][0]:.3g}, variances up to {sizes[i][1]:.3g}"
                     for i in culprits)
    return (f"the Fréchet distance of {labels[0]} and {labels[1]} is {value} (not finite): the statistics of "
            f"{' and '.join(labels[i] for i in culprits)} overflow float64 ({what}); they are damaged or in the "
            "wrong units")


def compute_stats(images, features: Callable, batch_size: int = 50, device=None, image_range: tuple = (-1, 1),
                  name: Optional[str] = None, distributed: bool = False) -> FeatureStats:
    """FeatureStats of ``features(batch)`` over images (a tensor, split into ``batch_size`` batches; a dataset with
    ``get_batch``; or an iterable of batches), without gradient and with a feature module in eval mode (its mode is
    restored after). ``name`` labels the feature space in files.

    ``distributed=True`` under an initialized torch.distributed group: each rank reads a disjoint shard (items
    rank, rank + W, ...) of a tensor or dataset and the fp64 sums are all-reduced, so every rank returns the
    statistics of all images (a rank with an empty shard still joins). Without a group of more than one process
    it is the single-process computation."""
    if not callable(features):
        raise TypeError(f"features must be callable (images -> (B, d) features), got {type(features).__name__}")
    batch_size = check_int("batch_size", batch_size)
    _check_range(image_range)
    rank, world = _world() if distributed else (0, 1)
    if world > 1:
        images = _shard(images, rank, world)
    device = device if device is not None else _module_device(features)
    training = isinstance(features, nn.Module) and features.training
    if training:
        features.eval()
    try:
        stats = _accumulate(_batches(images, batch_size), features, device, image_range, name)
        if world > 1:
            if stats is None:  # an empty shard: the width from one image of the whole set
                stats = FeatureStats(_probe_dim(features, images, device, image_range), features=name)
            stats = stats.all_reduce()
    finally:
        if training:
            features.train()
    if stats is None or stats.n == 0:
        raise ValueError("no images were given")
    return stats


def _accumulate(batches, features, device, image_range, name) -> Optional[FeatureStats]:
    stats = None
    with torch.no_grad():
        for batch in batches:
            x = _as_images(batch, image_range)
            f = features(x.to(device) if device is not None else x)
            if not isinstance(f, Tensor) or f.dim() != 2:
                raise ValueError(f"features must return (B, d) tensors, got {getattr(f, 'shape', type(f))}")
            if stats is None:
                stats = FeatureStats(f.shape[1], features=name)
            stats.update(f)
    return stats


def _world() -> tuple:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Shard:
    """Items rank, rank + world, ... of a tensor or of a dataset with ``get_batch`` (read batch by batch)."""

    def __init__(self, images, rank: int, world: int):
        self.images, self.index = images, torch.arange(rank, len(images), world)
        self.whole = images  # for the width probe of an empty shard

    def __len__(self):
        return len(self.index)

    def get_batch(self, index: Tensor):
        if isinstance(self.images, Tensor):
            return (self.images[self.index[index]],)
        return self.images.get_batch(self.index[index])


def _shard(images, rank: int, world: int) -> _Shard:
    if not (isinstance(images, Tensor) or hasattr(images, "get_batch")):
        raise TypeError("distributed=True shards a tensor or a dataset with get_batch; got an iterable of "
                        f"{type(images).__name__}: give each rank its own batches and all_reduce the FeatureStats")
    return _Shard(images, rank, world)


@torch.no_grad()
def _probe_dim(features, shard: _Shard, device, image_range) -> int:
    whole = shard.whole
    first = whole[:1] if isinstance(whole, Tensor) else whole.get_batch(torch.tensor([0]))[0]
    x = _as_images(first, image_range)
    return int(features(x.to(device) if device is not None else x).shape[1])


def dataset_stats(spec, features: str = "digits", *, weights=None, cache=None, batch_size: Optional[int] = None,
                  device="cpu", split: str = "train") -> FeatureStats:
    """FeatureStats of a statistics file (which must hold ``features`` statistics when it names its space), or of
    the images of a dataset string (fastcm.data grammar; ``split`` when it names none) in the feature space
    ``features`` ("digits", "pixels" or "inception"; ``weights`` is Inception's weight file)."""
    from .features import FEATURES, feature_extractor

    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if is_stats_file(spec):
        stats = FeatureStats.load(spec)
        if stats.features is not None and stats.features != features:
            raise ValueError(f"{spec} holds {stats.features!r} statistics but {features!r} features were asked for")
        return stats
    from fastcm.data import load_dataset

    data = load_dataset(spec, split)
    net = feature_extractor(features, weights=weights, cache=cache, device=device)
    batch_size = batch_size or (50 if features == "inception" else 500)
    return compute_stats(data, net, batch_size, device, name=features)


def as_stats(x: Source, features: Callable[[], Callable], batch_size: int, device, name: str,
             image_range: tuple = (-1, 1)) -> FeatureStats:
    """Turn one ``fid`` source into FeatureStats (``features`` is a thunk returning the feature network)."""
    if isinstance(x, FeatureStats):
        return x
    if isinstance(x, (str, Path)):
        if is_stats_file(x) or Path(x).suffix == ".safetensors":
            return FeatureStats.load(x)
        from fastcm.data import load_dataset

        x = load_dataset(x)
    if isinstance(x, tuple) and len(x) == 2:
        return FeatureStats.from_moments(*x)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if isinstance(x, Tensor) and x.dim() == 2:
        return FeatureStats.from_features(x)
    if isinstance(x, Tensor) and x.dim() != 4:
        raise ValueError(f"{name} must be images (N, C, H, W) or features (N, d), got shape {tuple(x.shape)}")
    if not isinstance(x, (Tensor, Iterable)) and not hasattr(x, "get_batch"):
        raise TypeError(f"{name} must be images, a dataset, features, FeatureStats, a statistics file or "
                        f"(mu, sigma); got {type(x).__name__}")
    from .features import feature_space_of

    net = features()
    return compute_stats(x, net, batch_size, device, image_range, name=feature_space_of(net))


def _batches(images, batch_size: int):
    if isinstance(images, Tensor):
        return images.split(batch_size)
    if hasattr(images, "get_batch"):  # fastcm.data.ArrayDataset: converted to float one batch at a time
        n = len(images)
        return (images.get_batch(torch.arange(i, min(i + batch_size, n)))[0] for i in range(0, n, batch_size))
    return images


def _check_range(image_range) -> None:
    if tuple(image_range) not in IMAGE_RANGES:
        raise ValueError(f"image_range must be one of {IMAGE_RANGES} (uint8 images are always 0..255), "
                         f"got {image_range!r}")


def _as_images(x, image_range) -> Tensor:
    """A batch as floats in [-1, 1] (what every extractor takes), from uint8 0..255 or floats in image_range."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"image batches must be (N, C, H, W) tensors, got {getattr(x, 'shape', type(x))}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating, got {x.dtype}")
    lo, hi = x.min().item(), x.max().item()
    if not (lo >= image_range[0] - 1e-3 and hi <= image_range[1] + 1e-3):  # also catches NaN
        hint = "pass image_range=(0, 1) for [0, 1] images" if image_range == (-1, 1) else \
            "[-1, 1] images need image_range=(-1, 1)"
        raise ValueError(f"float images must be in {list(image_range)}, got values in [{lo:.3g}, {hi:.3g}] ({hint})")
    return x if tuple(image_range) == (-1, 1) else x * 2.0 - 1.0


def _module_device(f) -> Optional[torch.device]:
    if isinstance(f, nn.Module):
        p = next(f.parameters(), None)
        return p.device if p is not None else None
    return None
