"""Consistency-model parametrization (CM, Song et al. 2023, App. C; iCT Sec. 2): the U-Net never sees sigma.

f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)) with the sigma_min-shifted EDM
coefficients, so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0: f(x, sigma_min) = x holds exactly for any weights.
"""
import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastcm._checks import check_real, check_tensor


def cm_coefficients(sigma: Tensor, sigma_data: float, sigma_min: float):
    """(c_skip, c_out, c_in, c_noise) of CM App. C for a tensor of noise levels (computed in sigma's dtype)."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1.0 / (sigma**2 + sigma_data**2).sqrt()  # EDM c_in (diffusers scale_model_input: the same)
    c_noise = 0.25 * sigma.log()  # EDM/CM; the positional embedding multiplies it by 1000 (ADM timesteps)
    return c_skip, c_out, c_in, c_noise


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside torch.compile (``_orig_mod``) and DDP/FSDP-style (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and not isinstance(model, ConsistencyModel):
            model = model.module
        else:
            return model


def find_wrapped(model: nn.Module, cls: type) -> nn.Module:
    """The ``cls`` instance behind ``model`` (through compile / DDP wrappers); TypeError if there is none."""
    inner = unwrap(model)
    if not isinstance(inner, cls):
        raise TypeError(f"model must be a fastcm.cm.{cls.__name__} (optionally compiled or DDP-wrapped), "
                        f"got {type(model).__name__}")
    return inner


def find_cm(model: nn.Module) -> "ConsistencyModel":
    """The ConsistencyModel behind ``model`` (through compile / DDP wrappers); TypeError if there is none."""
    return find_wrapped(model, ConsistencyModel)


class UNetWrapper(nn.Module):
    """Base of the models that wrap a U-Net (iCT, TrigFlow, MeanFlow): the image shape and classes are the U-Net's."""

    @property
    def input_shape(self):
        return unwrap(self.unet).input_shape

    @property
    def num_classes(self) -> int:
        return unwrap(self.unet).num_classes


class ConsistencyModel(UNetWrapper):
    """f_theta(x, sigma) around a U-Net from :mod:`fastcm.models` (or any net with the same forward signature).

    Args:
        unet: network called as ``unet(x, noise_labels, class_labels=None, dropout_seed=None)``.
        sigma_data: data standard deviation (0.5 for data in [-1, 1]).
        sigma_min: the boundary epsilon where f is the identity (0.002).
        sigma_max: the largest noise level T (80), where one-step sampling starts.
    """

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be an nn.Module, got {type(unet).__name__}")
        for name, v in (("sigma_data", sigma_data), ("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            check_real(name, v, positive=True)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min} and {sigma_max}")
        self.unet = unet
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def forward(self, x: Tensor, sigma: Union[float, Tensor], class_labels: Optional[Tensor] = None,
                dropout_seed: Optional[Union[int, Tensor]] = None) -> Tensor:
        """Evaluate f(x, sigma). x: (B, C, H, W) floating; sigma: a float or a (B,) tensor with sigma >= sigma_min.

        The coefficients are computed in fp32 (fp64 for fp64 x); the U-Net runs in its own parameter dtype (or
        under autocast); the output has x's dtype promoted to at least fp32.
        """
        check_tensor("x", x, ndim=4)
        acc = torch.promote_types(x.dtype, torch.float32)
        if isinstance(sigma, Tensor):
            check_tensor("sigma", sigma, shape=(x.shape[0],))
            sigma = sigma.to(device=x.device, dtype=acc)
        elif isinstance(sigma, numbers.Real) and not isinstance(sigma, bool):
            if not self.sigma_min <= sigma < math.inf:
                raise ValueError(f"sigma must be >= sigma_min={self.sigma_min}, got {sigma!r}")
            sigma = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=acc)
        else:
            raise TypeError(f"sigma must be a float or a (B,) tensor, got {type(sigma).__name__}")
        c_skip, c_out, c_in, c_noise = cm_coefficients(sigma, self.sigma_data, self.sigma_min)
        x = x.to(acc)
        view = (-1, 1, 1, 1)
        F_x = self.unet(c_in.view(view) * x, c_noise, class_labels=class_labels, dropout_seed=dropout_seed)
        return c_skip.view(view) * x + c_out.view(view) * F_x.to(acc)
