"""Consistency models, paper-exact iCT (Song & Dhariwal 2023): parametrization, discretization, loss,
samplers and zero-shot editing. The networks live in :mod:`fastcm.models`; they never see sigma.
"""
from .editing import block_average, colorize, denoise, inpaint, luminance, super_resolution
from .loss import ICTLoss
from .precond import ConsistencyModel, cm_coefficients
from .sampling import resolve_seeds, sample
from .schedule import ict_num_scales, ict_weights, karras_sigmas, lognormal_pair_probs, pseudo_huber_c

__all__ = [
    "ConsistencyModel", "cm_coefficients", "karras_sigmas", "ict_num_scales", "lognormal_pair_probs", "ict_weights",
    "pseudo_huber_c", "ICTLoss", "sample", "resolve_seeds", "inpaint", "colorize", "super_resolution",
    "denoise", "luminance", "block_average",
]
