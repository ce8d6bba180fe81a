"""One training/sampling API for every consistency method: ``get_method(name, **hyperparameters)``.

    method = get_method("sct", warmup_steps=1000)           # "ict" | "sct" | "meanflow" (METHODS)
    sampler = get_method("ict")                              # no loss settings: for sampling only
    unet = build_unet("digits", **method.unet_overrides)     # what the method needs from the U-Net config
    model = method.make_model(unet)                          # ConsistencyModel | TrigFlowModel | MeanFlowModel
    per_sample = method.loss(model, x0, labels, step, generator)   # (B,); the trainer takes .mean()
    images = method.sample(ema_model, n, steps=1)            # (n, C, H, W) in [-1, 1]
    meta = method.metadata()                                 # {"method": "sct"}: store it in checkpoints

A checkpoint's method is ``meta["method"]`` (key :data:`METHOD_KEY`); :func:`method_from_metadata` reads it
(checkpoints written before the key existed are iCT). :func:`method_of_model` tells the method from a model's class.
The model classes differ in their extra parameters (TrigFlowModel adds the adaptive weight ``weight.*``), so a
checkpoint's state_dict loads into ``get_method(meta["method"]).make_model(unet)``.

Costs per step (network passes on the batch): iCT 2 forwards + 1 backward; sCT and MeanFlow 1 forward on dual
tensors (output with its graph and its tangent from one call, ``jvp_mode="one_pass"``) + 1 backward, or with
``jvp_mode="two_pass"`` 1 JVP without graph + 1 forward + 1 backward (fastcm.cm.jvp). The JVP runs on the model's own
ops route by default (``impl="torch"`` for the reference ops).
"""
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from fastcm._checks import check_int

from .hyperparameters import check_hyperparameters
from .loss import ICTLoss
from .meanflow import MeanFlowLoss, MeanFlowModel, meanflow_sample
from .precond import ConsistencyModel, unwrap
from .ict import ict_sample
from .sampling import ICT_TWO_STEP_SIGMA, resolve_seeds  # noqa: F401 (re-exported)
from .sct import SCTLoss, TrigFlowModel, sct_sample

METHOD_KEY = "method"
DEFAULT_METHOD = "ict"


class Method:
    """Base of the registry entries; subclasses set ``name``, ``model_class`` and ``unet_overrides``."""

    name = ""
    model_class = nn.Module
    unet_overrides: Mapping = {}

    def make_model(self, unet: nn.Module) -> nn.Module:
        raise NotImplementedError

    def loss(self, model, x0: Tensor, labels: Optional[Tensor], step: int,
             generator: Optional[torch.Generator] = None) -> Tensor:
        """Per-sample loss (B,) of images x0 (B, C, H, W) in [-1, 1] at training step ``step``."""
        return self.loss_fn(model, x0, step, labels, generator=generator)

    def sample(self, model, n: int, steps: int = 1, class_labels=None, seeds=None,
               generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None) -> Tensor:
        """n samples (n, C, H, W) in [-1, 1] with the method's ``steps``-step sampler. Sample j is a function of
        its seed alone (fastcm.cm.resolve_seeds: an int base gives base + j; None draws a base from
        ``generator``), so ``batch_size`` (model calls of at most that many samples) never changes a sample."""
        n = check_int("n", n)
        seeds = resolve_seeds(n, seeds, generator)
        if batch_size is None or n <= check_int("batch_size", batch_size):
            return self._sample(model, n, steps, class_labels, seeds)
        parts = []
        for start in range(0, n, batch_size):
            k = min(batch_size, n - start)
            labels = class_labels[start:start + k] if isinstance(class_labels, Tensor) else class_labels
            parts.append(self._sample(model, k, steps, labels, seeds[start:start + k]))
        return torch.cat(parts)

    def _sample(self, model, n: int, steps: int, class_labels, seeds: list) -> Tensor:
        raise NotImplementedError

    def metadata(self) -> dict:
        return {METHOD_KEY: self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ICTMethod(Method):
    """iCT (Song & Dhariwal 2023): fastcm.cm.ICTLoss; sampling at sigma_max (then 0.821 for two steps)."""

    name, model_class, unet_overrides = "ict", ConsistencyModel, {}

    def __init__(self, total_steps: Optional[int] = None, sigma_data: float = 0.5, **loss_kwargs):
        # total_steps=None: built for sampling (get_method("ict")); the loss needs the curriculum's length
        if total_steps is None and loss_kwargs:
            raise ValueError(f"iCT's loss settings {sorted(loss_kwargs)} need total_steps (the curriculum's K)")
        self.loss_fn = ICTLoss(total_steps, **loss_kwargs) if total_steps is not None else None
        self.sigma_data = sigma_data

    def loss(self, model, x0, labels, step, generator=None):
        if self.loss_fn is None:
            raise ValueError("this iCT method was built for sampling; get_method('ict', total_steps=K) trains")
        return super().loss(model, x0, labels, step, generator)

    def make_model(self, unet: nn.Module) -> ConsistencyModel:
        return ConsistencyModel(unet, sigma_data=self.sigma_data)

    def _sample(self, model, n, steps, class_labels, seeds):
        return ict_sample(model, n, class_labels, steps=steps, seeds=seeds)


class SCTMethod(Method):
    """sCT in TrigFlow (Lu & Song 2025): fastcm.cm.SCTLoss; sampling at t_max (then t = 1.1 for two steps).

    The U-Net embeds c_noise(t) = t itself (``time_scale=1``, sCM Sec. 4.1)."""

    name, model_class, unet_overrides = "sct", TrigFlowModel, {"time_scale": 1.0}

    def __init__(self, sigma_data: float = 0.5, weight_channels: int = 128, **loss_kwargs):
        self.loss_fn = SCTLoss(**loss_kwargs)
        self.sigma_data, self.weight_channels = sigma_data, weight_channels

    def make_model(self, unet: nn.Module) -> TrigFlowModel:
        return TrigFlowModel(unet, sigma_data=self.sigma_data, weight_channels=self.weight_channels)

    def _sample(self, model, n, steps, class_labels, seeds):
        return sct_sample(model, n, class_labels, seeds=seeds, steps=steps)


class MeanFlowMethod(Method):
    """MeanFlow (Geng et al. 2025): fastcm.cm.MeanFlowLoss; ``steps`` equal intervals from t = 1 to 0.

    The U-Net takes two time inputs, (t, t - r) (``time_inputs=2``)."""

    name, model_class, unet_overrides = "meanflow", MeanFlowModel, {"time_inputs": 2}

    def __init__(self, **loss_kwargs):
        self.loss_fn = MeanFlowLoss(**loss_kwargs)

    def make_model(self, unet: nn.Module) -> MeanFlowModel:
        return MeanFlowModel(unet)

    def _sample(self, model, n, steps, class_labels, seeds):
        return meanflow_sample(model, n, class_labels, steps=steps, seeds=seeds)


METHODS = {"ict": ICTMethod, "sct": SCTMethod, "meanflow": MeanFlowMethod}


def get_method(name: str, **hyperparameters) -> Method:
    """The method ``name`` of :data:`METHODS` with its loss hyperparameters; without any, a method for sampling
    (iCT's loss needs ``total_steps``)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    check_hyperparameters(name, hyperparameters)  # the documented ranges (fastcm.cm.hyperparameters)
    return METHODS[name](**hyperparameters)


def method_from_metadata(meta: Mapping) -> str:
    """The method recorded in checkpoint metadata; "ict" when absent (checkpoints from before the key existed)."""
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping (checkpoint metadata), got {type(meta).__name__}")
    name = meta.get(METHOD_KEY, DEFAULT_METHOD)
    if name not in METHODS:
        raise ValueError(f"checkpoint metadata names method {name!r}; this fastcm knows {tuple(METHODS)}")
    return name


def method_of_model(model: nn.Module) -> str:
    """"ict", "sct" or "meanflow" from the model's class (through compile / DDP wrappers)."""
    inner = unwrap(model)
    for name, cls in METHODS.items():
        if isinstance(inner, cls.model_class):
            return name
    raise TypeError(f"model must be a ConsistencyModel, TrigFlowModel or MeanFlowModel, got {type(inner).__name__}")
