"""A small CNN classifier: the digits feature network (trained once on the train split, cached) and the CAS judge.

The feature space for the Fréchet distance on 8×8 digits is the 64-d ReLU layer of a small CNN (two 3×3 convs with 32
and 64 channels, a 2×2 max-pool, a 64-d feature layer, a linear classifier), the digits-scale stand-in for the
Inception pool3 features of FID. It is trained only on the train split (never on the test split, which it is used to
compare against) and cached as safetensors + JSON in the user cache directory, keyed by a hash of its settings and of
the training data, so every run of the demo measures in the same space.

The held-out judge (HeldOutCNN, ``arch="heldout"``) is a second digits feature network of another architecture and
seed, trained on the same split and cached the same way; the demo never trains on it, so it can judge the FD stage,
which optimises SmallCNN's space.
"""
import hashlib
import json
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastcm._checks import as_images, as_labels, check_int
from fastcm._io import atomic_write

ARCH_VERSION = 1  # bump when SmallCNN or the training recipe changes: old cache entries are then ignored
DEFAULT_SETTINGS = dict(epochs=30, batch_size=64, lr=1e-3, weight_decay=0.0, seed=0)


class _TwoConvClassifier(nn.Module):
    """The layout both digits networks share: conv(C→w1) → conv(w1→w2) with ``num_pools`` 2×2 poolings, a
    ``feature_dim`` feature layer (``features(x)``, differentiable, so it also serves as the FD-loss feature network)
    and a linear head (``forward(x)``: class logits). Inputs are images in [-1, 1]."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, feature_dim: int, widths: tuple,
                 kernel: int, num_pools: int):
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.num_pools = num_pools
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
        self.fc = nn.Linear(widths[1] * (image_size >> num_pools) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(_TwoConvClassifier):
    """conv3×3(C→32) → ReLU → conv3×3(32→64) → ReLU → 2×2 max-pool (repeated until ≤ 4×4) → 64-d ReLU → logits."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, feature_dim: int = 64):
        pools = max(1, math.ceil(math.log2(image_size / 4)))  # 8×8 → one pool → 4×4
        super().__init__(in_channels, image_size, num_classes, feature_dim, (32, 64), 3, pools)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        for _ in range(self.num_pools):
            h = F.max_pool2d(h, 2)
        return F.relu(self.fc(h.flatten(1)))


class HeldOutCNN(_TwoConvClassifier):
    """The held-out judge: conv5×5(C→16) → tanh → 2×2 average pool → conv3×3(16→32) → tanh → 2×2 average pool
    (repeated until ≤ 2×2) → 48-d tanh → logits.

    A second digits feature space that shares nothing with SmallCNN but the training split: other kernels, other
    non-linearity, average instead of max pooling, another width (48, so its statistics never pass for SmallCNN's)
    and, as fastcm trains it, another seed. A loss that optimises SmallCNN's space improves that space by
    construction (the FD-loss authors' warning about Inception FID); this network, never used in training, judges
    whether the images improved.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, feature_dim: int = 48):
        pools = max(2, math.ceil(math.log2(image_size / 2)))  # 8×8 → 4×4 → 2×2
        super().__init__(in_channels, image_size, num_classes, feature_dim, (16, 32), 5, pools)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        h = torch.tanh(self.conv2(h))
        for _ in range(self.num_pools - 1):
            h = F.avg_pool2d(h, 2)
        return torch.tanh(self.fc(h.flatten(1)))


ARCHS = {"small": SmallCNN, "heldout": HeldOutCNN}


@contextmanager
def _threads(n: int):
    """Run the block with at most ``n`` torch CPU threads (restored afterwards)."""
    old = torch.get_num_threads()
    if n < old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_classifier(x, y, *, num_classes: int = 10, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3,
                     weight_decay: float = 0.0, seed: int = 0, steps: Optional[int] = None,
                     arch: str = "small") -> nn.Module:
    """Train a fresh network of ``arch`` (ARCHS: "small" = SmallCNN, "heldout" = HeldOutCNN) with Adam on images ``x`` (N, C, H, W) in [-1, 1] and labels ``y``; deterministic
    for a given ``seed`` on CPU. Returns the network in eval mode.

    ``steps`` (optional) trains exactly that many minibatch steps instead of ``epochs`` passes (reshuffling at each
    pass), so classifiers trained on sets of different sizes can get the same compute.

    Images of at most 16x16 train on one CPU thread: each step is a few hundred microseconds of work, so a second
    OpenMP thread gains little and, on a busy machine, its barrier waits made training 20x slower (measured).
    """
    x = as_images("x", x, min_count=2)
    y = as_labels("y", y, x.shape[0], num_classes)
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"x must hold square images, got shape {tuple(x.shape)}")
    epochs = check_int("epochs", epochs)
    batch_size = check_int("batch_size", batch_size)
    per_epoch = -(-x.shape[0] // batch_size)
    steps = epochs * per_epoch if steps is None else check_int("steps", steps)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    small = x.shape[2] <= 16 and x.device.type == "cpu"
    with torch.random.fork_rng(devices=[]), _threads(1 if small else torch.get_num_threads()):
        # own RNG stream: the caller's global RNG state is left untouched
        torch.manual_seed(seed)
        net = ARCHS[arch](x.shape[1], x.shape[2], num_classes)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(x.shape[0], generator=gen)
            idx = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, x, batch_size: int = 1000) -> torch.Tensor:
    """Class predictions (N,) int64 of ``net`` for images ``x``."""
    x = as_images("x", x)
    net.eval()
    return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def accuracy(net: nn.Module, x, y) -> float:
    """Top-1 accuracy of ``net`` on images ``x`` with labels ``y``."""
    x = as_images("x", x)
    y = as_labels("y", y, x.shape[0])
    return float((predict(net, x) == y).double().mean())


def cache_dir(path: Optional[str] = None) -> Path:
    """Where fastcm caches trained helper networks: ``path``, else $FASTCM_CACHE, else $XDG_CACHE_HOME/fastcm,
    else ~/.cache/fastcm."""
    if path:
        return Path(path).expanduser()
    if os.environ.get("FASTCM_CACHE"):
        return Path(os.environ["FASTCM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastcm"


def _cache_key(x: torch.Tensor, y: torch.Tensor, num_classes: int, settings: dict, arch: str = "small") -> str:
    h = hashlib.sha256()
    named = {} if arch == "small" else {"net": arch}  # SmallCNN's keys predate the held-out network
    h.update(json.dumps(dict(settings, arch=ARCH_VERSION, num_classes=num_classes, **named), sort_keys=True).encode())
    h.update(str(tuple(x.shape)).encode())
    h.update(x.numpy().astype(np.float32).tobytes())
    h.update(y.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:20]


def _load_cached(weights: Path, meta_path: Path, key: str) -> Optional[nn.Module]:
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            raise ValueError("the cache entry's key does not match its name")
        net = ARCHS[meta.get("net_arch", "small")](*meta["net"])
        net.load_state_dict(load_file(str(weights)))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        warnings.warn(f"ignoring the unreadable cached feature network {weights} ({err}); retraining it")
        return None
    return net.eval()


def _atomic_save(net: nn.Module, weights: Path, meta_path: Path, meta: dict) -> None:
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    text = json.dumps(meta, indent=1)
    # weights first: a reader finds the JSON only when the weights beside it are whole
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    atomic_write(meta_path, lambda tmp: tmp.write_text(text))


def feature_network(x_train, y_train, *, num_classes: int = 10, cache: Optional[str] = None, retrain: bool = False,
                    arch: str = "small", **settings) -> tuple:
    """The frozen feature/classifier network for a dataset's train split, trained once and cached.

    Returns ``(net, info)``: ``net`` a network of ``arch`` (ARCHS) in eval mode with ``requires_grad`` off (gradients still flow to
    its *inputs*, as the FD loss needs); ``info`` a dict with the cache path, whether it was loaded from the cache,
    the settings and the train accuracy. Pass only the train split: this network defines the space in which samples
    are compared with the test split.
    """
    unknown = set(settings) - set(DEFAULT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown training setting(s) {sorted(unknown)}; expected some of {sorted(DEFAULT_SETTINGS)}")
    settings = dict(DEFAULT_SETTINGS, **settings)
    x = as_images("x_train", x_train, min_count=2)
    y = as_labels("y_train", y_train, x.shape[0], num_classes)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    key = _cache_key(x, y, num_classes, settings, arch)
    root = cache_dir(cache)
    weights, meta_path = root / f"feature-net-{key}.safetensors", root / f"feature-net-{key}.json"
    net = None
    if not retrain and weights.is_file() and meta_path.is_file():
        net = _load_cached(weights, meta_path, key)
    cached = net is not None
    if net is None:
        net = train_classifier(x, y, num_classes=num_classes, arch=arch, **settings)
        meta = dict(key=key, net=[x.shape[1], x.shape[2], num_classes], net_arch=arch, settings=settings,
                    arch=ARCH_VERSION,
                    train_size=int(x.shape[0]), train_accuracy=accuracy(net, x, y), torch=torch.__version__)
        _atomic_save(net, weights, meta_path, meta)
    for p in net.parameters():
        p.requires_grad_(False)
    info = dict(path=str(weights), cached=cached, key=key, settings=settings,
                train_accuracy=json.loads(meta_path.read_text())["train_accuracy"])
    return net, info
