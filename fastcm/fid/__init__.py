"""FID as an exact metric and as a differentiable loss.

    frechet_distance, trace_sqrt_product, sqrtm   exact fp64 Frechet distance and the matrix square root (fastcm.ops)
    FrechetReference                              a reference with its Cholesky factor cached, for repeated FIDs
    FeatureStats                                  streaming fp64 mean / covariance; merge, all_reduce, .npz/.safetensors
    FDLoss                                        differentiable FD against reference statistics (batch / queue / ema)
    all_gather_with_grad                          differentiable all-gather keeping each rank's local gradient (DDP)
    inception_v3, FIDInceptionV3                  FID Inception-v3 (pytorch-fid's weight file, local path only)
    fid, compute_stats                            FID between images, features, statistics or statistics files
"""
from fastcm.ops.frechet import FrechetReference, frechet_distance, trace_sqrt_product
from fastcm.ops.sqrtm import sqrtm, sqrtm_ref

from .distributed import all_gather_with_grad
from .inception import WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, FIDInceptionV3, inception_v3
from .loss import FDLoss, fd_loss_full_ref
from .metric import compute_stats, fid
from .stats import FeatureStats

__all__ = ["frechet_distance", "trace_sqrt_product", "FrechetReference", "sqrtm", "sqrtm_ref", "FeatureStats", "FDLoss",
           "fd_loss_full_ref", "all_gather_with_grad", "inception_v3", "FIDInceptionV3", "WEIGHTS_ENV",
           "WEIGHTS_FILE", "WEIGHTS_URL", "fid", "compute_stats"]
