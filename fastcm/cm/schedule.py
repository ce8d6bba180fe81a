"""iCT discretization (Song & Dhariwal 2023, Sec. 3.4-3.5): Karras sigmas in ascending order, the exponential
curriculum N(k), the lognormal distribution p(i) over adjacent pairs, and the weighting lambda = 1/(sigma_{i+1} -
sigma_i). Everything is computed in float64: near sigma_min the steps of a 1281-point grid are ~4e-5 wide.
"""
import math

import torch
from torch import Tensor

from fastcm._checks import check_ascending, check_int, check_real


def karras_sigmas(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None) -> Tensor:
    """The N Karras noise levels, ascending (iCT numbering): sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (
    sigma_max^(1/rho) - sigma_min^(1/rho)))^rho for i = 1..N, so sigma_1 = sigma_min and sigma_N = sigma_max.

    Returns a float64 tensor of shape (N,).
    """
    N = check_int("N", N, 2)
    sigma_min, sigma_max, rho = check_real("sigma_min", sigma_min, positive=True), \
        check_real("sigma_max", sigma_max, positive=True), check_real("rho", rho, positive=True)
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min} and {sigma_max}")
    ramp = torch.linspace(0, 1, N, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max  # exact endpoints despite pow rounding
    return sigmas


def ict_num_scales(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum: N(k) = min(s0 * 2^floor(k / K'), s1) + 1 with
    K' = floor(K / (log2 floor(s1 / s0) + 1)). For K = 400k: 11, 21, 41, ..., 1281, each for 50k steps.
    """
    k = check_int("k", k, 0)
    K = check_int("total_steps", total_steps, 1)
    s0, s1 = check_int("s0", s0, 1), check_int("s1", s1, 1)
    if s1 < s0:
        raise ValueError(f"s1 must be >= s0, got s0={s0}, s1={s1}")
    K_prime = max(1, math.floor(K / (math.log2(s1 // s0) + 1)))
    # 2^floor(k/K') can be astronomically large past the end of training: cap the exponent before shifting.
    doublings = min(k // K_prime, s1.bit_length())
    return min(s0 * 2**doublings, s1) + 1


def lognormal_pair_probs(sigmas: Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """p(i) for the N-1 adjacent pairs (sigma_i, sigma_{i+1}) of an ascending grid: the lognormal(P_mean, P_std)
    mass on [sigma_i, sigma_{i+1}], p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_i -
    P_mean) / (sqrt2 P_std)), normalized to sum to 1. Returns float64 (N-1,).
    """
    check_ascending("sigmas", sigmas, positive=True)
    check_real("P_std", P_std, positive=True)
    check_real("P_mean", P_mean)
    s = sigmas.to(torch.float64)
    cdf = torch.erf((s.log() - P_mean) / (math.sqrt(2.0) * P_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def ict_weights(sigmas: Tensor) -> Tensor:
    """lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) for each adjacent pair of an ascending grid: (N-1,)."""
    check_ascending("sigmas", sigmas)
    return 1.0 / (sigmas[1:] - sigmas[:-1])


def pseudo_huber_c(shape) -> float:
    """iCT's Pseudo-Huber constant c = 0.00054 sqrt(d), d = C*H*W (0.0299 for 3x32x32, 0.0599 for 3x64x64)."""
    d = 1
    for s in shape:
        d *= check_int("shape entry", s, 1)
    return 0.00054 * math.sqrt(d)
