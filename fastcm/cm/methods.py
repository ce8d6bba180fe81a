"""One training/sampling API for every consistency method: ``get_method(name, **hyperparameters)``.

    method = get_method("sct", warmup_steps=1000)           # "ict" | "sct" | "meanflow" (METHODS)
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
``jvp_mode="two_pass"`` 1 JVP without graph + 1 forward + 1 backward (fastcm.cm.jvp).
"""
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .hyperparameters import check_hyperparameters
from .loss import ICTLoss
from .meanflow import MeanFlowLoss, MeanFlowModel, meanflow_sample
from .precond import ConsistencyModel, unwrap
from .sampling import sample as ict_sample
from .sct import SCTLoss, TrigFlowModel, sct_sample

METHOD_KEY = "method"
DEFAULT_METHOD = "ict"
ICT_TWO_STEP_SIGMA = 0.821  # iCT's second noise level for two-step sampling (CIFAR-10)


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
               generator: Optional[torch.Generator] = None) -> Tensor:
        raise NotImplementedError

    def metadata(self) -> dict:
        return {METHOD_KEY: self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ICTMethod(Method):
    """iCT (Song & Dhariwal 2023): fastcm.cm.ICTLoss; sampling at sigma_max (then 0.821 for two steps)."""

    name, model_class, unet_overrides = "ict", ConsistencyModel, {}

    def __init__(self, total_steps: int, sigma_data: float = 0.5, **loss_kwargs):
        self.loss_fn = ICTLoss(total_steps, **loss_kwargs)
        self.sigma_data = sigma_data

    def make_model(self, unet: nn.Module) -> ConsistencyModel:
        return ConsistencyModel(unet, sigma_data=self.sigma_data)

    def sample(self, model, n, steps=1, class_labels=None, seeds=None, generator=None):
        if steps not in (1, 2):
            raise ValueError(f"steps must be 1 or 2 for iCT (fastcm.cm.sample takes any sigmas), got {steps!r}")
        sigma_max = float(unwrap(model).sigma_max)
        sigmas = (sigma_max,) if steps == 1 else (sigma_max, ICT_TWO_STEP_SIGMA)
        return ict_sample(model, n, class_labels, sigmas=sigmas, generator=generator, seeds=seeds)


class SCTMethod(Method):
    """sCT in TrigFlow (Lu & Song 2025): fastcm.cm.SCTLoss; sampling at t_max (then t = 1.1 for two steps).

    The U-Net embeds c_noise(t) = t itself (``time_scale=1``, sCM Sec. 4.1)."""

    name, model_class, unet_overrides = "sct", TrigFlowModel, {"time_scale": 1.0}

    def __init__(self, sigma_data: float = 0.5, weight_channels: int = 128, **loss_kwargs):
        self.loss_fn = SCTLoss(**loss_kwargs)
        self.sigma_data, self.weight_channels = sigma_data, weight_channels

    def make_model(self, unet: nn.Module) -> TrigFlowModel:
        return TrigFlowModel(unet, sigma_data=self.sigma_data, weight_channels=self.weight_channels)

    def sample(self, model, n, steps=1, class_labels=None, seeds=None, generator=None):
        return sct_sample(model, n, class_labels, generator=generator, seeds=seeds, steps=steps)


class MeanFlowMethod(Method):
    """MeanFlow (Geng et al. 2025): fastcm.cm.MeanFlowLoss; ``steps`` equal intervals from t = 1 to 0.

    The U-Net takes two time inputs, (t, t - r) (``time_inputs=2``)."""

    name, model_class, unet_overrides = "meanflow", MeanFlowModel, {"time_inputs": 2}

    def __init__(self, **loss_kwargs):
        self.loss_fn = MeanFlowLoss(**loss_kwargs)

    def make_model(self, unet: nn.Module) -> MeanFlowModel:
        return MeanFlowModel(unet)

    def sample(self, model, n, steps=1, class_labels=None, seeds=None, generator=None):
        return meanflow_sample(model, n, class_labels, steps=steps, generator=generator, seeds=seeds)


METHODS = {"ict": ICTMethod, "sct": SCTMethod, "meanflow": MeanFlowMethod}


def get_method(name: str, **hyperparameters) -> Method:
    """The method ``name`` of :data:`METHODS` with its loss hyperparameters (iCT needs ``total_steps``)."""
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
