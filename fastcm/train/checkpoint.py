"""What a training checkpoint holds, and how a model is rebuilt from one (the file format: checkpoint_file.py).

Tensors ``model/…`` (the method's model's state dict), ``ema/…`` (the EMA weights), ``optim/<param>/<key>``
(optimizer moments and step counts), ``extra/<name>/…`` (stage state such as the FD-loss feature queue) and
``rng/cpu``, ``rng/cuda<i>`` (torch's global generators of rank 0); the JSON header holds the stage, step, method,
configs, optimizer hyper-parameters, RNG seeds and counters, and ``model`` (:func:`model_meta`), from which
:func:`load_model` rebuilds the network of any checkpoint. The training noise itself is drawn from generators
re-seeded from (seed, step, rank) every step, so a resumed run needs no other RNG state.
"""
import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from fastcm._checks import note
from fastcm.cm import ConsistencyModel, MeanFlowModel, TrigFlowModel, method_from_metadata, method_of_model
from fastcm.cm.precond import unwrap
from fastcm.data import data_change

from .checkpoint_file import (FORMAT, VERSION, CheckpointError, CheckpointManager, PathLike,  # noqa: F401
                              load_checkpoint, read_checkpoint_meta, save_checkpoint, set_aside_run)
from .checkpoint_schema import check_model_meta, check_network_size
from .config import RESUMABLE_CHANGES, TrainConfig


# ----------------------------------------------------------------------------------------------------------------
# Optimizer state dicts without pickle: tensors go to safetensors, numbers and hyper-parameters to JSON.

def optimizer_to_flat(state_dict: Mapping, prefix: str = "optim/") -> Tuple[Dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``{prefix}{param}/{key}``) and a JSON document."""
    tensors, scalars = {}, {}
    for pid, st in state_dict["state"].items():
        for key, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{prefix}{pid}/{key}"] = v
            else:
                scalars.setdefault(str(pid), {})[key] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    for g in groups:
        bad = [k for k, v in g.items() if isinstance(v, Tensor)]
        if bad:
            raise ValueError(f"optimizer param_group entries {bad} are tensors; use plain numbers for checkpoints")
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: Mapping[str, Tensor], doc: Mapping, prefix: str = "optim/") -> dict:
    """Rebuild the dict that ``optimizer.load_state_dict`` expects from :func:`optimizer_to_flat`'s output."""
    state: Dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix):].split("/", 1)
            state.setdefault(int(pid), {})[key] = t
    for pid, st in doc["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------------------------
# Training state <-> checkpoint contents.

def model_meta(cm: nn.Module) -> dict:
    """JSON description of the network: enough for :func:`load_model` to rebuild a fastcm U-Net and the method's
    model around it (ConsistencyModel: sigma_data/min/max; TrigFlowModel: sigma_data, sigma_max, weight_channels;
    MeanFlowModel: nothing more)."""
    inner = unwrap(cm)
    unet = unwrap(inner.unet)
    config = getattr(unet, "config", None)
    out = {
        "unet_class": f"{type(unet).__module__}.{type(unet).__qualname__}",
        "unet_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "method": method_of_model(inner),
    }
    from fastcm.integrations.diffusers_io import unet_record

    record = unet_record(unet)  # a diffusers U-Net (fastcm train --init diffusers:DIR): its config
    if record is not None:
        out["diffusers"] = record
    for key in ("sigma_data", "sigma_min", "sigma_max"):
        if hasattr(inner, key):
            out[key] = getattr(inner, key)
    if getattr(inner, "weight", None) is not None and hasattr(inner.weight, "linear"):  # sCT's adaptive weight
        out["weight_channels"] = inner.weight.linear.in_features
    return out


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
    now = json.loads(json.dumps(cfg.to_dict()))
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cfg)
                                      if f.default is not dataclasses.MISSING}))
    saved = {**defaults, **meta.get("config", {})}  # a field added since the checkpoint was written: its default
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume from {path}: the config changed ({changes}). Only "
                         f"{sorted(RESUMABLE_CHANGES)} may change; start a new out_dir otherwise")
    saved_method, method = method_from_metadata(meta), method_of_model(cm)
    if saved_method != method:
        raise ValueError(f"cannot resume from {path}: it was trained with method {saved_method!r}, this run uses "
                         f"{method!r}")
    want, have = meta.get("model", {}), model_meta(cm)
    for key in ("unet_config", "diffusers", "sigma_data", "sigma_min", "sigma_max", "weight_channels"):
        a, b = want.get(key), have.get(key)
        if key == "unet_config" and a and b:
            a, b = {**a, "impl": None}, json.loads(json.dumps({**b, "impl": None}))  # the backend may change
        if a != b:
            raise ValueError(f"cannot resume from {path}: the model's {key} differs from the checkpoint's "
                             f"({a!r} saved, {b!r} now)")


def check_same_data(path, saved: Optional[dict], current: Optional[dict], allow_change: bool) -> None:
    """Refuse to resume on other data than the checkpoint's (fastcm.data.data_change), unless ``allow_change``.
    ``current`` None: the run was given no data to compare; ``saved`` None: an older checkpoint that records none."""
    if current is None:
        return
    if saved is None:
        note(f"{path} does not record its training data (an older checkpoint): the data is not checked")
        return
    change = data_change(saved, current)
    if change is not None and not allow_change:
        raise ValueError(f"cannot resume from {path} on other data: {change}; pass --allow-data-change "
                         "(allow_data_change=True) to switch deliberately")


def load_model(path: Union[str, os.PathLike], weights: str = "ema", device: Union[str, torch.device] = "cpu",
               impl: Optional[str] = None) -> nn.Module:
    """Rebuild the model of a training checkpoint (any stage) with its ``weights``: "ema" (the evaluation weights)
    or "model" (the raw trained weights). The checkpoint's method (``meta["method"]``, iCT when absent) picks the
    class: ConsistencyModel (iCT), TrigFlowModel (sCT) or MeanFlowModel; ``method_of_model`` tells them apart and
    ``get_method(name).sample`` samples any of them. ``impl`` overrides the U-Net's op backend. A checkpoint of a
    diffusers U-Net (``meta["model"]["diffusers"]``, from ``fastcm train --init diffusers:DIR``) is rebuilt from its
    recorded config and patched with :func:`fastcm.patch` (``impl``, default "auto")."""
    from fastcm.models import UNet, UNetConfig

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    tensors, meta = load_checkpoint(path)
    info = check_model_meta(path, meta)  # types and ranges of everything used below
    method = method_from_metadata(meta)
    if info.get("diffusers"):  # a diffusers U-Net, patched with fastcm ops (impl, default "auto")
        import fastcm
        from fastcm.integrations.diffusers_io import rebuild_unet

        unet = rebuild_unet(info["diffusers"], str(path))
        fastcm.patch(unet.unet, impl=impl or "auto")
        cm = _method_model(method, unet, info)
    else:
        if not info.get("unet_config"):
            raise CheckpointError(f"{path} does not describe its network ({info.get('unet_class')}); build the "
                                  "model yourself and call load_weights(model, path)")
        try:
            config = UNetConfig(**info["unet_config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed checkpoint header: model.unet_config is invalid ({e})") from None
        with torch.device("meta"):  # the described network without memory: its size must match the stored tensors
            check_network_size(path, _method_model(method, UNet(config), info), tensors, weights)
        unet = UNet(config)
        if impl is not None:
            unet.set_impl(impl)
        cm = _method_model(method, unet, info)
    load_weights(cm, path, weights, tensors=tensors)
    return cm.to(device).eval()


def _method_model(method: str, unet: nn.Module, info: Mapping) -> nn.Module:
    if method == "ict":
        return ConsistencyModel(unet, info["sigma_data"], info["sigma_min"], info["sigma_max"])
    if method == "sct":
        return TrigFlowModel(unet, info["sigma_data"], info["sigma_max"], info.get("weight_channels", 128))
    return MeanFlowModel(unet)


def load_weights(model: nn.Module, path: Union[str, os.PathLike], weights: str = "ema",
                 tensors: Optional[Mapping[str, Tensor]] = None) -> nn.Module:
    """Load a checkpoint's ``weights`` ("ema" or "model") into an existing model of its method (strict)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if tensors is None:
        tensors, _ = load_checkpoint(path)
    state = take(tensors, f"{weights}/")
    if not state:
        raise CheckpointError(f"{path} holds no '{weights}' weights")
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # save_checkpoint never writes these; a file edited or written by other tools might hold them
        raise CheckpointError(f"{path}: its '{weights}' weights hold NaN or inf ({len(bad)} tensors, e.g. "
                              f"{bad[0]!r}); refusing to load them")
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{Path(path).name} does not fit this model: {e}") from e
    return model
