"""Feature extractors for the Fréchet distance: images (B, C, H, W) in [-1, 1] (the sampler's range) -> (B, d).

    pixels      raw pixels, C·H·W values (the held-out space no network defines)
    digits      the 64-d layer of the small digits CNN (digits_net.py), trained once on the digits *train* split and
                cached; 1x8x8 images only
    digits-heldout  the 48-d layer of the held-out digits CNN (digits_net.HeldOutCNN: another architecture, seed 1,
                the same split), the judge of a model fine-tuned in the "digits" space
    inception   FID's Inception-v3 pool3, 2048-d (inception.py; local weights, grey images repeated to RGB)

Every extractor is a frozen module, differentiable in its input, so it can also be the FD loss's feature network.
"""
from typing import Optional

import torch
from torch import nn

FEATURES = ("digits", "pixels", "inception", "digits-heldout")
HELDOUT_SEED = 1  # the held-out network's seed (SmallCNN's is DEFAULT_SETTINGS["seed"] = 0)


class PixelFeatures(nn.Module):
    """Raw pixels as features: (B, C, H, W) -> (B, C·H·W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class DigitsFeatures(nn.Module):
    """The feature layer of a cached digits CNN; only for 1x8x8 images in [-1, 1]. ``space`` names the feature space
    ("digits" for SmallCNN, "digits-heldout" for the held-out judge), kept in statistics files."""

    def __init__(self, net, space: str = "digits"):
        super().__init__()
        self.net = net
        self.space = space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digits features need 1x8x8 images in [-1, 1], got images of shape "
                             f"{tuple(x.shape[1:])}; use inception features (with its weights) for other images")
        return self.net.features(x)


def feature_space_of(net) -> Optional[str]:
    """The name (one of FEATURES) of the space an extractor of :func:`feature_extractor` maps into, kept in
    statistics files so that statistics of two spaces are never compared; None for any other callable."""
    from .inception import FIDInceptionV3

    if isinstance(net, DigitsFeatures):
        return net.space
    for cls, name in ((PixelFeatures, "pixels"), (FIDInceptionV3, "inception")):
        if isinstance(net, cls):
            return name
    return None


def digits_feature_network(cache: Optional[str] = None, retrain: bool = False, heldout: bool = False):
    """The frozen digits feature CNN trained on the digits *train* split (cached); returns (net, info). ``heldout``:
    the held-out judge (HeldOutCNN, seed HELDOUT_SEED) instead of SmallCNN."""
    from fastcm.data import load_digits

    from .digits_net import feature_network

    train = load_digits("train")
    x, y = train.get_batch(torch.arange(len(train)))
    if heldout:
        return feature_network(x, y, num_classes=10, cache=cache, retrain=retrain, arch="heldout", seed=HELDOUT_SEED)
    return feature_network(x, y, num_classes=10, cache=cache, retrain=retrain)


def feature_extractor(name: str, *, weights: Optional[str] = None, cache: Optional[str] = None,
                      device="cpu") -> nn.Module:
    """The extractor ``name`` (one of FEATURES) in eval mode on ``device``. ``weights`` is the Inception weight file
    (inception only; None reads $FASTCM_INCEPTION_WEIGHTS); ``cache`` the digits network's cache directory."""
    if name not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {name!r}")
    if name != "inception" and weights is not None:
        raise ValueError("weights are only for inception features (the digits network is trained and cached by "
                         "fastcm itself)")
    if name == "pixels":
        return PixelFeatures()
    if name in ("digits", "digits-heldout"):
        heldout = name == "digits-heldout"
        return DigitsFeatures(digits_feature_network(cache, heldout=heldout)[0], name).to(device).eval()
    from . import inception

    try:
        return inception.inception_v3(weights=weights, device=device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--features inception needs --weights PATH: {e}") from e
