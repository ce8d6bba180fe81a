"""iCT: improved consistency training (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models",
arXiv 2310.14189; equation numbers are the paper's). The method's model, loss and sampler in one place.

Model (:class:`ConsistencyModel`, fastcm.cm.precond): f_theta(x, sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in x,
c_noise) with c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2), c_out = (sigma - sigma_min) sigma_d /
sqrt(sigma^2 + sigma_d^2), so f(x, sigma_min) = x (the boundary condition, Sec. 2).

Loss (:class:`ICTLoss`, fastcm.cm.loss; Eq. 8 with Sec. 3's changes): lambda(sigma_i) d(f_theta(x + sigma_{i+1} z,
sigma_{i+1}), stopgrad f_theta(x + sigma_i z, sigma_i)) over the Karras grid of N(k) points (the curriculum of Eq. 9,
s0 = 10 to s1 = 1280), i drawn lognormal (P_mean = -1.1, P_std = 2.0), lambda = 1 / (sigma_{i+1} - sigma_i),
d = Pseudo-Huber with c = 0.00054 sqrt(d); no EMA teacher.

Sampler (:func:`ict_sample`): one step x = f(sigma_max z, sigma_max); two steps re-noise to sigma = 0.821 and denoise
again (the CIFAR-10 values of Sec. 6). :func:`fastcm.cm.sample` takes any descending sigmas.
"""
from typing import Optional

import torch
from torch import Tensor

from .loss import ICTLoss
from .precond import ConsistencyModel, unwrap
from .sampling import ICT_SIGMA_MAX, ICT_TWO_STEP_SIGMA, Seeds, sample

__all__ = ["ConsistencyModel", "ICTLoss", "ict_sample", "ICT_SIGMA_MAX", "ICT_TWO_STEP_SIGMA"]


def ict_sample(model, n: int, class_labels=None, steps: int = 1, seeds: Seeds = None,
               generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None) -> Tensor:
    """iCT's ``steps``-step samples (1 or 2) of a ConsistencyModel: sigmas (sigma_max,) or (sigma_max, 0.821)."""
    if steps not in (1, 2) or isinstance(steps, bool):
        raise ValueError(f"steps must be 1 or 2 for iCT (fastcm.cm.sample takes any sigmas), got {steps!r}")
    sigma_max = float(unwrap(model).sigma_max)
    sigmas = (sigma_max,) if steps == 1 else (sigma_max, ICT_TWO_STEP_SIGMA)
    return sample(model, n, class_labels, sigmas=sigmas, generator=generator, seeds=seeds, batch_size=batch_size)
