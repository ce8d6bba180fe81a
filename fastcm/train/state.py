"""Training state <-> checkpoint: which tensors and JSON a stage saves, resume checks, and :func:`load_model`.

Tensor names: ``model/…`` (the ConsistencyModel's state dict), ``ema/…`` (the EMA weights), ``optim/<param>/<key>``
(optimizer moments and step counts), ``extra/<name>/…`` (stage state such as the FD-loss feature queue) and
``rng/cpu``, ``rng/cuda<i>`` (torch's global generators of rank 0). The training noise itself is drawn from
generators re-seeded from (seed, step, rank) every step, so a resumed run needs no other RNG state.
"""
import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from fastcm.cm import ConsistencyModel
from fastcm.cm.precond import unwrap

from .checkpoint import CheckpointError, load_checkpoint
from .config import RESUMABLE_CHANGES, TrainConfig


def model_meta(cm: ConsistencyModel) -> dict:
    """JSON description of the network: enough for :func:`load_model` to rebuild a fastcm U-Net."""
    unet = unwrap(cm.unet)
    config = getattr(unet, "config", None)
    return {
        "unet_class": f"{type(unet).__module__}.{type(unet).__qualname__}",
        "unet_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "sigma_data": cm.sigma_data, "sigma_min": cm.sigma_min, "sigma_max": cm.sigma_max,
    }


def split_state(state: Mapping, prefix: str):
    """A state dict -> (tensors named ``prefix + key``, JSON-able rest)."""
    tensors, rest = {}, {}
    for k, v in state.items():
        if isinstance(v, Tensor):
            tensors[prefix + k] = v
        else:
            rest[k] = v
    return tensors, rest


def take(tensors: Mapping[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def rng_tensors() -> Dict[str, Tensor]:
    out = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda{i}"] = s
    return out


def restore_rng(tensors: Mapping[str, Tensor]) -> None:
    if "rng/cpu" in tensors:
        torch.set_rng_state(tensors["rng/cpu"].cpu())
    cuda = [tensors[f"rng/cuda{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


def check_resumable(path, meta: dict, stage: str, cfg: TrainConfig, cm: ConsistencyModel) -> None:
    """Raise ValueError unless the checkpoint belongs to this stage, config (up to RESUMABLE_CHANGES) and net."""
    if meta.get("stage") != stage:
        raise ValueError(f"{path} is a {meta.get('stage')!r} checkpoint; cannot resume the {stage!r} stage from it "
                         "(to start a stage from trained weights use load_model)")
    saved, now = meta.get("config", {}), json.loads(json.dumps(cfg.to_dict()))
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume from {path}: the config changed ({changes}). Only "
                         f"{sorted(RESUMABLE_CHANGES)} may change; start a new out_dir otherwise")
    want, have = meta.get("model", {}), model_meta(cm)
    for key in ("unet_config", "sigma_data", "sigma_min", "sigma_max"):
        a, b = want.get(key), have.get(key)
        if key == "unet_config" and a and b:
            a, b = {**a, "impl": None}, json.loads(json.dumps({**b, "impl": None}))  # the backend may change
        if a != b:
            raise ValueError(f"cannot resume from {path}: the model's {key} differs from the checkpoint's "
                             f"({a!r} saved, {b!r} now)")


def load_model(path: Union[str, os.PathLike], weights: str = "ema", device: Union[str, torch.device] = "cpu",
               impl: Optional[str] = None) -> ConsistencyModel:
    """Rebuild the ConsistencyModel of a training checkpoint (any stage) with its ``weights``: "ema" (the
    evaluation weights) or "model" (the raw trained weights). ``impl`` overrides the U-Net's op backend."""
    from fastcm.models import UNet, UNetConfig

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    tensors, meta = load_checkpoint(path)
    info = meta.get("model") or {}
    if not info.get("unet_config"):
        raise CheckpointError(f"{path} does not describe its network ({info.get('unet_class')}); build the model "
                              "yourself and call load_weights(model, path)")
    unet = UNet(UNetConfig(**info["unet_config"]))
    if impl is not None:
        unet.set_impl(impl)
    cm = ConsistencyModel(unet, info["sigma_data"], info["sigma_min"], info["sigma_max"])
    load_weights(cm, path, weights, tensors=tensors)
    return cm.to(device).eval()


def load_weights(model: nn.Module, path: Union[str, os.PathLike], weights: str = "ema",
                 tensors: Optional[Mapping[str, Tensor]] = None) -> nn.Module:
    """Load a checkpoint's ``weights`` ("ema" or "model") into an existing ConsistencyModel (strict)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if tensors is None:
        tensors, _ = load_checkpoint(path)
    state = take(tensors, f"{weights}/")
    if not state:
        raise CheckpointError(f"{path} holds no '{weights}' weights")
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{Path(path).name} does not fit this model: {e}") from e
    return model
