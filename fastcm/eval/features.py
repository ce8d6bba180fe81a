"""Feature spaces, Gaussian statistics and statistics files for the Fréchet distance between image sets.

Feature spaces: ``pixels`` (raw pixels, the held-out space no network defines), ``digits`` (the 64-d layer of the
small digits CNN trained once on the digits train split, see digits_net.py) and ``inception`` (FID's Inception-v3
pool3, 2048-d, from local weights). Statistics are (μ, Σ) in float64 with Σ the unbiased (N − 1) covariance, and are
stored pytorch-fid style: an ``.npz`` with arrays ``mu`` and ``sigma`` (plus ``features`` and ``n`` for provenance).
"""
import os
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from fastcm.eval._checks import as_images

FEATURES = ("digits", "pixels", "inception")


def digits_feature_network(cache: Optional[str] = None, retrain: bool = False):
    """The frozen digits feature CNN trained on the digits *train* split (cached); returns (net, info)."""
    from fastcm.data import load_digits
    from fastcm.eval.digits_net import feature_network

    train = load_digits("train")
    x, y = train.get_batch(torch.arange(len(train)))
    return feature_network(x, y, num_classes=10, cache=cache, retrain=retrain)


class PixelFeatures(nn.Module):
    """Raw pixels as features: (B, C, H, W) → (B, C·H·W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class DigitsFeatures(nn.Module):
    """The 64-d feature layer of the cached digits CNN; only for 1×8×8 images."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"--features digits needs 1x8x8 images in [-1, 1], got images of shape "
                             f"{tuple(x.shape[1:])}; use --features inception --weights PATH for other images")
        return self.net.features(x)


class InceptionFeatures(nn.Module):
    """FID Inception-v3 pool3 (2048-d) of images in [-1, 1]: mapped to [0, 1], grey repeated to RGB (as
    pytorch-fid does for single-channel images); the network resizes to 299×299 itself."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x + 1) / 2)


def feature_extractor(name: str, *, weights: Optional[str] = None, cache: Optional[str] = None,
                      device: str = "cpu") -> nn.Module:
    """A frozen module mapping images (B, C, H, W) in [-1, 1] to features (B, d), differentiable in its input
    (so it can also be the feature network of the FD loss)."""
    if name not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {name!r}")
    if name != "inception" and weights is not None:
        raise ValueError("--weights is only for --features inception (the digits network is trained and cached by "
                         "fastcm itself)")
    if name == "pixels":
        return PixelFeatures()
    if name == "digits":
        return DigitsFeatures(digits_feature_network(cache)[0]).to(device).eval()
    if weights is None:
        raise ValueError("--features inception needs --weights PATH: the FID Inception-v3 weights file "
                         "(pt_inception-2015-12-05-6726825d.pth, as used by pytorch-fid); fastcm downloads nothing")
    from fastcm.fid import inception_v3

    return InceptionFeatures(inception_v3(weights=weights)).to(device).eval()


def compute_features(x, extractor: Callable, batch_size: int = 500, device: str = "cpu") -> torch.Tensor:
    """Features of images ``x`` (N, C, H, W) in [-1, 1], batch by batch, without gradient; (N, d) float64."""
    x = as_images("images", x)
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(extractor(x[i:i + batch_size].to(device)).double().cpu())
    return torch.cat(out)


def gaussian_stats(features) -> tuple:
    """(μ, Σ) of features (N, d) as float64 numpy arrays; Σ is the unbiased covariance (divides by N − 1)."""
    f = torch.as_tensor(features).double()
    if f.dim() != 2:
        raise ValueError(f"features must be (N, d), got shape {tuple(f.shape)}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
    if not torch.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    mu = f.mean(0)
    c = f - mu  # centre first: the E[xxᵀ] − μμᵀ form cancels catastrophically for large means
    sigma = c.T @ c / (f.shape[0] - 1)
    return mu.numpy(), sigma.numpy()


def frechet(stats_a: tuple, stats_b: tuple) -> float:
    """Fréchet distance between two (μ, Σ) pairs, computed exactly in float64 by fastcm's Fréchet op."""
    from fastcm.ops.frechet import frechet_distance

    (mu1, s1), (mu2, s2) = stats_a, stats_b
    value = frechet_distance(torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(s1, dtype=torch.float64),
                             torch.as_tensor(mu2, dtype=torch.float64), torch.as_tensor(s2, dtype=torch.float64))
    return float(value)


def save_stats(path, mu, sigma, *, features: str, n: int) -> Path:
    """Write pytorch-fid style statistics (``mu``, ``sigma``) plus ``features`` and ``n`` to ``path`` (.npz)."""
    path = Path(path)
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=np.array(features), n=np.array(int(n)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _npz_keys(path: Path) -> set:
    try:
        with np.load(path, allow_pickle=False) as f:
            return set(f.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e})") from e


def load_stats(path) -> tuple:
    """Read a statistics ``.npz`` (``mu``, ``sigma``); returns (mu, sigma, features name or None)."""
    path = Path(path)
    keys = _npz_keys(path)
    if not {"mu", "sigma"} <= keys:
        raise ValueError(f"{path} is not a statistics file: expected arrays 'mu' and 'sigma', found {sorted(keys)}")
    with np.load(path, allow_pickle=False) as f:
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        features = str(f["features"]) if "features" in f.files else None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu/sigma contain NaN or inf")
    return mu, sigma, features


def folder_channels(root) -> int:
    """1 when the first image file under ``root`` (or its class subfolders) is greyscale, else 3."""
    from PIL import Image

    root = Path(root)
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg"):
                with Image.open(f) as im:
                    return 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    return 3


def load_images(spec: str, channels: Optional[int] = None) -> torch.Tensor:
    """Images in [-1, 1] from an image folder, an ``.npz`` with ``x``, or ``digits[:train|test|all]``.

    ``channels`` applies to folders (pillow converts each file); None keeps the first file's grey or colour."""
    from fastcm.data import load_digits, load_image_folder, load_npz

    spec = os.fspath(spec)
    if spec == "digits" or spec.startswith("digits:"):
        split = spec.partition(":")[2] or "train"
        ds = load_digits(split)
    elif Path(spec).is_dir():
        ds = load_image_folder(spec, channels=channels or folder_channels(spec))
    elif Path(spec).suffix.lower() == ".npz":
        ds = load_npz(spec)
    else:
        raise ValueError(f"{spec!r} is not an image folder, a .npz file or digits[:train|test|all]")
    x, _ = ds.get_batch(torch.arange(len(ds)))
    return x


def is_stats_file(spec) -> bool:
    path = Path(os.fspath(spec))
    return path.suffix.lower() == ".npz" and path.is_file() and {"mu", "sigma"} <= _npz_keys(path)


def stats_of(spec: str, features: str, *, weights: Optional[str] = None, cache: Optional[str] = None,
             batch_size: int = 500, device: str = "cpu") -> tuple:
    """(μ, Σ, n) of a statistics file (n = None) or of the images at ``spec`` in the ``features`` space."""
    if is_stats_file(spec):
        mu, sigma, stored = load_stats(spec)
        if stored is not None and stored != features:
            raise ValueError(f"{spec} holds {stored!r} statistics but --features {features} was asked for")
        return mu, sigma, None
    channels = {"inception": 3, "digits": 1}.get(features)  # pixels: as stored
    x = load_images(spec, channels=channels)
    extractor = feature_extractor(features, weights=weights, cache=cache, device=device)
    mu, sigma = gaussian_stats(compute_features(x, extractor, batch_size, device))
    return mu, sigma, int(x.shape[0])
