"""The documented ranges of every method's loss hyper-parameters, checked in one place.

Both entry points go through :func:`check_hyperparameters`: ``fastcm.cm.get_method(name, **hyperparameters)`` and
the training config (``fastcm.train.ICTConfig``, which checks all three methods' fields when it is built, so a
value the loss would reject never reaches a run). Outside a range a run does not fail loudly: it trains on
nothing or overflows (a weight ``1 / (L + c)^p`` with p = 1e308 is 0 or inf, a proposal ``exp(1e308)`` is inf,
``sigma^(1 / rho)`` with rho = 1e-300 is inf), so each range is the published values with a wide margin:

=========  ==================  ================  ==================================================================
method     keyword             range             published values and why the bound
=========  ==================  ================  ==================================================================
all        P_mean              [-10, 10]         iCT -1.1, sCT -1.0 / -0.8, MeanFlow -2.0 / -0.6 / -4.0 (logit). e^10 =
                                                 2.2e4 is far past sigma_max = 80 (and e^-10 below sigma_min = 0.002); a
                                                 logit mean of 10 puts t = 1 - 4.5e-5: the proposal saturates.
all        P_std               (0, 10]           iCT 2.0, sCT 1.4 / 1.6 / 1.8, MeanFlow 2.0 / 1.6.
ict        rho                 [1, 100]          EDM / iCT 7; 1 is a linear grid, 100 is all but geometric.
ict        c (Pseudo-Huber)    (0, 100]          0.00054 sqrt(d) (0.03 for CIFAR-10, 0.48 at 3x512x512); past
                                                 ||x - y|| the loss is ||x - y||^2 / 2c and its gradient vanishes.
sct        tangent_c           (0, 100]          0.1 (sCM App. G.2); g / (||g|| + c) with c >> ||g|| is ~0.
meanflow   p                   [0, 2]            0 (plain L2), 0.5 (Pseudo-Huber), 0.75 (CIFAR-10), 1.0 (ImageNet).
meanflow   c                   (0, 1]            1e-3 (CIFAR-10), 1e-2 (ImageNet).
meanflow   ratio               [0, 1]            0.75 (CIFAR-10), 0.25 (ImageNet), 0.5 (iMF): a share.
=========  ==================  ================  ==================================================================

The integer ones (iCT's ``total_steps``, ``s0``, ``s1``; sCT's ``warmup_steps``) are checked by their losses.
:func:`check_unet` refuses a fastcm U-Net built without the method's ``unet_overrides`` (sCT on a U-Net that
embeds 1000 t instead of t, sCM Sec. 4.1).
"""
import math
import numbers
from typing import Mapping, Optional

from torch import nn

# (lo, hi, lo_open): lo < v <= hi when lo_open, else lo <= v <= hi
_P = {"P_mean": (-10.0, 10.0, False), "P_std": (0.0, 10.0, True)}
RANGES = {
    "ict": {**_P, "rho": (1.0, 100.0, False), "c": (0.0, 100.0, True)},
    "sct": {**_P, "tangent_c": (0.0, 100.0, True)},
    "meanflow": {**_P, "p": (0.0, 2.0, False), "c": (0.0, 1.0, True), "ratio": (0.0, 1.0, False)},
}
OPTIONAL = {("ict", "c")}  # None = the method's default (iCT: 0.00054 sqrt(d))


def check_hyperparameters(method: str, hyperparameters: Mapping, names: Optional[Mapping] = None) -> None:
    """ValueError in one line for the first of ``hyperparameters`` outside its range in :data:`RANGES`.

    Keywords without a range are left to the method's constructor. ``names`` maps a keyword to the name the
    caller knows it by (a config field such as ``sct_P_mean``) for the message.
    """
    for key, value in hyperparameters.items():
        bounds = RANGES.get(method, {}).get(key)
        if bounds is None or (value is None and (method, key) in OPTIONAL):
            continue
        lo, hi, lo_open = bounds
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and (
            (lo < value if lo_open else lo <= value) and value <= hi)
        if not ok:
            name = (names or {}).get(key, key)
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise ValueError(f"{name} must be a number in {interval} ({method}; see fastcm.cm.hyperparameters for "
                             f"the published values), got {value!r}")


def check_unet(method: str, overrides: Mapping, model: nn.Module) -> None:
    """ValueError in one line when a fastcm U-Net inside ``model`` was built without the method's ``overrides``.

    The effective value counts (a U-Net's ``time_scale`` property: None means 1000 for the positional embedding
    and 1 for Fourier features). Networks without a fastcm config (other projects' U-Nets) are not checked.
    """
    from .precond import unwrap  # precond imports nothing of this module; keep the import graph flat

    net = unwrap(model)
    while not hasattr(net, "config") and isinstance(getattr(net, "unet", None), nn.Module):
        net = unwrap(net.unet)
    config = getattr(net, "config", None)
    for key, want in overrides.items():
        if config is None or not hasattr(config, key):
            continue
        have = getattr(net, key, getattr(config, key))
        if have != want:
            raise ValueError(f"method {method!r} needs a U-Net built with {key}={want!r} (build_unet(preset, "
                             f"**fastcm.cm.METHODS[{method!r}].unet_overrides)), got {key}={have!r}")
