"""The header schema of a training checkpoint: the type and range of every field that ``load_model`` (sample, edit,
fid) and a resume read, checked before anything is built from them, and the size of the network the header
describes, checked on the meta device (no memory) against the tensors the file holds before the real one is
allocated. A header that passes its checksum (checkpoint_file.py) can still be crafted; each violation is one
CheckpointError naming the field, what was expected and what was found.
"""
import dataclasses
from typing import Mapping

import torch

from fastcm._checks import is_int, is_real

from .checkpoint_file import CheckpointError

# Bounds far outside every published configuration (the presets, EDM/iCT/sCT papers), tight enough that no
# arithmetic on them overflows: sigma_max 80 (iCT), 80 / sigma_data 0.5 (sCT's TrigFlow t_max = arctan(160)).
SIGMA_RANGE = (1e-6, 1e4)
UNET_INT_RANGES = {"img_resolution": (1, 4096), "in_channels": (1, 64), "model_channels": (1, 8192),
                   "num_blocks": (1, 64), "num_groups": (1, 8192), "num_classes": (0, 1_000_000),
                   "time_inputs": (1, 2), "channels_per_head": (1, 8192), "dropout_max_resolution": (1, 4096)}
MAX_LEVELS, MAX_MULT = 8, 64
STEP_MAX = 2 ** 53  # a JSON number above this is not an exact int in most readers


_MISSING = object()


def _bad(path, field: str, expected: str, value) -> CheckpointError:
    if value is _MISSING:
        return CheckpointError(f"{path}: malformed checkpoint header: {field} is missing (expected {expected})")
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"{path}: malformed checkpoint header: {field} must be {expected}, got {shown}")


def _field(path, doc: Mapping, key: str, ok, expected: str, where: str, optional: bool):
    """``doc[key]`` when ``ok(value)``, else the one-line CheckpointError naming ``where + key`` and ``expected``
    (None when absent or null and ``optional``)."""
    value = doc.get(key)
    if value is None and optional:
        return None
    if not ok(value):
        raise _bad(path, where + key, expected, doc.get(key, _MISSING))
    return value


def _section(path, doc: Mapping, key: str, where: str = "", optional: bool = False):
    """``doc[key]`` when it is a JSON object (None when absent or null and ``optional``)."""
    return _field(path, doc, key, lambda v: isinstance(v, dict), "a JSON object" + (" or null" if optional else ""),
                  where, optional)


def _int(path, doc: Mapping, key: str, lo: int, hi: int, where: str = "", optional: bool = False):
    return _field(path, doc, key, lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]", where,
                  optional)


def _real(path, doc: Mapping, key: str, lo: float, hi: float, where: str = "", optional: bool = False):
    value = _field(path, doc, key, lambda v: is_real(v) and lo <= v <= hi, f"a number in [{lo:g}, {hi:g}]", where,
                   optional)
    return None if value is None else float(value)


def check_model_meta(path, meta: Mapping) -> dict:
    """The ``model`` section (and ``method``) of a checkpoint header, checked; returns the section."""
    from fastcm.cm import METHODS

    for where, doc in (("", meta), ("model.", meta.get("model") if isinstance(meta.get("model"), dict) else {})):
        if "method" in doc and doc["method"] not in tuple(METHODS):
            raise _bad(path, where + "method", f"one of {tuple(METHODS)}", doc["method"])
    info = _section(path, meta, "model")
    if not isinstance(info.get("unet_class", ""), str):
        raise _bad(path, "model.unet_class", "a string", info["unet_class"])
    method = meta.get("method", "ict")
    need = {"ict": ("sigma_data", "sigma_min", "sigma_max"), "sct": ("sigma_data", "sigma_max")}.get(method, ())
    for key in ("sigma_data", "sigma_min", "sigma_max"):
        _real(path, info, key, *SIGMA_RANGE, where="model.", optional=key not in need)
    if method == "ict" and not info["sigma_min"] < info["sigma_max"]:
        raise _bad(path, "model.sigma_min", f"below sigma_max = {info['sigma_max']:g}", info["sigma_min"])
    _int(path, info, "weight_channels", 1, 8192, where="model.", optional=True)
    if _section(path, info, "unet_config", "model.", optional=True) is not None:
        _check_unet_config(path, info["unet_config"])
    return info


def _check_unet_config(path, cfg: dict) -> None:
    from fastcm.models import UNetConfig

    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise _bad(path, "model.unet_config", f"fields of UNetConfig ({len(known)} known)", unknown)
    w = "model.unet_config."
    for key, (lo, hi) in UNET_INT_RANGES.items():
        _int(path, cfg, key, lo, hi, w, optional=key in ("channels_per_head", "dropout_max_resolution")
             or key not in cfg)
    for key, lo, hi in (("channel_mult", 1, MAX_MULT), ("attn_resolutions", 1, 4096)):
        value = cfg.get(key, [1])
        if not (isinstance(value, list) and len(value) <= MAX_LEVELS and all(is_int(v) and lo <= v <= hi
                                                                              for v in value)):
            raise _bad(path, w + key, f"a list of at most {MAX_LEVELS} integers in [{lo}, {hi}]", value)
    for key in ("dropout", "fourier_scale", "time_scale"):
        _real(path, cfg, key, 0.0 if key == "dropout" else 1e-6, 1.0 if key == "dropout" else 1e6, w,
              optional=key == "time_scale" or key not in cfg)
    for key, kind in (("mid_attention", bool), ("embedding", str), ("impl", str)):
        if key in cfg and not isinstance(cfg[key], kind):
            raise _bad(path, w + key, f"a {kind.__name__}", cfg[key])


def check_network_size(path, shell: torch.nn.Module, tensors: Mapping[str, torch.Tensor], weights: str) -> None:
    """``shell`` (the network the header describes, built on the meta device) against the ``weights/…`` tensors of
    the file: the same names and shapes, so a header claiming a bigger network is refused before it is allocated."""
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    have = {k[len(weights) + 1:]: tuple(v.shape) for k, v in tensors.items() if k.startswith(weights + "/")}
    if want != have:
        n_want = sum(torch.Size(s).numel() for s in want.values())
        n_have = sum(torch.Size(s).numel() for s in have.values())
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise CheckpointError(f"{path}: its header describes a network of {n_want:,} values in {len(want)} tensors "
                              f"but the file holds {n_have:,} in {len(have)} '{weights}' tensors (e.g. {diff[0]!r}: "
                              f"{want.get(diff[0])} described, {have.get(diff[0])} stored); refusing to build it")


def check_training_meta(path, meta: Mapping) -> None:
    """The sections a resume reads (step, guard, optimizer, extra, scaler, eval, config), checked."""
    _int(path, meta, "step", 0, STEP_MAX)
    if not isinstance(meta.get("stage"), str):
        raise _bad(path, "stage", "a string", meta.get("stage"))
    _section(path, meta, "config")
    check_model_meta(path, meta)
    guard = _section(path, meta, "guard")
    for key in ("skipped", "consecutive", "diverged"):
        _int(path, guard, key, 0, STEP_MAX, "guard.", optional=key == "diverged")
    opt = _section(path, meta, "optimizer")
    groups = opt.get("param_groups")
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
        raise _bad(path, "optimizer.param_groups", "a non-empty list of JSON objects", groups)
    for i, g in enumerate(groups):
        params = g.get("params")
        if not (isinstance(params, list) and all(is_int(p, 0) for p in params)):
            raise _bad(path, f"optimizer.param_groups[{i}].params", "a list of parameter indices", params)
        _real(path, g, "lr", 0.0, 1e3, f"optimizer.param_groups[{i}].")
    scalars = _section(path, opt, "scalars", "optimizer.")
    for pid, st in scalars.items():
        if not (pid.isdigit() and isinstance(st, dict)):
            raise _bad(path, f"optimizer.scalars[{pid!r}]", "an object under a parameter index", st)
    extra = _section(path, meta, "extra")
    for name, st in extra.items():
        if not isinstance(st, dict):
            raise _bad(path, f"extra.{name}", "a JSON object", st)
    for key in ("scaler", "eval", "curriculum", "data"):
        _section(path, meta, key, optional=True)


def check_optimizer_tensors(path, tensors: Mapping[str, torch.Tensor], prefix: str = "optim/") -> None:
    """Optimizer tensor names are ``optim/<parameter index>/<key>``."""
    for name in tensors:
        if name.startswith(prefix):
            pid, sep, key = name[len(prefix):].partition("/")
            if not (pid.isdigit() and sep and key):
                raise _bad(path, "a tensor name", f"{prefix}<parameter index>/<key>", name)
