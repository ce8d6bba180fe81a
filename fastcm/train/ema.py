"""Exponential moving average of the weights for evaluation (iCT: beta = 0.99993 on CIFAR-10).

iCT has no EMA *teacher* (the target is stopgrad(theta)); this EMA only produces the weights that are sampled and
evaluated. The update is one fused multi-tensor lerp over all parameters: ema <- ema + (1 - beta) (theta - ema).
"""
import copy
import math

import torch
from torch import nn

from fastcm._checks import is_real
from fastcm.cm.precond import unwrap


class EMA:
    """A shadow copy of ``model`` whose parameters track an exponential moving average.

    ``EMA.module`` is the shadow model itself (a deep copy in eval mode without gradients): sample or evaluate
    with it directly, e.g. ``sample(ema.module, 64)``. ``copy_to(model)`` writes the averaged weights into another
    model of the same architecture instead. Buffers (e.g. Fourier frequencies) are copied, not averaged.
    ``state_dict()`` is the shadow model's state dict (plain tensors, safetensors-friendly).
    """

    def __init__(self, model: nn.Module, beta: float = 0.99993):
        if not is_real(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        src = unwrap(model)
        if not isinstance(src, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.beta = float(beta)
        self.module = copy.deepcopy(src).eval().requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None

    def _pairs(self, model: nn.Module, kind: str):
        get = (lambda m: m.named_parameters()) if kind == "parameters" else (lambda m: m.named_buffers())
        mine, theirs = dict(get(self.module)), dict(get(unwrap(model)))
        if mine.keys() != theirs.keys():
            raise ValueError(f"model's {kind} do not match the EMA's: "
                             f"missing {sorted(mine.keys() - theirs.keys())[:3]}, "
                             f"unexpected {sorted(theirs.keys() - mine.keys())[:3]}")
        for name in mine:
            if mine[name].shape != theirs[name].shape:
                raise ValueError(f"{kind[:-1]} {name!r} has shape {tuple(theirs[name].shape)}, "
                                 f"the EMA holds {tuple(mine[name].shape)}")
        return [mine[n] for n in mine], [theirs[n] for n in mine]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- lerp(ema, theta, 1 - beta) over all parameters in one multi-tensor op; buffers are copied."""
        ema_params, params = self._pairs(model, "parameters")
        if ema_params:
            torch._foreach_lerp_(ema_params, [p.detach().to(e.device, e.dtype) for e, p in zip(ema_params, params)],
                                 1.0 - self.beta)
        ema_bufs, bufs = self._pairs(model, "buffers")
        for e, b in zip(ema_bufs, bufs):
            e.copy_(b)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the EMA's (same architecture)."""
        for kind in ("parameters", "buffers"):
            ema_t, theirs = self._pairs(model, kind)
            for e, t in zip(ema_t, theirs):
                t.copy_(e)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        for name, t in state_dict.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"EMA state_dict entry {name!r} contains NaN or inf")
        self.module.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"EMA(beta={self.beta}, half_life_steps={math.log(0.5) / math.log(self.beta):.0f})" \
            if self.beta > 0 else "EMA(beta=0.0)"
