"""The Frechet distance as a training loss against fixed reference statistics (mu_r, Sigma_r).

    FD = ||mu_g - mu_r||^2 + tr Sigma_g + tr Sigma_r - 2 tr (Sigma_r Sigma_g)^(1/2)

Three ways to estimate the generated statistics (mu_g, Sigma_g) from a batch X (B, d) that carries gradient:

batch   the batch alone. With C = (X - mean)/sqrt(B - 1), tr (Sigma_r Sigma_g)^(1/2) = sum sqrt(lambda(K)) for the
        B x B matrix K = C Sigma_r C^T (eig(AB) = eig(BA); FastFID, Mathiasen & Hvilshoj 2020), O(d^2 B + B^3)
        instead of O(d^3). Centring makes K 1 = 0: that null eigenvalue (and any at rounding level) is masked,
        since sqrt has no derivative at 0. Exact gradient dT/dC = K^(+1/2) C Sigma_r. Biased: rank <= B - 1.
queue   Sigma_g of the last ``queue_size`` features (FD-loss, Yang et al. 2026): the current batch with gradient,
        the rest detached; the batch is enqueued after the loss. Features are whitened once, y = (x - mu_r) W with
        an invertible W whose first r columns F factor Sigma_r = F F^T (the Cholesky factor, r = d; for a singular
        reference, e.g. fewer reference images than feature dims or dead feature units, W = V diag(s) over Sigma_r's
        eigenvectors, range first with s = sqrt(lambda), null space after with s = 1). M = F^T Sigma_g F, the
        leading r x r block of cov(y), has the non-zero eigenvalues of Sigma_r Sigma_g, so the trace and its
        gradient are exact for any rank; cov(y) is kept as fp64 running sums (rank-B updates per step, no d^3
        matmul), and the full y gives back mu_g - mu_r = W^(-T) mean(y). The trace
        needs one symmetric eigendecomposition of M per step; the gradient to the batch rows is
        2 (Y - ybar) G / (n - 1) with G = M^(-1/2) / 2, applied as (Y - ybar) U diag(1/sqrt(lambda)) U^T; on CPU
        U = Q Z stays factored (Householder reflectors of the tridiagonal reduction, eigenvectors of T).
ema     moments as exponential moving averages (beta = ema_beta, bias-corrected), gradient through the current
        batch's (1 - beta) share; same whitened fp64 machinery as the queue.

``normalize=True`` returns FD / (FD.detach() + 0.01), FD-loss's scale normalization: the gradient direction of FD
with a magnitude that stays steady as FD shrinks. Under torch.distributed the features of all ranks are gathered
first (all_gather_with_grad: each rank back-propagates into its own rows), so every rank sees the same global
batch, computes the same loss and keeps identical queue / EMA state.
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from fastcm._checks import check_bool, check_int, is_real
from fastcm.ops import sqrtm_ref
from fastcm.ops.frechet import check_gaussian, eigvalsh_lower, factored_eigh, null_threshold, symmetrize_lower, whitening

from .distributed import all_gather_with_grad, distributed_world

MODES = ("batch", "queue", "ema")
F64 = torch.float64


def normalize_fd(fd: Tensor) -> Tensor:
    """FD-loss's scale normalisation FD / (FD.detach() + 0.01): the gradient direction of FD at a step size that
    does not depend on FD's scale (the value is ~1; log the FD itself)."""
    return fd / (fd.detach() + 0.01)


class FDLoss(nn.Module):
    """Differentiable Frechet distance of feature batches to reference statistics (see the module docstring).

    Args:
        mu_ref, sigma_ref: reference mean (d,) and covariance (d, d) (tensors or numpy arrays; kept in fp64).
        mode: "batch", "queue" or "ema".
        queue_size: features kept by the queue (FD-loss: 50k).
        ema_beta: decay of the EMA moments.
        normalize: return FD / (FD.detach() + 0.01).
        queue_dtype: storage of the queued (whitened) features; fp32 halves memory (50k x 2048: 410 MB), fp64 is
            exact. Running sums are fp64 either way and add/subtract exactly the stored values.
        process_group: torch.distributed group to gather features over (None: the default group).
        distributed: gather across ranks; None = whenever torch.distributed is initialized with > 1 rank.
    ``fd(features)`` returns the loss (fp64 scalar) for features (B, d) on the module's device; pass
    ``update=False`` to leave the queue / EMA state unchanged (e.g. for evaluation).
    """

    def __init__(self, mu_ref, sigma_ref, mode: str = "batch", queue_size: int = 50_000, ema_beta: float = 0.999,
                 normalize: bool = False, queue_dtype: torch.dtype = torch.float32, process_group=None,
                 distributed: Optional[bool] = None):
        super().__init__()
        _check_options(mode, queue_size, ema_beta, normalize, queue_dtype)
        mu, sigma = check_gaussian(mu_ref, sigma_ref, ("mu_ref", "sigma_ref"))
        sigma = symmetrize_lower(sigma)
        self.mode, self.queue_size, self.ema_beta, self.normalize = mode, queue_size, float(ema_beta), normalize
        self.queue_dtype, self.process_group, self.distributed = queue_dtype, process_group, distributed
        self.dim = mu.numel()
        self.register_buffer("mu_ref", mu, persistent=False)
        self.register_buffer("sigma_ref", sigma, persistent=False)
        self.register_buffer("trace_ref", sigma.trace(), persistent=False)
        self.rank, self.triangular = self.dim, True
        if mode != "batch":
            w, self.rank, self.triangular = whitening(sigma, "sigma_ref")
            self.register_buffer("whiten", w, persistent=False)
            # W = V diag(s) (orthogonal V) has W^(-T) = V diag(1 / s) = W / s^2 column by column, s_j = ||W[:, j]||
            self.register_buffer("unwhiten_t", None if self.triangular else w / w.square().sum(0), persistent=False)
        self.reset()

    @classmethod
    def from_stats(cls, stats, **kwargs) -> "FDLoss":
        """FDLoss against a :class:`fastcm.fid.FeatureStats` (or anything with ``mu`` and ``sigma``)."""
        return cls(stats.mu, stats.sigma, **kwargs)

    def reset(self) -> None:
        """Forget the queue / EMA state (buffers are allocated on the module's device at the next call)."""
        for name in ("queue", "queue_sq", "sum_yy", "sum_y", "sum_sq", "ema_m2", "ema_m1", "ema_sq"):
            self.register_buffer(name, None, persistent=False)
        self.count = self.ptr = self.steps = 0

    @property
    def n(self) -> int:
        """Features in the queue (queue mode) or EMA updates so far (ema mode)."""
        return self.steps if self.mode == "ema" else self.count

    def forward(self, features: Tensor, update: bool = True) -> Tensor:
        x = self._features(features)
        if self.mode == "batch":
            fd = self._batch(x)
        elif self.mode == "queue":
            fd = self._queue(x, update)
        else:
            fd = self._ema(x, update)
        return normalize_fd(fd) if self.normalize else fd

    @torch.no_grad()
    def enqueue(self, features: Tensor) -> None:
        """Add features to the queue / EMA without computing a loss (e.g. to fill the queue before training)."""
        if self.mode == "batch":
            raise ValueError("enqueue() needs mode='queue' or mode='ema'")
        y, sq = self._whiten(self._features(features.detach()))
        if self.mode == "queue":
            if y.shape[0] > self.queue_size:  # only the newest queue_size rows would survive
                y, sq = y[-self.queue_size:], sq[-self.queue_size:]
            pos, s_yy, s_y, s_sq, n_old = self._queue_rest(y.shape[0])
            self._queue_push(y, sq, pos, torch.addmm(s_yy, y.T, y), s_y + y.sum(0), s_sq, n_old)
        else:
            self._ema_push(y, sq)

    # -- the three estimators ----------------------------------------------------------------------------------
    def _batch(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        if b < 2:
            raise ValueError(f"mode='batch' needs at least 2 features per (global) batch, got {b}")
        mu = x.mean(0)
        xc = x - mu
        xc = xc - xc.mean(0)  # a second pass removes the rounding residue of the mean (keeps K 1 = 0 exact)
        c = xc / math.sqrt(b - 1)
        t = _BatchTraceSqrt.apply(c, self.sigma_ref)
        return (mu - self.mu_ref).square().sum() + c.square().sum() + self.trace_ref - 2.0 * t

    def _queue(self, x: Tensor, update: bool) -> Tensor:
        b = x.shape[0]
        if b > self.queue_size:
            raise ValueError(f"a (global) batch of {b} features does not fit a queue of {self.queue_size}")
        y, sq = self._whiten(x)
        pos, s_yy, s_y, s_sq, n_old = self._queue_rest(b)
        n = n_old + b
        if n < 2:
            raise ValueError("the queue holds fewer than 2 features: use a batch of at least 2 or enqueue() first")
        r = math.sqrt(n / (n - 1)) / n  # m = r * sum(y) makes m m^T = n ybar ybar^T / (n - 1)
        with torch.no_grad():  # the moments after enqueueing: the loss's M and, if update, the new state
            yd = y.detach()
            s_yy_new, s_y_new = torch.addmm(s_yy, yd.T, yd), s_y + yd.sum(0)
            m = s_y_new * r
            mat = torch.addr(s_yy_new, m, m, beta=1.0 / (n - 1), alpha=-1.0)  # (S - n ybar ybar^T) / (n - 1)
        t = self._trace(y, mat, m, 1.0 / (n - 1), r)
        delta = self._unwhiten((s_y + y.sum(0)) / n)  # mu_g - mu_r
        trace_g = (s_sq + sq.sum() - n * delta.square().sum()) / (n - 1)
        if update:
            self._queue_push(yd, sq.detach(), pos, s_yy_new, s_y_new, s_sq, n_old)
        return delta.square().sum() + trace_g + self.trace_ref - 2.0 * t

    def _queue_rest(self, b: int):
        """Positions the next b rows go to, and the fp64 sums (and count) of the rows that stay."""
        self._allocate()
        pos = (self.ptr + torch.arange(b, device=self.queue.device)) % self.queue_size
        old = pos[pos < self.count] if self.count < self.queue_size else pos  # rows the batch replaces
        y_old = self.queue[old].to(F64)
        return (pos, torch.addmm(self.sum_yy, y_old.T, y_old, alpha=-1.0), self.sum_y - y_old.sum(0),
                self.sum_sq - self.queue_sq[old].sum(), self.count - old.numel())

    @torch.no_grad()
    def _queue_push(self, y, sq, pos, s_yy_new, s_y_new, s_sq, n_old) -> None:
        """Store rows ``y`` (already rounded to the queue dtype by _whiten) whose sums are in s_yy_new, s_y_new."""
        self.queue[pos], self.queue_sq[pos] = y.to(self.queue_dtype), sq
        self.sum_yy, self.sum_y, self.sum_sq = s_yy_new, s_y_new, s_sq + sq.sum()
        self.count, self.ptr = n_old + y.shape[0], (self.ptr + y.shape[0]) % self.queue_size

    def _ema(self, x: Tensor, update: bool) -> Tensor:
        b, beta = x.shape[0], self.ema_beta
        y, sq = self._whiten(x)
        self._allocate()
        k = 1.0 / (1.0 - beta ** (self.steps + 1))  # bias correction of the zero-initialized averages
        share = k * (1.0 - beta) / b                # weight of each current row in the corrected moments
        with torch.no_grad():
            yd = y.detach()
            m2_new = torch.addmm(self.ema_m2, yd.T, yd, beta=beta, alpha=(1.0 - beta) / b)
            m1_new = beta * self.ema_m1 + (1.0 - beta) * yd.mean(0)
            m = k * m1_new
            mat = torch.addr(m2_new, m, m, beta=k, alpha=-1.0)  # k E[y y^T] - m m^T
        t = self._trace(y, mat, m, share, share)
        delta = self._unwhiten(k * beta * self.ema_m1 + share * y.sum(0))
        trace_g = k * beta * self.ema_sq + share * sq.sum() - delta.square().sum()
        if update:
            self.ema_m2, self.ema_m1 = m2_new, m1_new
            self.ema_sq = beta * self.ema_sq + (1.0 - beta) * sq.detach().mean()
            self.steps += 1
        return delta.square().sum() + trace_g + self.trace_ref - 2.0 * t

    @torch.no_grad()
    def _ema_push(self, y, sq) -> None:
        self._allocate()
        beta = self.ema_beta
        self.ema_m1 = beta * self.ema_m1 + (1 - beta) * y.mean(0)
        self.ema_m2 = torch.addmm(self.ema_m2, y.T, y, beta=beta, alpha=(1 - beta) / y.shape[0])
        self.ema_sq = beta * self.ema_sq + (1 - beta) * sq.mean()
        self.steps += 1

    # -- helpers -----------------------------------------------------------------------------------------------
    def _trace(self, y: Tensor, mat: Tensor, m: Tensor, c: float, c2: float) -> Tensor:
        """tr (Sigma_r Sigma_g)^(1/2) from the leading rank(Sigma_r) block of the whitened moments (see _TraceSqrt);
        0 for a zero reference covariance."""
        r = self.rank
        if r == 0:
            return y.new_zeros(())
        if r < self.dim:
            y, mat, m = y[:, :r], mat[:r, :r], m[:r]
        return _TraceSqrt.apply(y, mat, m, c, c2)

    def _features(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise TypeError(f"features must be a floating torch.Tensor, got {type(features).__name__}"
                            + (f" of dtype {features.dtype}" if isinstance(features, Tensor) else ""))
        if features.dim() != 2 or features.shape[1] != self.dim or features.shape[0] == 0:
            raise ValueError(f"features must have shape (B, {self.dim}) with B >= 1, got {tuple(features.shape)}")
        if self.mu_ref.dtype != F64:
            raise TypeError("FDLoss keeps its statistics in float64; it was cast to "
                            f"{self.mu_ref.dtype} (.half()/.float() on a parent module?): rebuild it or call .double()")
        if features.device != self.mu_ref.device:
            raise ValueError(f"features are on {features.device} but the FDLoss buffers on {self.mu_ref.device}; "
                             "move the loss with .to(device)")
        gather = self.distributed if self.distributed is not None else distributed_world(self.process_group) > 1
        x = all_gather_with_grad(features, self.process_group) if gather else features
        if not bool(torch.isfinite(x.detach()).all()):
            raise ValueError("features contain NaN or inf")
        return x.to(F64)

    def _whiten(self, x: Tensor):
        """y = (x - mu_r) W, so cov(y) = W^T Sigma_g W (its leading r x r block has the non-zero eigenvalues of
        Sigma_r Sigma_g), and ||x - mu_r||^2.

        y is rounded to the queue dtype with a straight-through gradient, so the loss sees each row exactly as it
        is stored and the running sums add (and later subtract) exactly the same values."""
        xr = x - self.mu_ref
        y = xr @ self.whiten
        if self.mode == "queue" and self.queue_dtype != F64:
            y = y + (y.detach().to(self.queue_dtype).to(F64) - y.detach())
        return y, xr.square().sum(1)

    def _allocate(self) -> None:
        dev, d = self.mu_ref.device, self.dim
        if self.mode == "queue" and self.queue is None:
            self.queue = torch.zeros(self.queue_size, d, dtype=self.queue_dtype, device=dev)
            self.queue_sq = torch.zeros(self.queue_size, dtype=F64, device=dev)
            self.sum_yy, self.sum_y = torch.zeros(d, d, dtype=F64, device=dev), torch.zeros(d, dtype=F64, device=dev)
            self.sum_sq = torch.zeros((), dtype=F64, device=dev)
        if self.mode == "ema" and self.ema_m2 is None:
            self.ema_m2, self.ema_m1 = torch.zeros(d, d, dtype=F64, device=dev), torch.zeros(d, dtype=F64, device=dev)
            self.ema_sq = torch.zeros((), dtype=F64, device=dev)

    def _unwhiten(self, y_mean: Tensor) -> Tensor:
        """The raw-space mean offset delta with delta W = y_mean (y = (x - mu_r) W)."""
        if not self.triangular:
            return self.unwhiten_t @ y_mean
        return torch.linalg.solve_triangular(self.whiten.mT, y_mean.unsqueeze(1), upper=True).squeeze(1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, mode={self.mode!r}, queue_size={self.queue_size}, ema_beta={self.ema_beta}, "
                f"normalize={self.normalize}")


class _BatchTraceSqrt(torch.autograd.Function):
    """T = sum sqrt(lambda_+(K)), K = C Sigma_r C^T, for centred scaled features C (B, d); gradient to C."""

    @staticmethod
    def forward(ctx, c, sigma_ref):
        p = c @ sigma_ref
        k = p @ c.T
        lam, u = torch.linalg.eigh((k + k.T) * 0.5)
        keep = lam > null_threshold(lam)
        keep[0] = False  # the centring null eigenvalue (eigh sorts ascending): a true 0 whatever its rounding
        root = lam.where(keep, 0.0).sqrt()
        ctx.save_for_backward(p, u, root, keep)
        return root.sum()

    @staticmethod
    def backward(ctx, grad):
        p, u, root, keep = ctx.saved_tensors
        inv = torch.where(keep, 1.0 / root.where(keep, 1.0), 0.0)
        return grad * ((u * inv) @ (u.T @ p)), None  # K^(+1/2) C Sigma_r


class _TraceSqrt(torch.autograd.Function):
    """T = tr sqrt(M) for M = A + c Y^T Y - m m^T with m = a + c2 Y^T 1 (queue and EMA moments), gradient to Y.

    M is built by the caller without autograd (fused addmm / addr, the same matrix becomes the new running state),
    so Y and m only feed the backward: dT/dY = 2 (c Y - c2 1 m^T) G with G = dT/dM = M^(-1/2) / 2, applied as
    ((c Y - c2 m) U) diag(1 / sqrt(lambda)) U^T over the eigenvalues above rounding level (never a d x d G).
    M is symmetric by construction; one triangle is read and M is overwritten."""

    @staticmethod
    def forward(ctx, y, mat, m, c, c2):
        eig = None
        # mat is a private temporary of the caller, symmetric: LAPACK may work in place on its transpose (which is
        # column-major, so no copy), reading its upper triangle as the lower one of mat.mT.
        if not ctx.needs_input_grad[0]:
            lam = eigvalsh_lower(mat.mT, overwrite=True)
        else:  # on CPU fp64 the tridiagonal route: U = Q Z is never formed (fastcm/ops/_lapack.py)
            eig = factored_eigh(mat.mT, overwrite=True)
            lam = eig.lam
        keep = lam > null_threshold(lam)
        root = lam.where(keep, 0.0).sqrt()
        if eig is not None:
            ctx.save_for_backward(y, m, root, keep)
            ctx.eig, ctx.c, ctx.c2 = eig, c, c2
        return root.sum()

    @staticmethod
    def backward(ctx, grad):
        y, m, root, keep = ctx.saved_tensors
        inv = torch.where(keep, 1.0 / root.where(keep, 1.0), 0.0)
        w = ctx.c * y - ctx.c2 * m
        return grad * ctx.eig.apply(w.mT, inv).mT, None, None, None, None


def fd_loss_full_ref(features: Tensor, mu_ref: Tensor, sigma_ref: Tensor, sqrt_ref: Optional[Tensor] = None,
                     detached: Optional[Tensor] = None) -> Tensor:
    """Readable reference: FD of (features [+ detached rows]) against (mu_ref, sigma_ref) by autograd through the
    full d x d route of FD-loss: R = Sigma_r^(1/2) (pass ``sqrt_ref`` to precompute it), Sigma_g = cov, then
    sum sqrt(eigvalsh(R Sigma_g R)) with eigenvalues at rounding level masked (their sqrt has no derivative)."""
    x = features.to(F64)
    if detached is not None:
        x = torch.cat([detached.to(F64).detach(), x])
    mu = x.mean(0)
    sigma_g = torch.cov(x.T)
    r = sqrt_ref if sqrt_ref is not None else sqrtm_ref(sigma_ref.to(F64))
    m = r @ sigma_g @ r
    lam = torch.linalg.eigvalsh((m + m.T) * 0.5)
    keep = lam > null_threshold(lam.detach())
    t = lam.where(keep, 1.0).sqrt().where(keep, 0.0).sum()
    return (mu - mu_ref).square().sum() + sigma_g.trace() + sigma_ref.trace() - 2.0 * t


def _check_options(mode, queue_size, ema_beta, normalize, queue_dtype) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_int("queue_size", queue_size, 2)
    if not (is_real(ema_beta) and 0.0 <= ema_beta < 1.0):
        raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta!r}")
    check_bool("normalize", normalize)
    if queue_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"queue_dtype must be torch.float32 or torch.float64, got {queue_dtype}")
