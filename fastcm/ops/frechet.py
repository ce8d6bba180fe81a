"""Exact Frechet distance between Gaussians N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; FID, Heusel et al.
2017):

    FD = ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)

Only the trace of the square root is needed, and it is a sum over eigenvalues: with S1 = L L^T (Cholesky),
S1 S2 = L (L^T S2 L) L^(-1) is similar to the symmetric PSD matrix M = L^T S2 L, so

    tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(M))        (lambda from a symmetric eigvalsh, clamped at 0)

The whole method is one Cholesky (d^3/3 flops), the congruence L^T S2 L and one values-only eigvalsh (on CPU, LAPACK
dsyevr and dpotrf through scipy: faster than torch's MKL calls on the EPYC measured, see ops/_lapack.py). On CPU the
congruence is LAPACK's dsygst (itype 3, ~d^3 flops: half of two general matmuls; through scipy.linalg.lapack when
scipy is installed), elsewhere a block-triangular product in torch (~4/3 d^3). No scipy sqrtm (14-16 s at d = 2048
on a 2-core CPU, and wrong in scipy 1.11.2-1.12), no general eigvals (3-4.5 s, complex arithmetic), no NaN:
everything is fp64 and symmetric. Like LAPACK, only the lower triangles of S1 and S2 are read; they are checked to
be symmetric (SYM_TOL) first.

Singular covariances (fewer samples than features) are exact too: when S1 has no Cholesky factor, S2 is factored
instead (the trace is symmetric in S1, S2); when neither has one, S1 = F F^T with F = V_r diag(sqrt(lambda_r)) over
S1's non-null eigenpairs (eigh) and M = F^T S2 F is rank(S1) x rank(S1). Eigenvalues of M at rounding level are
counted as 0 (null_threshold); a zero covariance (a collapsed distribution) has rank 0 and a zero trace term, so two
constant feature sets are ||mu1 - mu2||^2 apart.

The op contract: ``frechet_distance(..., impl=)`` with impl "auto" (LAPACK through scipy for fp64 CPU tensors,
torch.linalg elsewhere: what CUDA tensors take), "scipy" or "torch" (never touches scipy); ``frechet_distance_ref``
is the readable reference (a general eigensolver on S1 S2); ``make_inputs`` feeds the registry (fastcm.ops.REGISTRY).
``__all__`` lists the linear-algebra pieces the FD loss (fastcm.fid.loss) builds on: they are public API.
"""
import numpy as np
import torch
from torch import Tensor

from ._lapack import IMPLS, cholesky_lower, congruence_lower, eigvalsh_lower, factored_eigh, use_lapack

__all__ = ["frechet_distance", "frechet_distance_ref", "trace_sqrt_product", "FrechetReference", "make_inputs",
           "check_gaussian", "whitening", "psd_factor", "null_threshold", "symmetrize_lower", "congruence",
           "eigvalsh_lower", "factored_eigh", "IMPLS"]

# Symmetry of a covariance is checked to this relative tolerance (covariances built in fp32 are symmetric only to
# rounding); negative eigenvalues below -PSD_TOL * max(lambda) mean an input is not a covariance.
SYM_TOL = 1e-5
PSD_TOL = 1e-6
_BLOCK = 256  # column block of the torch triangular congruence (large enough for efficient GEMMs)


class FrechetOverflowError(ValueError):
    """The distance of finite statistics lies beyond the fp64 range (raised by :func:`frechet_distance`)."""


def frechet_distance(mu1, sigma1, mu2, sigma2, impl: str = "auto") -> Tensor:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), exact in fp64.

    Args:
        mu1, mu2: means, shape (d,); sigma1, sigma2: covariances, shape (d, d), symmetric positive semi-definite
            (rank-deficient or zero is fine: two zero covariances give ||mu1 - mu2||^2). torch tensors or numpy
            arrays, any floating dtype (computed in fp64).
        impl: "auto" (LAPACK through scipy for CPU tensors, torch.linalg elsewhere), "scipy" or "torch".
    Returns a float64 0-d tensor on the inputs' device. Round-off can make the exact value 0 come out as about
    -1e-12 * (tr S1 + tr S2); such values are returned as 0 (the distance is never negative). Statistics of any
    finite magnitude work (covariances of 1e200 or 1e-200 are rescaled by an exact power of two first); a distance
    beyond the fp64 range raises FrechetOverflowError (a ValueError).
    """
    use_lapack(impl=impl)  # validates impl
    mu1, sigma1, mu2, sigma2 = _validate(mu1, sigma1, mu2, sigma2)
    (mu1, sigma1, mu2, sigma2), k = _rescale(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    t = trace_sqrt_product(sigma1, sigma2, impl=impl, _checked=True)
    fd = torch.ldexp((diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * t).clamp(min=0.0), diff.new_tensor(k))
    if not bool(torch.isfinite(fd)):
        raise FrechetOverflowError(f"the Frechet distance of these statistics exceeds the fp64 range (covariances up to "
                         f"2^{k}): rescale the features")
    return fd


# Statistics whose variances (or squared means) lie outside [2^-SAFE_EXPONENT, 2^SAFE_EXPONENT] are rescaled first.
SAFE_EXPONENT = 256


def _rescale(mu1, sigma1, mu2, sigma2):
    """((mu1, sigma1, mu2, sigma2) / (2^(k/2), 2^k), k) with 2^k near the largest variance or squared mean, when
    it is far from 1 (else k = 0 and no copy). The FD is homogeneous of degree 2 in the feature scale (mu -> a mu,
    sigma -> a^2 sigma gives FD -> a^2 FD), and a power of two scales exactly, so FD = 2^k FD(scaled) without
    rounding, where covariances of 1e200 would overflow inside LAPACK's products."""
    top = max(float(s.diagonal().max()) for s in (sigma1, sigma2))
    mu_top = max(float(m.abs().max()) for m in (mu1, mu2))
    exps = [int(torch.frexp(torch.tensor(top, dtype=torch.float64))[1])] if top > 0 else []
    exps += [2 * int(torch.frexp(torch.tensor(mu_top, dtype=torch.float64))[1])] if mu_top > 0 else []
    k = max(exps, default=0)
    if abs(k) <= SAFE_EXPONENT:
        return (mu1, sigma1, mu2, sigma2), 0
    k += k % 2  # even, so the means scale by the power of two 2^(k/2)
    return (torch.ldexp(mu1, mu1.new_tensor(-k // 2)), torch.ldexp(sigma1, sigma1.new_tensor(-k)),
            torch.ldexp(mu2, mu2.new_tensor(-k // 2)), torch.ldexp(sigma2, sigma2.new_tensor(-k))), k


def frechet_distance_ref(mu1, sigma1, mu2, sigma2) -> Tensor:
    """Readable reference (torchmetrics' form): ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 sum Re sqrt(eig(S1 S2)), with a
    general (complex) eigensolver, in the inputs' dtype, differentiable. Rank-deficient products leave
    sqrt(rounding noise) ~ 1e-8 per null eigenvalue: compare singular cases with closed forms, not with this."""
    diff = mu1 - mu2
    root = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return diff @ diff + sigma1.diagonal().sum() + sigma2.diagonal().sum() - 2.0 * root


def make_inputs(case: str, device="cpu", dtype=torch.float64, requires_grad: bool = False) -> dict:
    """(mu1, sigma1, mu2, sigma2) of two Gaussians with covariances of 2d samples (full rank); ``requires_grad``
    marks the covariances for the reference's backward (the op itself is a metric, without gradient)."""
    d = {"digits": 64, "inception192": 192, "inception768": 768, "inception": 2048}[case]
    g = torch.Generator().manual_seed(d)
    out = {}
    for i in (1, 2):
        x = torch.randn(2 * d, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, d, dtype=torch.float64)
        out[f"mu{i}"] = x.mean(0).to(device, dtype)
        out[f"sigma{i}"] = torch.cov(x.T).to(device, dtype).requires_grad_(requires_grad)
    return out


make_inputs.cases = ("digits", "inception192", "inception768", "inception")


def trace_sqrt_product(sigma1, sigma2, impl: str = "auto", _checked: bool = False) -> Tensor:
    """tr (sigma1 sigma2)^(1/2) for symmetric PSD (d, d) matrices, in fp64 (see the module docstring)."""
    if not _checked:
        sigma1, sigma2 = (check_gaussian(torch.zeros(s.shape[-1]), s, ("mu", name))[1]
                          for s, name in ((sigma1, "sigma1"), (sigma2, "sigma2")))
    factor, triangular, other, name = _factor(sigma1, sigma2, impl)
    if factor.shape[1] == 0:  # a zero covariance: (S1 S2)^(1/2) = 0
        return other.new_zeros(())
    if triangular:
        m, _ = congruence(factor, other, impl)
    else:
        other = symmetrize_lower(other)
        m = factor.mT @ other @ factor
    return _sum_sqrt_eigvals(m, name, impl)


class FrechetReference:
    """Reference statistics (mu_ref, sigma_ref) with the reference-side Cholesky factor computed once, for
    comparing many statistics against one reference (FID evaluations during training): ``distance(mu, sigma)``
    then costs one congruence and one eigvalsh. Same value as frechet_distance(mu, sigma, mu_ref, sigma_ref).
    A singular reference (no Cholesky factor), or statistics whose scale needs another rescaling than the
    reference's (frechet_distance's ``_rescale``), fall back to frechet_distance."""

    def __init__(self, mu_ref, sigma_ref, impl: str = "auto"):
        use_lapack(impl=impl)
        self.mu, self.sigma = check_gaussian(mu_ref, sigma_ref, ("mu_ref", "sigma_ref"))
        self.impl = impl
        self.chol = cholesky_lower(self.sigma, impl) if _rescale(self.mu, self.sigma, self.mu, self.sigma)[1] == 0 \
            else None  # far from unit scale: frechet_distance rescales each pair
        self.trace = self.sigma.trace()

    def distance(self, mu, sigma) -> Tensor:
        mu, sigma = check_gaussian(mu, sigma, ("mu", "sigma"))
        if mu.shape != self.mu.shape or mu.device != self.mu.device:
            raise ValueError(f"mu must have shape {tuple(self.mu.shape)} on {self.mu.device}, got "
                             f"{tuple(mu.shape)} on {mu.device}")
        if self.chol is None or _rescale(mu, sigma, self.mu, self.sigma)[1] != 0:
            return frechet_distance(mu, sigma, self.mu, self.sigma, impl=self.impl)
        trace_sqrt = _sum_sqrt_eigvals(congruence(self.chol, sigma, self.impl)[0], "sigma", self.impl)
        diff = mu - self.mu
        return (diff @ diff + sigma.trace() + self.trace - 2.0 * trace_sqrt).clamp(min=0.0)


def _sum_sqrt_eigvals(m: Tensor, name: str, impl: str = "auto") -> Tensor:
    """sum sqrt(lambda) over the eigenvalues of the private symmetric matrix m (lower triangle read, overwritten),
    those at rounding level counted as 0; a clearly negative one means ``name`` is not PSD."""
    lam = eigvalsh_lower(m, overwrite=True, impl=impl)
    _check_psd(lam, name)
    return lam.where(lam > null_threshold(lam), 0.0).sqrt().sum()


def null_threshold(lam: Tensor) -> Tensor:
    """Eigenvalues at or below n * eps * max|lambda| are within eigvalsh's rounding error of 0 (its absolute
    error is a small multiple of eps * ||M||): they are set to 0 rather than contributing sqrt(rounding noise),
    ~1e-8 each, which is what makes singular covariances drift in other implementations."""
    return lam.numel() * torch.finfo(lam.dtype).eps * lam.abs().max()


def congruence(chol: Tensor, s: Tensor, impl: str = "auto"):
    """(M, uplo): M = L^T S L for lower-triangular L and symmetric S (lower triangle read), valid in the triangle
    ``uplo`` of M. LAPACK dsygst on CPU when scipy is available (impl "auto" or "scipy"), else congruence_torch."""
    if use_lapack(s, chol, impl=impl):
        return congruence_lower(chol, s), "L"
    return congruence_torch(chol, s), "L"


def congruence_torch(chol: Tensor, s: Tensor) -> Tensor:
    """L^T S L in torch, lower triangle only, skipping L's zero blocks (about 4/3 d^3 flops instead of 4 d^3).

    P = S L column block by column block, P[:, J] = S[:, j0:] L[j0:, J] (rows of L above j0 are 0); then row block
    I of M = L^T P is L[i0:, I]^T P[i0:, :i1] (columns up to the diagonal block: eigvalsh reads the lower part)."""
    s = symmetrize_lower(s)
    d = s.shape[0]
    p = torch.empty_like(s)
    for j0 in range(0, d, _BLOCK):
        j1 = min(j0 + _BLOCK, d)
        p[:, j0:j1] = s[:, j0:] @ chol[j0:, j0:j1]
    m = torch.zeros_like(s)
    for i0 in range(0, d, _BLOCK):
        i1 = min(i0 + _BLOCK, d)
        m[i0:i1, :i1] = chol[i0:, i0:i1].mT @ p[i0:, :i1]
    return m


def whitening(sigma: Tensor, name: str = "sigma", impl: str = "auto"):
    """(W, r, is_triangular): an invertible (d, d) W whose first r columns F = W[:, :r] factor sigma = F F^T (lower
    triangle of the symmetric PSD sigma read). The Cholesky factor (r = d) when sigma is positive definite; else
    W = V diag(s) over sigma's eigenvectors, the r eigenvalues above rounding level first with s = sqrt(lambda),
    the null space after with s = 1 (so W^(-T) = V diag(1 / s)). ``sigma`` is a covariance already checked by
    check_gaussian (fp64, symmetric); raises ValueError naming ``name`` when it has clearly negative eigenvalues."""
    chol = cholesky_lower(sigma, impl)
    # A Cholesky factor with a pivot L_jj^2 at rounding level (it bounds the smallest eigenvalue from above) is a
    # singular sigma that rounding made look definite: W^(-T) would amplify round-off by 1 / L_jj.
    if chol is not None and bool(chol.diagonal().square().min() > null_threshold(sigma.diagonal())):
        return chol, sigma.shape[0], True
    return (*_eigen_whitening(sigma, name), False)


def psd_factor(sigma: Tensor, name: str = "sigma", impl: str = "auto"):
    """(F, is_triangular) with F F^T = sigma for a symmetric PSD matrix: the (d, d) Cholesky factor, or the
    (d, rank) factor V_r diag(sqrt(lambda_r)) over the eigenvalues above rounding level (see whitening)."""
    w, r, triangular = whitening(sigma, name, impl)
    return w[:, :r], triangular


def _eigen_whitening(sigma: Tensor, name: str):
    """(W, r) of whitening's eigenvector branch (eigh of the lower triangle)."""
    lam, v = torch.linalg.eigh(sigma)
    _check_psd(lam, name)
    keep = lam > null_threshold(lam)  # drop the null space from F: F^T S F then has no null eigenvalues of S1's
    order = torch.cat([keep.nonzero(), (~keep).nonzero()]).flatten()
    scale = torch.where(keep, lam.clamp(min=0.0).sqrt(), 1.0)[order]
    return v[:, order] * scale, int(keep.sum())


def _factor(sigma1: Tensor, sigma2: Tensor, impl: str = "auto"):
    """(F, F is triangular, S, name of S) with F F^T one covariance and S the other, so that the trace term is
    sum sqrt eig(F^T S F). Prefers a Cholesky factor of either covariance; eigh only when neither is definite."""
    for s_f, s_o, name in ((sigma1, sigma2, "sigma2"), (sigma2, sigma1, "sigma1")):
        chol = cholesky_lower(s_f, impl)
        if chol is not None:
            return chol, True, s_o, name
    w, r = _eigen_whitening(sigma1, "sigma1")  # both Choleskys failed above: no third try
    return w[:, :r], False, sigma2, "sigma2"


def symmetrize_lower(s: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is s's (the triangle LAPACK reads)."""
    return torch.tril(s) + torch.tril(s, -1).mT


def _check_psd(lam: Tensor, name: str) -> None:
    if lam.numel() == 0:
        return
    top = lam.abs().max()
    if bool(lam.min() < -PSD_TOL * top):
        raise ValueError(f"{name} is not positive semi-definite: eigenvalue {lam.min().item():.3g} against a "
                         f"largest of {top.item():.3g} (of {name} or a matrix congruent to it)")


def _as_fp64(name: str, x) -> Tensor:
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {str(x.dtype).replace('torch.', '')}")
    return x.detach().to(torch.float64).contiguous()


def check_gaussian(mu, sigma, names=("mu", "sigma")):
    """Validate a mean (d,) and covariance (d, d) (tensors or numpy arrays; finite, symmetric to SYM_TOL, no
    negative variance) and return them as contiguous fp64 tensors (the covariance is not copied when it already
    is one). The checks cost O(d^2) streaming passes, nothing like the O(d^3) that follows."""
    mu, sigma = _as_fp64(names[0], mu), _as_fp64(names[1], sigma)
    if mu.dim() != 1 or mu.numel() == 0:
        raise ValueError(f"{names[0]} must be a non-empty 1-D tensor (d,), got shape {tuple(mu.shape)}")
    d = mu.shape[0]
    if tuple(sigma.shape) != (d, d):
        raise ValueError(f"{names[1]} must have shape ({d}, {d}) to match {names[0]} of shape ({d},), "
                         f"got {tuple(sigma.shape)}")
    if mu.device != sigma.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on one device, got {mu.device} and {sigma.device}")
    for name, x in zip(names, (mu, sigma)):
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):  # one pass when all is well
            raise ValueError(f"{name} contains NaN or inf")
    _check_symmetric(names[1], sigma)
    return mu, sigma


def _check_symmetric(name: str, s: Tensor) -> None:
    """Relative asymmetry ||S - S^T||_F / ||S||_F, estimated with two fixed random probes V (E||A V||_F^2 =
    2 ||A||_F^2): two contiguous matrix products instead of a transposed d x d pass."""
    diag = s.diagonal()
    if bool((diag < 0).any()):
        raise ValueError(f"{name} has a negative variance on its diagonal, so it is not a covariance")
    g = torch.Generator().manual_seed(0)
    v = torch.randn(s.shape[0], 2, generator=g, dtype=s.dtype).to(s.device)
    sv, svt = s @ v, (v.mT @ s).mT
    scale = torch.linalg.matrix_norm(sv).clamp(min=torch.finfo(s.dtype).tiny)
    asym = (torch.linalg.matrix_norm(sv - svt) / scale).item()
    if asym > SYM_TOL:
        raise ValueError(f"{name} must be symmetric: ||S - S^T|| / ||S|| is about {asym:.3g}, above {SYM_TOL:g}")


def _validate(mu1, sigma1, mu2, sigma2):
    mu1, sigma1 = check_gaussian(mu1, sigma1, ("mu1", "sigma1"))
    mu2, sigma2 = check_gaussian(mu2, sigma2, ("mu2", "sigma2"))
    if mu2.shape != mu1.shape:
        raise ValueError(f"mu2 must have shape {tuple(mu1.shape)} to match mu1, got {tuple(mu2.shape)}")
    if mu1.device != mu2.device:
        raise ValueError(f"mu1 and mu2 must be on one device, got {mu1.device} and {mu2.device}")
    return mu1, sigma1, mu2, sigma2
