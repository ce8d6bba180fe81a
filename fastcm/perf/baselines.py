"""The Fréchet-distance routes of other FID implementations, as baselines: the benchmarks time fastcm against them
and the tests check fastcm's value against them (one copy for both)."""
import numpy as np
import scipy.linalg
import torch


def frechet_scipy_sqrtm(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's, clean-fid's and EDM2's route: ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr Re sqrtm(S1 S2), with
    scipy's general (Schur) matrix square root of the non-symmetric product."""
    covmean = scipy.linalg.sqrtm(np.asarray(sigma1) @ np.asarray(sigma2))
    return float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace() - 2 * np.trace(covmean).real)


def frechet_eigvals(mu1, sigma1, mu2, sigma2) -> float:
    """torchmetrics' route: the trace of sqrt(S1 S2) as sum Re sqrt(eigvals(S1 S2)) (general eigensolver), in the
    inputs' dtype (fastcm.ops.frechet_distance_ref is the same formula, differentiable)."""
    from fastcm.ops import frechet_distance_ref

    return float(frechet_distance_ref(torch.as_tensor(mu1), torch.as_tensor(sigma1), torch.as_tensor(mu2),
                                      torch.as_tensor(sigma2)))
