"""Streaming Gaussian statistics of feature vectors (the inputs of the Frechet distance), in fp64.

FeatureStats keeps n, S1 = sum (x - c) and S2 = sum (x - c)(x - c)^T about a shift c (the mean of the first batch):

    mu = c + S1 / n,        sigma = (S2 - S1 S1^T / n) / (n - 1)      (unbiased, as np.cov / pytorch-fid)

Shifting first avoids the catastrophic cancellation of the E[x x^T] - mu mu^T form when features have a large mean
(Chan, Golub & LeVeque 1983); the sums stay exact to merge (stats of a concatenation) and to all-reduce across
processes. Files use pytorch-fid's ``.npz`` layout (arrays ``mu`` and ``sigma``, plus ``n`` and the name of the
feature space, ``features``) or safetensors with a SHA-256 (stats_file.py: format, checks, size bound); FeatureStats
is fastcm's only reader and writer of statistics files.
"""
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from fastcm._checks import check_int
from fastcm.ops.frechet import check_gaussian

from .stats_file import MAX_STATS_BYTES, SUFFIXES, check_suffix, is_stats_file, read_stats, write_stats

F64 = torch.float64
__all__ = ["FeatureStats", "MAX_STATS_BYTES", "SUFFIXES", "is_stats_file"]


class FeatureStats:
    """Running fp64 mean and covariance of (B, dim) feature batches.

    >>> stats = FeatureStats(2048)
    >>> for images in loader: stats.update(inception(images))
    >>> stats.save("cifar10-train.npz"); fd = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    """

    def __init__(self, dim: int, device: Union[str, torch.device, None] = None, features: Optional[str] = None):
        self.dim = check_int("dim", dim)
        if features is not None and not isinstance(features, str):
            raise TypeError(f"features must be the feature space's name (a str) or None, got {type(features).__name__}")
        self.features = features  # the feature space's name ("digits", "pixels", "inception"), kept in files
        self.device = torch.device(device) if device is not None else None
        self._n: Optional[int] = 0
        self._shift = self._s1 = self._s2 = None   # set by the first update (or by load)
        self._frozen = None                        # (mu, sigma) of a file without a sample count

    # -- accumulation ------------------------------------------------------------------------------------------
    def update(self, features: Tensor) -> "FeatureStats":
        """Add a batch of features (B, dim) (any floating dtype and device; no gradient is kept)."""
        self._check_mutable("update")
        x = _checked_features(features, self.dim).to(device=self._device_for(features), dtype=F64)
        if self._shift is None:
            self._init_sums(x.mean(0))
        xc = x - self._shift
        self._s1 += xc.sum(0)
        self._s2 += xc.T @ xc
        self._n += x.shape[0]
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another FeatureStats' samples (in place): the result equals the stats of the concatenation."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"other must be a FeatureStats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"other has dim {other.dim}, expected {self.dim}")
        self._check_mutable("merge")
        other._check_mutable("be merged")
        if other._n == 0:
            return self
        device = self._device_for(other._shift)
        shift, s1, s2 = (t.to(device) for t in (other._shift, other._s1, other._s2))
        if self._shift is None:
            self._init_sums(shift.clone())
        s1, s2 = _reshift(other._n, shift, s1, s2, self._shift)
        self._s1 += s1
        self._s2 += s2
        self._n += other._n
        return self

    def all_reduce(self, group=None) -> "FeatureStats":
        """Sum the statistics of all processes of ``group`` (torch.distributed, any backend) in fp64, in place.

        Every rank first re-centres its sums on the global mean (one small all-reduce of n and sum x), then the
        (dim, dim) sums are added: the result equals the statistics of all ranks' features together."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs an initialized torch.distributed process group")
        self._check_mutable("all_reduce")
        device = _comm_device(group, self._shift)
        if self._shift is None:
            self._init_sums(torch.zeros(self.dim, dtype=F64, device=self.device or device))
        head = torch.cat([torch.tensor([float(self._n)], dtype=F64), (self._n * self._shift + self._s1).cpu()])
        head = head.to(device)
        dist.all_reduce(head, group=group)
        n_total = int(round(head[0].item()))
        if n_total == 0:
            return self
        mean = head[1:] / n_total
        s1, s2 = _reshift(self._n, self._shift.to(device), self._s1.to(device), self._s2.to(device), mean)
        sums = torch.cat([s1, s2.reshape(-1)])
        dist.all_reduce(sums, group=group)
        home = self._shift.device
        self._shift, self._n = mean.to(home), n_total
        self._s1, self._s2 = sums[: self.dim].to(home), sums[self.dim:].reshape(self.dim, self.dim).to(home)
        return self

    # -- results -----------------------------------------------------------------------------------------------
    @property
    def n(self) -> Optional[int]:
        """Number of samples (None for statistics loaded from a file without a count)."""
        return self._n

    @property
    def mu(self) -> Tensor:
        """Mean, fp64 (dim,)."""
        if self._frozen is not None:
            return self._frozen[0]
        if not self._n:
            raise ValueError("FeatureStats is empty: call update() with features first")
        return self._shift + self._s1 / self._n

    @property
    def sigma(self) -> Tensor:
        """Unbiased covariance (divides by n - 1), fp64 (dim, dim), exactly symmetric."""
        if self._frozen is not None:
            return self._frozen[1]
        if self._n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got n={self._n}")
        s = (self._s2 - torch.outer(self._s1, self._s1) / self._n) / (self._n - 1)
        return (s + s.T) * 0.5

    # -- files (format, checks and bounds: stats_file.py) -------------------------------------------------------
    def save(self, path, overwrite: bool = False) -> Path:
        """Write ``mu``, ``sigma``, ``n`` (and ``features``) to ``path`` (.npz, pytorch-fid's layout, or
        .safetensors with a SHA-256), atomically (fastcm._io.atomic_write). An existing file is never replaced
        unless ``overwrite=True``."""
        check_suffix(path)
        return write_stats(path, self.mu.cpu().numpy(), self.sigma.cpu().numpy(), self._n, self.features,
                           overwrite=overwrite)

    @classmethod
    def load(cls, path, device=None, max_bytes: Optional[int] = None) -> "FeatureStats":
        """Read statistics written by :meth:`save`, by pytorch-fid (``--save-stats``) or any ``.npz`` with ``mu``
        and ``sigma``. Without ``n`` the statistics can be compared but not updated or merged. Files whose arrays
        declare more than ``max_bytes`` (default MAX_STATS_BYTES, 512 MiB) are refused before they are read."""
        mu, sigma, n, features = read_stats(path, max_bytes)
        try:
            return cls.from_moments(mu, sigma, n=n, device=device, features=features)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def from_moments(cls, mu, sigma, n: Optional[int] = None, device=None,
                     features: Optional[str] = None) -> "FeatureStats":
        """Statistics with a given mean and covariance; with the sample count ``n`` they can be merged and
        updated (the sums are rebuilt as S1 = 0, S2 = (n - 1) sigma about c = mu). sigma must be symmetric to
        rounding (an asymmetric matrix is rejected, not symmetrised)."""
        mu, sigma = check_gaussian(mu, sigma)
        mu, sigma = mu.to(device) if device is not None else mu, sigma.to(device) if device is not None else sigma
        stats = cls(mu.numel(), device=device, features=features)
        if n is None:
            stats._n, stats._frozen = None, (mu, (sigma + sigma.T) * 0.5)
            return stats
        n = check_int("n (samples behind the covariance)", n, 2)
        stats._shift, stats._s1, stats._s2, stats._n = mu, torch.zeros_like(mu), sigma * (n - 1), n
        return stats

    @classmethod
    def from_features(cls, features: Tensor, name: Optional[str] = None) -> "FeatureStats":
        """Statistics of one (N, d) batch of features (``name``: the feature space, kept in files)."""
        return cls(_checked_features(features, None).shape[1], features=name).update(features)

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, n={self._n}, features={self.features!r})"

    # -- helpers -----------------------------------------------------------------------------------------------
    def _init_sums(self, shift: Tensor) -> None:
        self._shift = shift
        self._s1 = torch.zeros_like(shift)
        self._s2 = torch.zeros(self.dim, self.dim, dtype=F64, device=shift.device)

    def _device_for(self, x: Optional[Tensor]) -> torch.device:
        if self._shift is not None:
            return self._shift.device
        if self.device is not None:
            return self.device
        return x.device if isinstance(x, Tensor) else torch.device("cpu")

    def _check_mutable(self, what: str) -> None:
        if self._n is None:
            raise ValueError(f"these statistics were loaded without a sample count 'n', so they cannot {what}; "
                             "they can still be compared with frechet_distance")


def _checked_features(features, dim: Optional[int]) -> Tensor:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must have a floating dtype, got {str(features.dtype).replace('torch.', '')}")
    if features.dim() != 2 or (dim is not None and features.shape[1] != dim):
        want = f"(B, {dim})" if dim is not None else "(B, d)"
        raise ValueError(f"features must have shape {want}, got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("features is an empty batch")
    bad = ~torch.isfinite(features.detach()).all(1)
    if bool(bad.any()):
        raise ValueError(f"features contain NaN or inf in {int(bad.sum())} of {features.shape[0]} rows")
    return features.detach()


def _reshift(n: int, shift: Tensor, s1: Tensor, s2: Tensor, new_shift: Tensor):
    """Sums about ``shift`` -> sums about ``new_shift``: with delta = shift - new_shift,
    S1' = S1 + n delta,  S2' = S2 + S1 delta^T + delta S1^T + n delta delta^T."""
    delta = shift - new_shift
    outer = torch.outer(s1, delta)
    return s1 + n * delta, s2 + outer + outer.T + n * torch.outer(delta, delta)


def _comm_device(group, shift: Optional[Tensor]) -> torch.device:
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return shift.device if shift is not None else torch.device("cpu")
