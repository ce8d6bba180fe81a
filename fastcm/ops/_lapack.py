"""Symmetric LAPACK routines torch does not bind (or binds through a slower path on CPU), called through
scipy.linalg.lapack for fp64 CPU tensors; every function has a torch fallback for other devices and dtypes, or
when scipy is missing. Used by the Frechet distance and the FD loss; tested against torch in tests/test_lapack.py.
``impl`` ("auto", "scipy", "torch") picks the route: "auto" takes LAPACK where it can (use_lapack), "torch" never
touches scipy, "scipy" insists on it (and says why when it cannot).

Why (measured side by side at d = 2048, fp64, 2 threads, AMD EPYC; torch 2.13's CPU LAPACK is MKL):
  - values only: dsyevr (blocked dsytrd + dsterf) 0.26-0.29 s vs torch.linalg.eigvalsh 0.31-0.49 s;
  - Cholesky: dpotrf 0.05 s vs torch.linalg.cholesky_ex 0.07 s;
  - M^(-1/2) applied to a (d, B) block without forming eigenvectors of M: M = Q T Q^T (dsytrd, Q kept as
    Householder reflectors), T = Z diag(lambda) Z^T (dstevd on the tridiagonal), then Q Z f(lambda) Z^T Q^T X by two
    reflector sweeps (dormqr) and two GEMMs: 0.6-0.7 s with B = 256, vs torch.linalg.eigh 0.86-1.06 s (whose
    d x d back-transformation Q Z alone is 2 d^3 flops).
Copies: inputs are never modified unless a function says ``overwrite``.
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor

try:
    from scipy.linalg import lapack
except ImportError:  # pragma: no cover - scipy is a runtime dependency; kept optional for minimal installs
    lapack = None

F64 = torch.float64


IMPLS = ("auto", "scipy", "torch")


def use_lapack(*tensors: Tensor, impl: str = "auto") -> bool:
    """True when scipy's LAPACK takes these tensors in place of torch: with impl="auto" when it can (CPU, fp64, no
    autograd graph, scipy installed), never with impl="torch"; impl="scipy" raises when it cannot."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    ok = all(t.device.type == "cpu" and t.dtype == F64 and not t.requires_grad for t in tensors)
    if impl == "scipy" and (lapack is None or not ok):
        why = "scipy is not installed" if lapack is None else "it takes float64 CPU tensors without autograd"
        raise ValueError(f"impl='scipy' (LAPACK through scipy) cannot run here: {why}; use impl='torch'")
    return lapack is not None and ok


def cholesky_lower(s: Tensor, impl: str = "auto") -> Optional[Tensor]:
    """Lower Cholesky factor L (L L^T = s, lower triangle of s read) or None when s is not positive definite."""
    if use_lapack(s, impl=impl):
        c, info = lapack.dpotrf(s.numpy(), lower=1, clean=1)
        return torch.from_numpy(c) if info == 0 and np.isfinite(c.diagonal()).all() else None
    chol, info = torch.linalg.cholesky_ex(s)
    return chol if int(info) == 0 and bool(torch.isfinite(chol.diagonal()).all()) else None


def eigvalsh_lower(m: Tensor, overwrite: bool = False, impl: str = "auto") -> Tensor:
    """Ascending eigenvalues of the symmetric matrix whose lower triangle is m's (LAPACK dsyevr, values only).
    ``overwrite=True`` lets LAPACK destroy m when m is column-major (saves a d x d copy)."""
    if m.shape[-1] == 0:  # LAPACK refuses an empty matrix; it has no eigenvalues
        return m.new_zeros(0)
    if not use_lapack(m, impl=impl):
        return torch.linalg.eigvalsh(m, UPLO="L")
    w, _, _, _, info = lapack.dsyevr(_fortran(m), compute_v=0, lower=1, overwrite_a=int(overwrite))
    if info != 0:  # pragma: no cover - LAPACK's internal convergence failure
        raise RuntimeError(f"LAPACK dsyevr failed with info={info}")
    return torch.from_numpy(w)


def congruence_lower(chol: Tensor, s: Tensor) -> Tensor:
    """L^T S L in the lower triangle (LAPACK dsygst, itype 3, ~d^3 flops), for fp64 CPU L (lower triangular) and
    symmetric S (lower triangle read). Column-major operands: a is a private copy of S (overwritten by the result),
    b = L as LAPACK sees it (torch's Cholesky factor already is column-major, so usually no copy)."""
    a = np.array(s.numpy(), order="F")  # always a copy (asfortranarray would hand back a 1 x 1 input itself)
    c, info = lapack.dsygst(a, np.asfortranarray(chol.numpy()), itype=3, lower=1, overwrite_a=1)
    _check(info, "dsygst")
    return torch.from_numpy(c)


class TridiagonalEigh:
    """M = Q T Q^T = (Q Z) diag(lam) (Q Z)^T for symmetric M (lower triangle read), with Q kept as LAPACK's
    Householder reflectors and Z the eigenvectors of the tridiagonal T; ``apply(x, scale)`` computes
    U diag(scale) U^T x for x (d, k) with U = Q Z, never forming U (see the module docstring)."""

    def __init__(self, m: Tensor, overwrite: bool = False):
        if not use_lapack(m):
            raise ValueError("TridiagonalEigh needs a float64 CPU tensor and scipy")
        d = m.shape[0]
        if d == 1:  # no reflectors, T = M
            self.reflectors, self.lam, self.z = None, m.reshape(1).clone(), torch.ones(1, 1, dtype=F64)
            return
        lwork = int(lapack.dsytrd_lwork(d, lower=1)[0])
        c, diag, off, tau, info = lapack.dsytrd(_fortran(m), lower=1, lwork=max(lwork, 1),
                                                overwrite_a=int(overwrite))
        _check(info, "dsytrd")
        lam, z, info = lapack.dstevd(diag, off, compute_v=1, overwrite_d=1, overwrite_e=1)
        _check(info, "dstevd")
        # dsytrd(uplo='L') stores reflector i below the subdiagonal of column i: Q = diag(1, Q') where Q' is the
        # QR-style product of the (d-1) x (d-1) block c[1:, :-1] (what LAPACK's dormtr hands to dormqr).
        self.reflectors, self.tau = np.asfortranarray(c[1:, :-1]), tau
        self.lam, self.z = torch.from_numpy(lam), torch.from_numpy(z)

    def apply(self, x: Tensor, scale: Tensor) -> Tensor:
        """U diag(scale) U^T x for x (d, k): Q^T x, Z^T, scale, Z, Q (reflector sweeps are ~2 d^2 k flops each)."""
        y = self._reflect(x, "T")
        y = self.z @ (scale.unsqueeze(1) * (self.z.mT @ y))
        return self._reflect(y, "N")

    def _reflect(self, x: Tensor, trans: str) -> Tensor:
        out = np.array(x.numpy(), dtype=np.float64, order="F")  # a private copy
        if self.reflectors is not None:
            k = out.shape[1]
            lwork = max(1, k * 64)  # room for the blocked (nb = 64) reflector application
            cq, _, info = lapack.dormqr("L", trans, self.reflectors, self.tau, out[1:], lwork=lwork)
            _check(info, "dormqr")
            out[1:] = cq
        return torch.from_numpy(out)


class DenseEigh:
    """The same interface as TridiagonalEigh with explicit eigenvectors (torch.linalg.eigh of the lower triangle):
    the route for GPUs, other dtypes, or without scipy."""

    def __init__(self, m: Tensor):
        self.lam, self.u = torch.linalg.eigh(m, UPLO="L")

    def apply(self, x: Tensor, scale: Tensor) -> Tensor:
        """U diag(scale) U^T x for x (d, k)."""
        return self.u @ (scale.unsqueeze(1) * (self.u.mT @ x))


def factored_eigh(m: Tensor, overwrite: bool = False):
    """Eigenvalues ``.lam`` and ``.apply(x, scale)`` of the symmetric matrix whose lower triangle is m's:
    TridiagonalEigh (U never formed) where LAPACK can take m, DenseEigh elsewhere."""
    return TridiagonalEigh(m, overwrite=overwrite) if use_lapack(m) else DenseEigh(m)


def _fortran(m: Tensor) -> np.ndarray:
    a = m.numpy()
    return a if a.flags.f_contiguous else np.asfortranarray(a)


def _check(info: int, name: str) -> None:
    if info != 0:  # pragma: no cover - invalid arguments or LAPACK's internal convergence failure
        raise RuntimeError(f"LAPACK {name} failed with info={info}")
