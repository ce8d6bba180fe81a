"""Consistency models, paper-exact iCT (Song & Dhariwal 2023): parametrization, discretization, loss,
samplers and zero-shot editing; the continuous-time methods beside it: sCT in TrigFlow (Lu & Song 2025,
fastcm.cm.sct) and MeanFlow (Geng et al. 2025, fastcm.cm.meanflow); one API over all three in fastcm.cm.methods.
The networks live in :mod:`fastcm.models`; they never see sigma (EMA lives in fastcm.train).
"""
from .editing import block_average, colorize, denoise, inpaint, luminance, super_resolution
from .ict import ict_sample
from .loss import ICTLoss
from .meanflow import (MeanFlowLoss, MeanFlowModel, meanflow_adaptive_loss, meanflow_sample, meanflow_sample_times,
                       meanflow_target)
from .methods import METHOD_KEY, METHODS, Method, get_method, method_from_metadata, method_of_model
from .precond import ConsistencyModel, cm_coefficients
from .sampling import ICT_SIGMA_MAX, ICT_TWO_STEP_SIGMA, resolve_seeds, sample
from .schedule import ict_num_scales, ict_weights, karras_sigmas, lognormal_pair_probs, pseudo_huber_c
from .sct import (AdaptiveWeight, SCTLoss, TrigFlowModel, normalize_tangent, sct_adaptive_loss, sct_sample,
                  sct_sample_t, sct_tangent, tangent_warmup, trigflow_interpolate, trigflow_sigma, trigflow_time)

__all__ = [
    "ConsistencyModel", "cm_coefficients", "karras_sigmas", "ict_num_scales", "lognormal_pair_probs", "ict_weights",
    "pseudo_huber_c", "ICTLoss", "ict_sample", "sample", "resolve_seeds", "ICT_SIGMA_MAX", "ICT_TWO_STEP_SIGMA", "inpaint", "colorize", "super_resolution",
    "denoise", "luminance", "block_average",
    "TrigFlowModel", "AdaptiveWeight", "SCTLoss", "sct_sample", "sct_sample_t", "sct_tangent", "normalize_tangent",
    "tangent_warmup", "sct_adaptive_loss", "trigflow_time", "trigflow_sigma", "trigflow_interpolate",
    "MeanFlowModel", "MeanFlowLoss", "meanflow_sample", "meanflow_sample_times", "meanflow_target",
    "meanflow_adaptive_loss",
    "Method", "METHODS", "METHOD_KEY", "get_method", "method_from_metadata", "method_of_model",
]
