"""One-step and multistep consistency sampling (CM, Song et al. 2023, Algorithm 1) with per-sample seeded noise.

x = f(sigma_1 z_1, sigma_1); then for each further sigma: x = f(x + sqrt(sigma^2 - sigma_min^2) z, sigma). iCT:
one step from 80, two steps with (80, 0.821) on CIFAR-10. Every sample j draws its label (when needed) and all its
noise from its own CPU generator seeded with seeds[j] (EDM's StackedRandomGenerator idea), so a sample depends on
its seed only: not on the batch size, the batch it lands in, or the device.
"""
import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastcm._checks import check_int, is_int

from .precond import unwrap

# iCT's noise levels for one- and two-step sampling on CIFAR-10 (Song & Dhariwal 2023, Sec. 6): 80, then 0.821.
ICT_SIGMA_MAX = 80.0
ICT_TWO_STEP_SIGMA = 0.821

Seeds = Union[None, int, Sequence[int], Tensor]


class PerSampleNoise:
    """One CPU ``torch.Generator`` per sample: ``randn(shape)`` returns (n, *shape) with row j from generator j."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, shape, device=None, dtype=torch.float32) -> Tensor:
        out = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
        return out.to(device=device, dtype=dtype)

    def randint(self, high: int, device=None) -> Tensor:
        out = torch.stack([torch.randint(0, high, (), generator=g) for g in self.generators])
        return out.to(device)


def resolve_seeds(n: int, seeds: Seeds = None, generator: Optional[torch.Generator] = None) -> list:
    """The n per-sample seeds: a sequence/tensor of n ints as given; an int base gives base, base+1, ...;
    None draws one base from ``generator`` (or torch's global RNG) and continues as for an int."""
    if seeds is None:
        dev = generator.device if generator is not None else "cpu"
        seeds = int(torch.randint(0, 2**62, (), generator=generator, device=dev))
    if isinstance(seeds, bool):
        raise TypeError("seeds must be an int, a sequence of ints or an integer tensor, got bool")
    if isinstance(seeds, numbers.Integral):
        if not 0 <= seeds < 2**63 - n:
            raise ValueError(f"seeds (a base seed) must be in [0, 2**63 - n), got {seeds}")
        return [int(seeds) + j for j in range(n)]
    if isinstance(seeds, Tensor):
        if seeds.dtype.is_floating_point or seeds.dtype == torch.bool or seeds.dim() != 1:
            raise TypeError(f"seeds tensor must be 1-D integer, got {seeds.dtype} of shape {tuple(seeds.shape)}")
        seeds = seeds.tolist()
    seeds = list(seeds)
    if len(seeds) != n or not all(is_int(s, 0) for s in seeds):
        raise ValueError(f"seeds must hold {n} non-negative ints (one per sample), got {len(seeds)} entries")
    return [int(s) for s in seeds]


def model_info(model):
    """(sigma_min, input_shape, num_classes) of a ConsistencyModel (through wrappers) or any duck-typed model."""
    inner = unwrap(model) if isinstance(model, nn.Module) else model
    try:
        return float(inner.sigma_min), tuple(inner.input_shape), int(inner.num_classes)
    except AttributeError as e:
        raise TypeError("model must be a fastcm.cm.ConsistencyModel or expose sigma_min, input_shape and "
                        f"num_classes; {type(model).__name__} does not ({e})") from None


def check_sigmas(sigmas, sigma_min: float, name: str = "sigmas", allow_empty: bool = False) -> list:
    """A strictly descending list of floats, each > sigma_min."""
    if isinstance(sigmas, numbers.Real) and not isinstance(sigmas, bool):
        sigmas = [sigmas]
    if isinstance(sigmas, Tensor):
        sigmas = sigmas.tolist()
    try:
        sigmas = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of floats, got {sigmas!r}") from None
    if not sigmas and not allow_empty:
        raise ValueError(f"{name} must hold at least one noise level")
    if not all(math.isfinite(s) and s > sigma_min for s in sigmas):
        raise ValueError(f"{name} must be finite and > sigma_min={sigma_min}, got {sigmas}")
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"{name} must be strictly descending, got {sigmas}")
    return sigmas


def resolve_labels(class_labels, n: int, num_classes: int, noise: PerSampleNoise, device) -> Optional[Tensor]:
    """Class labels (n,) int64: as given, an int broadcast, or (conditional model, None) drawn per sample."""
    if num_classes == 0:
        if class_labels is not None:
            raise ValueError("class_labels given but the model is unconditional (num_classes == 0)")
        return None
    if class_labels is None:
        return noise.randint(num_classes, device)
    if isinstance(class_labels, numbers.Integral) and not isinstance(class_labels, bool):
        class_labels = torch.full((n,), int(class_labels), dtype=torch.int64)
    if not isinstance(class_labels, Tensor) or class_labels.dtype.is_floating_point or class_labels.shape != (n,):
        raise ValueError(f"class_labels must be an int or an integer tensor of shape ({n},), got {class_labels!r}")
    if n and not (0 <= int(class_labels.min()) and int(class_labels.max()) < num_classes):
        raise ValueError(f"class_labels must lie in [0, {num_classes}), got min {int(class_labels.min())}, "
                         f"max {int(class_labels.max())}")
    return class_labels.to(device=device, dtype=torch.int64)


def model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
    return torch.device("cpu")


class eval_mode:
    """Context manager: run an nn.Module in eval mode (no dropout), restoring its previous mode afterwards."""

    def __init__(self, model):
        self.model = model if isinstance(model, nn.Module) else None

    def __enter__(self):
        self.was_training = self.model.training if self.model is not None else False
        if self.model is not None:
            self.model.eval()

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.train(self.was_training)


@torch.no_grad()
def sample(model, n: int, class_labels=None, sigmas: Sequence[float] = (ICT_SIGMA_MAX,),
           generator: Optional[torch.Generator] = None, *, seeds: Seeds = None, batch_size: Optional[int] = None,
           clip_denoised: bool = True) -> Tensor:
    """Draw n samples (n, C, H, W) in [-1, 1] with the consistency model (in eval mode, restored afterwards).

    Args:
        model: a ConsistencyModel (e.g. ``ema.module``), optionally compiled.
        n: number of samples.
        class_labels: None (unconditional; drawn per sample for a conditional model), an int, or (n,) ints.
        sigmas: descending noise levels: (80.0,) one step, (80.0, 0.821) iCT's two steps, or longer.
        generator: used only to draw the base seed when ``seeds`` is None.
        seeds: per-sample seeds, see :func:`resolve_seeds`; sample j is a function of seeds[j] alone.
        batch_size: evaluate at most this many samples per model call (None: all n at once).
        clip_denoised: clamp each step's denoised estimate to [-1, 1], as CM's sampler does.
    """
    n = check_int("n", n)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size)
    sigma_min, shape, num_classes = model_info(model)
    sigmas = check_sigmas(sigmas, sigma_min)
    seeds = resolve_seeds(n, seeds, generator)
    if isinstance(class_labels, Tensor) and class_labels.shape != (n,):
        raise ValueError(f"class_labels must have shape ({n},), got {tuple(class_labels.shape)}")
    device = model_device(model)
    bs = batch_size or n
    out = []
    with eval_mode(model):
        for start in range(0, n, bs):
            noise = PerSampleNoise(seeds[start:start + bs])
            labels = class_labels[start:start + bs] if isinstance(class_labels, Tensor) else class_labels
            labels = resolve_labels(labels, len(noise.generators), num_classes, noise, device)
            x = sigmas[0] * noise.randn(shape, device)
            x = _denoise(model, x, sigmas[0], labels, clip_denoised)
            for sigma in sigmas[1:]:
                x = x + math.sqrt(sigma**2 - sigma_min**2) * noise.randn(shape, device)
                x = _denoise(model, x, sigma, labels, clip_denoised)
            out.append(x.clamp(-1.0, 1.0))
    return torch.cat(out)


def _denoise(model, x: Tensor, sigma: float, labels: Optional[Tensor], clip: bool) -> Tensor:
    x0 = model(x, sigma, labels)
    return x0.clamp(-1.0, 1.0) if clip else x0
