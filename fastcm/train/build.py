"""What the training loop (fastcm.train.loop) builds from its inputs before the first step: the method's model
around a bare U-Net, the optimizer and the autocast dtype a TrainConfig asks for, and a method to sample with."""
from typing import Optional

import torch
from torch import nn

from fastcm.cm import ConsistencyModel, get_method, method_of_model

from .config import TrainConfig


def as_consistency_model(model: nn.Module) -> nn.Module:
    """A method's model (ConsistencyModel, TrigFlowModel or MeanFlowModel) as given, or an iCT ConsistencyModel with
    the default sigmas around a bare U-Net."""
    if isinstance(model, nn.Module):
        try:
            method_of_model(model)
            return model
        except TypeError:
            if hasattr(model, "input_shape"):
                return ConsistencyModel(model)
    raise TypeError(f"model must be a fastcm ConsistencyModel, TrigFlowModel, MeanFlowModel or U-Net, got "
                    f"{type(model).__name__}")


def sampling_method(name: str):
    """``fastcm.cm.get_method(name)``, the Method for sampling (kept: its first name)."""
    return get_method(name)


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """RAdam (iCT's choice, Song & Dhariwal 2023) or Adam with the config's lr, betas and weight decay."""
    cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """None for fp32; bf16/fp16 autocast on CUDA ("auto": bf16 where supported); CPU trains in fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda":
        raise ValueError(f"precision={precision!r} needs a CUDA device; use 'fp32' (or 'auto') on {device.type}")
    return torch.bfloat16 if precision == "bf16" else torch.float16
