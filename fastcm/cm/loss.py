"""iCT consistency-training loss (Song & Dhariwal 2023, Eq. 8 with the Sec. 3 improvements).

L = E[ lambda(sigma_i) d(f_theta(x + sigma_{i+1} z, sigma_{i+1}), stopgrad f_theta(x + sigma_i z, sigma_i)) ]
with the same z and the same dropout mask in both passes, no EMA teacher (theta^- = stopgrad theta), i ~ p(i)
lognormal over the ascending Karras grid of N(k) points, lambda = 1/(sigma_{i+1} - sigma_i) and d the per-sample
Pseudo-Huber metric with c = 0.00054 sqrt(d).
"""
from typing import Optional

import torch
from torch import Tensor

from fastcm._checks import IMPLS, check_choice, check_real, check_tensor
from fastcm.ops import pseudo_huber_loss

from .precond import find_cm
from .schedule import ict_num_scales, ict_weights, karras_sigmas, lognormal_pair_probs, pseudo_huber_c


class ICTLoss:
    """Callable returning the unreduced (B,) iCT loss; the trainer takes the mean (EDM ``EDMLoss`` style).

    Args:
        total_steps: K, the planned number of training steps (sets the N(k) curriculum).
        s0, s1: initial and final number of discretization intervals (iCT: 10, 1280).
        P_mean, P_std: the lognormal over sigma that p(i) discretizes (iCT: -1.1, 2.0).
        rho: Karras grid exponent (7).
        c: Pseudo-Huber constant; None uses 0.00054 * sqrt(C*H*W) of the batch.
        impl: backend of the Pseudo-Huber op ("auto", "triton", "torch").
    sigma_min and sigma_max of the grid come from the ConsistencyModel the loss is called with.
    """

    def __init__(self, total_steps: int, s0: int = 10, s1: int = 1280, P_mean: float = -1.1, P_std: float = 2.0,
                 rho: float = 7.0, c: Optional[float] = None, *, impl: str = "auto"):
        ict_num_scales(0, total_steps, s0, s1)  # validates K, s0, s1
        lognormal_pair_probs(torch.tensor([1.0, 2.0]), P_mean, P_std)  # validates P_mean, P_std
        if c is not None:
            check_real("c (None for iCT's 0.00054 sqrt(d))", c, positive=True)
        check_choice("impl", impl, IMPLS)
        self.total_steps, self.s0, self.s1 = int(total_steps), int(s0), int(s1)
        self.P_mean, self.P_std, self.rho = float(P_mean), float(P_std), float(rho)
        self.c = None if c is None else float(c)
        self.impl = impl
        self._grid = {}  # (N, sigma_min, sigma_max) -> (sigmas, p, lambda), float64 on the CPU

    def num_scales(self, step: int) -> int:
        """N(k): the number of noise levels at training step k."""
        return ict_num_scales(step, self.total_steps, self.s0, self.s1)

    def grid(self, step: int, sigma_min: float = 0.002, sigma_max: float = 80.0):
        """(sigmas (N,), p(i) (N-1,), lambda (N-1,)) at step k, float64 CPU tensors (cached per N)."""
        key = (self.num_scales(step), sigma_min, sigma_max)
        if key not in self._grid:
            sigmas = karras_sigmas(key[0], sigma_min, sigma_max, self.rho)
            self._grid[key] = (sigmas, lognormal_pair_probs(sigmas, self.P_mean, self.P_std), ict_weights(sigmas))
        return self._grid[key]

    def __call__(self, model, x: Tensor, step: int, class_labels: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Per-sample loss (B,) in fp32 for images x (B, C, H, W) in [-1, 1] at training step ``step``.

        ``model`` is a ConsistencyModel (optionally compiled / DDP-wrapped) and is called twice. ``generator``
        (any device) drives i, z and the dropout seed; None uses torch's global RNG.
        """
        check_tensor("x", x, ndim=4)
        cm = find_cm(model)
        sigmas, p, lam = self.grid(step, cm.sigma_min, cm.sigma_max)
        B, dev = x.shape[0], (generator.device if generator is not None else x.device)
        i = torch.multinomial(p.to(dev), B, replacement=True, generator=generator)  # i in [0, N-2]
        z = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
        # One seed per step, passed to both passes: the dropout masks are identical on any device (fastcm.nn).
        seed = torch.randint(0, 2**31 - 1, (), generator=generator, device=dev).to(x.device)
        acc = torch.promote_types(x.dtype, torch.float32)
        i = i.to(sigmas.device)
        sigma_lo, sigma_hi = sigmas[i].to(x.device, acc), sigmas[i + 1].to(x.device, acc)
        weight = lam[i].to(x.device, acc)  # lambda(sigma_i) = 1/(sigma_{i+1} - sigma_i), from the float64 grid
        view = (-1, 1, 1, 1)
        student = model(x + sigma_hi.view(view) * z, sigma_hi, class_labels, dropout_seed=seed)
        with torch.no_grad():  # theta^- = stopgrad(theta): iCT drops the EMA teacher (mu = 0)
            target = model(x + sigma_lo.view(view) * z, sigma_lo, class_labels, dropout_seed=seed)
        c = self.c if self.c is not None else pseudo_huber_c(x.shape[1:])
        return pseudo_huber_loss(student, target, c, weight=weight, reduction="none", per="sample", impl=self.impl)
