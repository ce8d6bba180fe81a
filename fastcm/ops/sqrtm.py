"""Matrix square root of symmetric positive semi-definite matrices, batched, with a stable backward.

    sqrtm(A)          coupled Newton-Schulz (Higham 2008, eq. 6.35) after Frobenius pre-scaling; Triton kernel
                      (kernels/sqrtm.py) fusing each step's matmuls with the (3I - ZY)/2 epilogue; backward solves
                      the Lyapunov equation  X dA + dA X = G  (X = sqrt(A)) by the same kind of coupled iteration
                      (Lin & Maji, BMVC 2017): Newton-Schulz on the sign of [[B, C], [0, -B]].
    sqrtm_ref(A)      eigendecomposition V diag(sqrt(max(lambda, 0))) V^T; backward in the eigenbasis with the
                      Daleckii-Krein divided difference 1 / (sqrt(lambda_i) + sqrt(lambda_j)), which stays finite for
                      repeated eigenvalues (autograd through eigh does not: 1 / (lambda_i - lambda_j)).
    sqrtm_newton_schulz(A)   the same Newton-Schulz iteration in plain torch (autograd unrolls it).

Newton-Schulz converges for any SPD matrix once scaled by its Frobenius norm; an eigenvalue lambda of
A / ||A||_F reaches full accuracy after about log(1 / lambda) / log(2.25) + 5 steps, so the number of steps
sets the condition number that is resolved (accuracy table in the README and in tests/test_sqrtm.py).
Null eigenvalues stay exactly 0 (square roots of PSD matrices are fine); the backward needs A positive definite,
because d sqrt(lambda) / d lambda is unbounded at 0.
"""
import torch
from torch import Tensor

from . import _describe
from ._jvp import JvpRule, has_tangent
from fastcm._checks import check_bool, check_int

from ._utils import check_tensor, resolve_impl

NUM_ITERS = 30  # resolves condition numbers up to ~1e8 in fp64 (see the accuracy table)


def sqrtm(a: Tensor, num_iters: int = NUM_ITERS, psd_projection: bool = False, impl: str = "auto") -> Tensor:
    """Principal square root of symmetric PSD matrices ``a`` of shape (..., n, n).

    Args:
        a: symmetric positive semi-definite matrices (fp16/bf16/fp32 compute in fp32, fp64 in fp64). An eigenvalue
            below ``-PSD_RTOL * ||a||_F`` (1e-5 in fp32, 1e-12 in fp64: round-off of a singular covariance) raises
            a ValueError naming the most negative eigenvalue; eigenvalues within that tolerance are taken as 0.
        num_iters: Newton-Schulz steps (Triton path only); 30 resolves eigenvalues down to ~1e-8 * ||a||_F.
        psd_projection: project onto the PSD cone instead of raising (negative eigenvalues set to 0).
        impl: "auto" (Triton Newton-Schulz on CUDA, the eigendecomposition reference elsewhere), "triton"
            or "torch" (the reference).
    Returns sqrt(a) in a's dtype and shape. Gradients flow to ``a`` (Lyapunov backward; needs a positive definite).
    The eigenvalue check needs a host sync and runs in eager mode only (not under torch.compile).
    Forward-mode AD (torch.func.jvp, forward_ad): A' maps to X' with X X' + X' X = A' (Daleckii-Krein on the eigen
    route, the Lyapunov Newton-Schulz solver on the Triton route, which raises under torch.compile: pytorch#192985).
    """
    _validate(a, num_iters, psd_projection)
    if resolve_impl(impl, a) == "torch":
        return _sqrtm_eig(a, psd_projection)
    if not torch.compiler.is_compiling() and not _within_psd_tolerance(a):
        if not psd_projection:
            _raise_if_not_psd(torch.linalg.eigvalsh(a.to(torch.promote_types(a.dtype, torch.float32))), a)
        return _sqrtm_eig(a, True)  # the projection: Newton-Schulz has no meaning for an indefinite matrix
    x = _flat(a)
    if has_tangent(x):  # torch.func.jvp / forward_ad: X' solves X X' + X' X = A' (the Lyapunov solver)
        out = _JVP.apply(x, int(num_iters))
    else:
        out = torch.ops.fastcm.sqrtm_fwd(x, int(num_iters))
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
        # Eigenvalues slightly below 0 (within the tolerance, or any with psd_projection) grow by 9/4 per step in
        # Newton-Schulz and overflow; the eigendecomposition projects them to 0 instead.
        return _sqrtm_eig(a, True)
    return out.reshape(a.shape).to(a.dtype)


def sqrtm_ref(a: Tensor) -> Tensor:
    """Reference: V diag(sqrt(max(lambda, 0))) V^T from ``torch.linalg.eigh`` (reads the lower triangle), with the
    Daleckii-Krein backward. Computes in fp32 (fp64 for fp64 input) and returns a's dtype. Projects onto the PSD
    cone without checks (``sqrtm`` checks)."""
    return _sqrtm_eig(a, True)


def _sqrtm_eig(a: Tensor, psd_projection: bool) -> Tensor:
    acc = torch.promote_types(a.dtype, torch.float32)
    fn = _SqrtmEigJvp if has_tangent(a) else _SqrtmEig  # Dynamo refuses a Function with a jvp: only when needed
    return fn.apply(a.to(acc), psd_projection)[0].to(a.dtype)


PSD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _raise_if_not_psd(lam: Tensor, a: Tensor) -> None:
    """ValueError when an eigenvalue lies below -PSD_RTOL * ||a||_F (eager mode only: it needs a host sync)."""
    if torch.compiler.is_compiling() or lam.numel() == 0:
        return
    acc = torch.promote_types(a.dtype, torch.float32)
    tol = PSD_RTOL[acc] * torch.linalg.matrix_norm(a.to(acc), "fro")
    worst = lam.amin(-1)
    if bool((worst < -tol).any()):
        lam_min = worst.min().item()
        raise ValueError(f"a must be positive semi-definite: its most negative eigenvalue is {lam_min:.4g} (below "
                         f"-{PSD_RTOL[acc]:g} * ||a||_F); pass psd_projection=True to set negative eigenvalues to 0")


def _within_psd_tolerance(a: Tensor) -> bool:
    """The Triton route's check: a Cholesky factorisation of a + tol I (tol = PSD_RTOL * ||a||_F) succeeds exactly
    when no eigenvalue lies below -tol (one factorisation, ~1/3 of one Newton-Schulz matmul)."""
    acc = torch.promote_types(a.dtype, torch.float32)
    a = a.to(acc)
    tol = PSD_RTOL[acc] * torch.linalg.matrix_norm(a, "fro", keepdim=True)
    eye = torch.eye(a.shape[-1], dtype=acc, device=a.device)
    return not bool((torch.linalg.cholesky_ex(a + tol * eye).info > 0).any())


def sqrtm_newton_schulz(a: Tensor, num_iters: int = NUM_ITERS) -> Tensor:
    """The coupled Newton-Schulz iteration written with torch matmuls (the kernel's step-by-step reference).

    Gradients are autograd through the unrolled iteration (the derivative of the approximation)."""
    acc = torch.promote_types(a.dtype, torch.float32)
    a = a.to(acc)
    norm = torch.linalg.matrix_norm(a, "fro", keepdim=True)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    eye = torch.eye(a.shape[-1], dtype=acc, device=a.device)
    y, z = a / norm, eye.expand_as(a)
    for _ in range(num_iters):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return (y * norm.sqrt()).to(a.dtype)


def lyapunov_newton_schulz(x: Tensor, grad: Tensor, num_iters: int = NUM_ITERS) -> Tensor:
    """Solve  x W + W x = grad  for W, with x symmetric positive definite (x = sqrt(A), so W = dL/dA).

    Newton-Schulz for the matrix sign of [[B, C], [0, -B]] (B = x / s, C = grad / s) converges to [[I, 2W], [0, -I]]
    (Higham 2008, Thm. 5.2 / Lin & Maji 2017): B <- B (3I - B^2) / 2,  C <- (C (3I - B^2) - B^2 C + B C B) / 2.
    The scale s = ||x^2||_F^(1/2) puts the eigenvalues of B in (0, 1], as the forward pre-scaling does."""
    s = torch.linalg.matrix_norm(x @ x, "fro", keepdim=True).sqrt()
    s = torch.where(s > 0, s, torch.ones_like(s))
    b, c = x / s, grad / s
    eye3 = 3.0 * torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(num_iters):
        b2 = b @ b
        c = 0.5 * (c @ (eye3 - b2) - b2 @ c + b @ c @ b)
        b = 0.5 * b @ (eye3 - b2)
    return 0.5 * c


def _daleckii_krein(v: Tensor, s: Tensor, e: Tensor) -> Tensor:
    """V [ (V^T E V) / (s_i + s_j) ] V^T: the derivative of sqrt at A = V diag(s^2) V^T in direction E, and (the
    map being self-adjoint) the gradient for an output gradient E. Pairs of null eigenvalues (s_i + s_j = 0) have
    no finite derivative: they get 0."""
    denom = s.unsqueeze(-1) + s.unsqueeze(-2)
    inner = v.mT @ e @ v
    ok = denom > 0
    inner = torch.where(ok, inner / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(inner))
    return v @ inner @ v.mT


class _SqrtmEig(torch.autograd.Function):
    @staticmethod
    def forward(a, psd_projection):
        lam, v = torch.linalg.eigh(a)
        if not psd_projection:
            _raise_if_not_psd(lam, a)
        s = lam.clamp(min=0).sqrt()
        return (v * s.unsqueeze(-2)) @ v.mT, v, s

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, v, s = output
        ctx.mark_non_differentiable(v, s)
        ctx.save_for_backward(v, s)
        ctx.save_for_forward(v, s)

    @staticmethod
    def backward(ctx, grad, _v, _s):
        v, s = ctx.saved_tensors
        return _daleckii_krein(v, s, grad.contiguous()), None


class _SqrtmEigJvp(_SqrtmEig):
    @staticmethod
    def jvp(ctx, a_dot, _):
        v, s = ctx.saved_tensors
        return _daleckii_krein(v, s, a_dot), None, None


def _flat(a: Tensor) -> Tensor:
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    n = a.shape[-1]
    return a.reshape(-1, n, n).to(acc).contiguous()


def _validate(a, num_iters, psd_projection) -> None:
    check_tensor("a", a, min_ndim=2)
    if a.shape[-1] != a.shape[-2] or a.shape[-1] == 0:
        raise ValueError(f"a must be a batch of non-empty square matrices (..., n, n), got shape {tuple(a.shape)}")
    check_int("num_iters", num_iters)
    check_bool("psd_projection", psd_projection)
    if torch.compiler.is_compiling() or a.numel() == 0:
        return  # value checks need a host sync; they run in eager mode only
    if not bool(torch.isfinite(a).all()):
        raise ValueError("a contains NaN or inf")
    scale = a.abs().amax().clamp(min=torch.finfo(a.dtype).tiny)
    tol = 1e-5 if a.dtype != torch.float64 else 1e-10
    asym = ((a - a.mT).abs().amax() / scale).item()
    if asym > tol:
        raise ValueError(f"a must be symmetric: max |a - a^T| / max |a| = {asym:.3g} exceeds {tol:g}")


# ----------------------------------------------------------------------------------------------------------------
# Triton path as torch.library custom ops: the whole iteration is one opaque op for torch.compile, and so is the
# Lyapunov backward (matmul-only torch code; on CUDA it runs on cuBLAS).

@torch.library.custom_op("fastcm::sqrtm_fwd", mutates_args=())
def _sqrtm_fwd(a: Tensor, num_iters: int) -> Tensor:
    from fastcm.kernels.sqrtm import sqrtm_fwd

    return sqrtm_fwd(a, num_iters)


@_sqrtm_fwd.register_fake
def _(a, num_iters):
    return torch.empty_like(a)


@torch.library.custom_op("fastcm::sqrtm_bwd", mutates_args=())
def _sqrtm_bwd(x: Tensor, grad: Tensor, num_iters: int) -> Tensor:
    return lyapunov_newton_schulz(x, grad, num_iters)


@_sqrtm_bwd.register_fake
def _(x, grad, num_iters):
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.num_iters = inputs[1]


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.fastcm.sqrtm_bwd(x, grad.contiguous().to(x.dtype), ctx.num_iters), None


_sqrtm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _tangent(inputs, output, tangents):
    # d sqrt(A)[A'] = X' with X X' + X' X = A' (X = sqrt(A)): the Sylvester equation the backward solves.
    return torch.ops.fastcm.sqrtm_bwd(output, tangents[0].contiguous(), inputs[1])


_JVP = JvpRule("sqrtm", torch.ops.fastcm.sqrtm_fwd, _setup_context, _backward, _tangent)


def make_inputs(case: str, device="cpu", dtype=torch.float32, requires_grad: bool = True) -> dict:
    """Batches of SPD matrices Q diag(lambda) Q^T with lambda log-spaced over [1e-3, 1] (condition number 1e3):
    the covariance-pooling sizes and a small FID-feature block."""
    shapes = {"tiny": (2, 16), "cov64": (8, 64), "cov256": (4, 256), "cov512": (1, 512)}
    batch, n = shapes[case]
    g = torch.Generator().manual_seed(n)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(-3, 0, n, dtype=torch.float64)
    a = (q * lam) @ q.mT
    a = ((a + a.mT) / 2).to(device=device, dtype=dtype)
    return dict(a=a.requires_grad_(requires_grad))


make_inputs.cases = ("tiny", "cov64", "cov256", "cov512")


# ----------------------------------------------------------------------------------------------------------------
# Fast-ops contract declarations (fastcm/ops/_describe.py): minimum work per call and the compile gate's launches.
# The Triton route is the forward; its backward and tangent solve the Lyapunov equation with torch matmuls.
# Minimum: read a, write sqrt(a); the coupled Newton-Schulz iteration's 3 n x n matmuls per step (the last step
# skips Z's), 2 n^3 FLOPs each (Higham 2008, eq. 6.35).

AOT_DTYPES = (torch.float32, torch.float64)


def min_work(direction: str, a: Tensor, num_iters: int = NUM_ITERS, **_) -> "_describe.Work":
    if direction != "fwd":
        raise ValueError(f"direction must be one of ['fwd'] (the backward and tangent run torch matmuls), "
                         f"got {direction!r}")
    G, n = a.shape[0], a.shape[-1]
    return _describe.Work(2 * _describe.nbytes(a), 2 * n ** 3 * G * (3 * num_iters - 1))


def aot_calls(image_shape=None) -> list:
    """Covariance-pooling batches and the FID feature covariance (2048)."""
    return [dict(a=_describe.meta(G, n, n)) for G, n in ((8, 64), (1, 512), (1, 2048))]


def aot_jobs(call: dict, dtypes, sm_counts=()):
    """The Newton-Schulz forward, fp32 under both of torch's matmul settings (IEEE FMA and TF32 tiles)."""
    from fastcm.kernels import sqrtm as kernels
    G, n = call["a"].shape[0], call["a"].shape[-1]
    for dtype in (d for d in dtypes if d in AOT_DTYPES):
        for precision in _describe.fp32_precisions(dtype):
            def run(dtype=dtype, precision=precision):
                with _describe.fp32_matmul(precision):
                    kernels.sqrtm_fwd(_describe.meta(G, n, n, dtype=dtype), 2)
            yield _describe.Job("sqrtm", f"{G}x{n}x{n}" + (f" fp32 matmuls {precision}" if precision else ""), dtype,
                                "sqrtm", run)
