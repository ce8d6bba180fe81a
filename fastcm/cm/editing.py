"""Zero-shot image editing with a consistency model (CM, Song et al. 2023, Algorithm 4).

Given an orthogonal linear map A and a mask Omega over A's coordinates (1 = generate, 0 = known), every step
denoises and then re-imposes the known coordinates: x <- A^-1[(A y)(1 - Omega) + (A x) Omega]. The result keeps
the known part exactly (up to float rounding of A): inpainting (A = I), colourisation (A rotates RGB so its first
axis is luminance), super-resolution (A rotates each f x f block so its first axis is the block average). The
final projection is not clamped, so the constraint holds even where it pushes a pixel slightly outside [-1, 1].
"""
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastcm._checks import check_tensor, is_int

from .sampling import (ICT_SIGMA_MAX, ICT_TWO_STEP_SIGMA, PerSampleNoise, Seeds, check_sigmas, eval_mode, model_device, model_info, resolve_labels,
                       resolve_seeds)

LUMA = (0.2989, 0.5870, 0.1140)  # ITU-R BT.601 luma weights, as CM's colourisation uses


def orthogonal_basis(first: Tensor) -> Tensor:
    """An orthogonal d x d matrix (float64) whose first row is first / ||first|| (QR of [q, e_2, ..., e_d])."""
    q = first.to(torch.float64).flatten()
    M = torch.eye(q.numel(), dtype=torch.float64)
    M[:, 0] = q / q.norm()
    Q, R = torch.linalg.qr(M)
    Q = Q * torch.sign(torch.diagonal(R))  # fix the signs so that column 0 is +q
    return Q.T.contiguous()


def luminance(images: Tensor) -> Tensor:
    """BT.601 luma of RGB images (B, 3, H, W) -> (B, 1, H, W); the grey input of :func:`colorize`."""
    check_tensor("images", images, ndim=4, shape=(None, 3, None, None))
    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    return torch.einsum("c,bchw->bhw", w, images).unsqueeze(1)


def block_average(images: Tensor, factor: int) -> Tensor:
    """The super-resolution operator: mean over factor x factor blocks, (B, C, H, W) -> (B, C, H/f, W/f)."""
    check_tensor("images", images, ndim=4)
    if not is_int(factor, 1) or \
            images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f"factor must be a positive int dividing H and W of {tuple(images.shape)}, got {factor!r}")
    return torch.nn.functional.avg_pool2d(images, factor)


@torch.no_grad()
def _edit(model, known: Tensor, omega: Tensor, A, A_inv, sigmas, class_labels, generator, seeds, clip):
    """CM Algorithm 4. ``known`` = (A y)(1 - Omega), in A's coordinates; returns images in pixel space."""
    sigma_min, shape, num_classes = model_info(model)
    sigmas = check_sigmas(sigmas, sigma_min)
    n, device = known.shape[0], model_device(model)
    noise = PerSampleNoise(resolve_seeds(n, seeds, generator))
    labels = resolve_labels(class_labels, n, num_classes, noise, device)
    known, omega = known.to(device), omega.to(device)
    x = A_inv(known)  # y with its unknown part set to 0
    with eval_mode(model):
        for k, sigma in enumerate(sigmas):
            std = sigma if k == 0 else math.sqrt(sigma**2 - sigma_min**2)
            x = model(x + std * noise.randn(shape, device), sigma, labels)
            x = x.clamp(-1.0, 1.0) if clip else x
            x = A_inv(known + A(x) * omega)
    return x


def _check_images(name: str, y: Tensor, shape) -> None:
    check_tensor(name, y, ndim=4, shape=(None, *shape))
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name} contains NaN or inf")


def inpaint(model, images: Tensor, mask: Tensor, sigmas: Sequence[float] = (ICT_SIGMA_MAX, ICT_TWO_STEP_SIGMA), class_labels=None,
            generator: Optional[torch.Generator] = None, *, seeds: Seeds = None, clip_denoised: bool = True) -> Tensor:
    """Fill the pixels where ``mask`` is 0; pixels where it is 1 are kept exactly.

    images: (B, C, H, W) in [-1, 1]; mask: 0/1 values broadcastable to images (e.g. (1, 1, H, W)).
    sigmas, class_labels, generator, seeds, clip_denoised: as in :func:`fastcm.cm.sample`.
    """
    _, shape, _ = model_info(model)
    _check_images("images", images, shape)
    check_tensor("mask", mask, dtypes=(torch.bool, torch.uint8, torch.int64, torch.float32, torch.float64),
                 ndim=4)
    try:
        ok = torch.broadcast_shapes(mask.shape, images.shape) == images.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to images {tuple(images.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (generate) and 1 (keep)")
    keep = mask.to(images.dtype).expand_as(images)
    identity = lambda x: x  # noqa: E731
    return _edit(model, images * keep, 1.0 - keep, identity, identity, sigmas, class_labels, generator, seeds,
                 clip_denoised)


def colorize(model, grey: Tensor, sigmas: Sequence[float] = (ICT_SIGMA_MAX, ICT_TWO_STEP_SIGMA), class_labels=None,
             generator: Optional[torch.Generator] = None, *, seeds: Seeds = None, clip_denoised: bool = True) -> Tensor:
    """Colour images whose BT.601 luminance (see :func:`luminance`) is ``grey`` (B, 1, H, W); the result's
    luminance equals ``grey``. The model must generate 3-channel images."""
    _, shape, _ = model_info(model)
    if shape[0] != 3:
        raise ValueError(f"colorize needs a 3-channel model, got input_shape {shape}")
    _check_images("grey", grey, (1, *shape[1:]))
    Q = orthogonal_basis(torch.tensor(LUMA)).to(device=grey.device, dtype=grey.dtype)  # row 0: luma direction
    A = lambda x: torch.einsum("ij,bjhw->bihw", Q.to(x.device, x.dtype), x)  # noqa: E731
    A_inv = lambda c: torch.einsum("ji,bjhw->bihw", Q.to(c.device, c.dtype), c)  # noqa: E731
    known = torch.zeros(grey.shape[0], 3, *shape[1:], dtype=grey.dtype, device=grey.device)
    known[:, :1] = grey / math.sqrt(sum(w * w for w in LUMA))  # q . x = (w . x) / ||w||
    omega = torch.tensor([0.0, 1.0, 1.0], dtype=grey.dtype).view(1, 3, 1, 1)
    return _edit(model, known, omega, A, A_inv, sigmas, class_labels, generator, seeds, clip_denoised)


def super_resolution(model, low_res: Tensor, factor: int, sigmas: Sequence[float] = (ICT_SIGMA_MAX, ICT_TWO_STEP_SIGMA),
                     class_labels=None, generator: Optional[torch.Generator] = None, *, seeds: Seeds = None,
                     clip_denoised: bool = True) -> Tensor:
    """Upsample ``low_res`` (B, C, H/f, W/f) by ``factor`` f; the result's f x f block averages equal low_res."""
    _, shape, _ = model_info(model)
    C, H, W = shape
    if not is_int(factor, 2) or H % factor \
            or W % factor:
        raise ValueError(f"factor must be an int >= 2 dividing the model's {H}x{W}, got {factor!r}")
    f, h, w = int(factor), H // factor, W // factor
    _check_images("low_res", low_res, (C, h, w))
    Q = orthogonal_basis(torch.ones(f * f))  # row 0 = (1/f, ..., 1/f): coordinate 0 is f * block mean

    def A(x):  # (B, C, H, W) -> (B, C, h, w, f*f) block coordinates
        blocks = x.reshape(x.shape[0], C, h, f, w, f).permute(0, 1, 2, 4, 3, 5).reshape(x.shape[0], C, h, w, f * f)
        return blocks @ Q.to(x.device, x.dtype).T

    def A_inv(c):
        blocks = (c @ Q.to(c.device, c.dtype)).reshape(c.shape[0], C, h, w, f, f)
        return blocks.permute(0, 1, 2, 4, 3, 5).reshape(c.shape[0], C, H, W)

    known = torch.zeros(low_res.shape[0], C, h, w, f * f, dtype=low_res.dtype, device=low_res.device)
    known[..., 0] = f * low_res
    omega = torch.ones(f * f, dtype=low_res.dtype)
    omega[0] = 0.0
    return _edit(model, known, omega, A, A_inv, sigmas, class_labels, generator, seeds, clip_denoised)


@torch.no_grad()
def denoise(model, noisy: Tensor, sigma: float, sigmas: Sequence[float] = (), class_labels=None,
            generator: Optional[torch.Generator] = None, *, seeds: Seeds = None,
            clip_denoised: bool = True) -> Tensor:
    """Denoise images ``noisy`` = x + sigma z with a known noise level sigma: x = f(noisy, sigma), optionally
    refined by multistep sampling at the descending ``sigmas`` (all < sigma)."""
    sigma_min, shape, num_classes = model_info(model)
    _check_images("noisy", noisy, shape)
    (sigma,) = check_sigmas([sigma], sigma_min, name="sigma")
    sigmas = check_sigmas(sigmas, sigma_min, allow_empty=True)
    if sigmas and sigmas[0] >= sigma:
        raise ValueError(f"sigmas must all be < sigma={sigma}, got {sigmas}")
    n, device = noisy.shape[0], model_device(model)
    noise = PerSampleNoise(resolve_seeds(n, seeds, generator))
    labels = resolve_labels(class_labels, n, num_classes, noise, device)
    x, prev = noisy.to(device), None
    with eval_mode(model):
        for s in [sigma, *sigmas]:
            if prev is not None:
                x = x + math.sqrt(s**2 - sigma_min**2) * noise.randn(shape, device)
            x = model(x, s, labels)
            x, prev = (x.clamp(-1.0, 1.0) if clip_denoised else x), s
    return x
