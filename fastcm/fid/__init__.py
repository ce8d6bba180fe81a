"""FID: the only path from images to a Fréchet distance, as an exact metric and as a differentiable loss.

Images are in the sampler's range [-1, 1] everywhere (``fid(..., image_range=(0, 1))`` takes [0, 1] floats; uint8
is 0..255).

    fid, compute_stats, dataset_stats            FID between images, datasets, features, statistics or files
    FeatureStats                                 streaming fp64 mean / covariance; merge, all_reduce; the one
                                                 statistics file format (pytorch-fid's .npz layout, safetensors)
    feature_extractor, FEATURES                  pixels, digits (small CNN, cached), inception, digits-heldout
                                                 (a second digits CNN: the held-out judge)
    inception_v3, FIDInceptionV3                 FID Inception-v3 (pytorch-fid's weight file, local path only)
    FDLoss, fd_loss_full_ref                     differentiable FD against reference statistics (batch/queue/ema)
    all_gather_with_grad                         differentiable all-gather keeping each rank's local gradient (DDP)
    frechet_distance, FrechetReference           the exact fp64 Fréchet distance (the op lives in fastcm.ops)
"""
from fastcm.ops import FrechetReference, frechet_distance

from .distributed import all_gather_with_grad
from .features import FEATURES, DigitsFeatures, PixelFeatures, digits_feature_network, feature_extractor
from .inception import WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, FIDInceptionV3, inception_v3
from .loss import FDLoss, fd_loss_full_ref
from .metric import compute_stats, dataset_stats, fid
from .stats import FeatureStats, is_stats_file

__all__ = ["fid", "compute_stats", "dataset_stats", "FeatureStats", "is_stats_file", "FEATURES", "feature_extractor",
           "PixelFeatures", "DigitsFeatures", "digits_feature_network", "inception_v3", "FIDInceptionV3",
           "WEIGHTS_ENV", "WEIGHTS_FILE", "WEIGHTS_URL", "FDLoss", "fd_loss_full_ref", "all_gather_with_grad",
           "frechet_distance", "FrechetReference"]
