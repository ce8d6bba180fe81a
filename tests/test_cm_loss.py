"""iCT loss: the formula by hand, the sampled pairs follow p(i), training lowers it, Triton ops give the same run."""
import copy
import importlib.util
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from fastcm.cm import ConsistencyModel, ICTLoss, karras_sigmas, lognormal_pair_probs
from fastcm.models import build_unet


class SigmaRecorder(nn.Module):
    """Stand-in U-Net: records sigma = exp(4 c_noise) of each call and returns a smooth function of its input."""

    input_shape, num_classes = (1, 4, 4), 0

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, dropout_seed=None):
        self.calls.append(torch.exp(4 * noise_labels.double()))
        return self.w * torch.sin(x) + noise_labels.view(-1, 1, 1, 1)


def test_loss_matches_formula_by_hand():
    model = ConsistencyModel(build_unet("tiny", impl="torch", dropout=0.0))
    nn.init.normal_(model.unet.conv_out.weight, std=0.3)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    loss_fn = ICTLoss(total_steps=1000)
    loss = loss_fn(model, x, step=300, generator=torch.Generator().manual_seed(5))
    assert loss.shape == (6,) and loss.requires_grad
    # By hand: N(300) for K = 1000 -> K' = 125, N = 10 * 2**2 + 1; draw i, z, seed in the loss's order.
    assert loss_fn.num_scales(300) == 41
    g = torch.Generator().manual_seed(5)
    sig = karras_sigmas(41)
    i = torch.multinomial(lognormal_pair_probs(sig), 6, replacement=True, generator=g)
    z = torch.randn(x.shape, generator=g)
    lo, hi = sig[i].float(), sig[i + 1].float()
    with torch.no_grad():
        y = model(x + hi.view(-1, 1, 1, 1) * z, hi).double()
        yt = model(x + lo.view(-1, 1, 1, 1) * z, lo).double()
    c = 0.00054 * math.sqrt(64)
    d = torch.sqrt(((y - yt) ** 2).flatten(1).sum(1) + c * c) - c  # per-sample L2 inside Pseudo-Huber
    expected = d / (sig[i + 1] - sig[i])  # lambda = 1 / (sigma_{i+1} - sigma_i)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=1e-6)


def test_gradient_flows_through_the_student_only():
    rec = SigmaRecorder()
    model = ConsistencyModel(rec)
    x = torch.rand(8, 1, 4, 4) * 2 - 1
    loss_fn = ICTLoss(1000, c=0.01)
    loss = loss_fn(model, x, 0, generator=torch.Generator().manual_seed(0))
    loss.sum().backward()
    # Recompute with the target detached explicitly: the same gradient.
    hi, lo = rec.calls[0].float(), rec.calls[1].float()
    g = torch.Generator().manual_seed(0)
    torch.multinomial(lognormal_pair_probs(karras_sigmas(11)), 8, replacement=True, generator=g)
    z = torch.randn(x.shape, generator=g)
    grad = rec.w.grad.clone()
    rec.w.grad = None
    y = model(x + hi.view(-1, 1, 1, 1) * z, hi)
    yt = model(x + lo.view(-1, 1, 1, 1) * z, lo).detach()
    manual = ((torch.sqrt(((y - yt) ** 2).flatten(1).sum(1) + 1e-4) - 0.01) / (hi - lo)).sum()
    manual.backward()
    torch.testing.assert_close(grad, rec.w.grad, rtol=1e-4, atol=0)


def test_sampled_pairs_are_adjacent_and_follow_lognormal_p():
    rec = SigmaRecorder()
    model = ConsistencyModel(rec)
    B = 20_000
    ICTLoss(1000)(model, torch.zeros(B, 1, 4, 4), step=0, generator=torch.Generator().manual_seed(0))
    sig = karras_sigmas(11)
    hi, lo = rec.calls
    idx_hi = torch.searchsorted(sig, hi.float().double() * (1 + 1e-6)) - 1
    idx_lo = torch.searchsorted(sig, lo.float().double() * (1 + 1e-6)) - 1
    torch.testing.assert_close(sig[idx_lo], lo, rtol=1e-6, atol=0)
    assert torch.equal(idx_hi, idx_lo + 1) and int(idx_lo.min()) >= 0 and int(idx_hi.max()) <= 10  # i in [0, N-2]
    counts = torch.bincount(idx_lo, minlength=10).numpy()
    p = lognormal_pair_probs(sig).numpy()
    assert scipy.stats.chisquare(counts, p * B).pvalue > 1e-3


def test_default_c_and_validation():
    rec = SigmaRecorder()
    model = ConsistencyModel(rec)
    x = torch.rand(4, 1, 4, 4)
    a = ICTLoss(100)(model, x, 0, generator=torch.Generator().manual_seed(1))
    b = ICTLoss(100, c=0.00054 * 4)(model, x, 0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="ConsistencyModel"):
        ICTLoss(100)(rec, x, 0)
    with pytest.raises(ValueError):
        ICTLoss(100)(model, x[0], 0)
    for bad in (dict(total_steps=0), dict(total_steps=10, c=-1.0), dict(total_steps=10, P_std=0.0),
                dict(total_steps=10, s0=0), dict(total_steps=10, impl="cuda")):
        with pytest.raises(ValueError):
            ICTLoss(**bad)


def _synthetic_batch(n=16):
    """Smooth 8x8 'images' in [-1, 1]: oriented gradients and blobs, a low-dimensional data set."""
    g = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    angle = torch.rand(n, generator=g) * 2 * math.pi
    img = torch.cos(angle).view(-1, 1, 1) * xx + torch.sin(angle).view(-1, 1, 1) * yy
    return img.clamp(-1, 1).unsqueeze(1)


def test_a_few_ict_steps_lower_the_loss():
    # Training on one fixed draw of (i, z, dropout seed) isolates the optimisation from the sampling noise of the
    # loss: 20 Adam steps must drive this iCT objective down steadily (~5.1 -> ~3.8 measured).
    model = ConsistencyModel(build_unet("tiny", impl="torch", dropout=0.1))
    x = _synthetic_batch()
    loss_fn = ICTLoss(total_steps=10**6)  # N stays at 11
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = loss_fn(model, x, 0, generator=torch.Generator().manual_seed(0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def _kernels_ready() -> bool:
    return all(importlib.util.find_spec(f"fastcm.kernels.{m}") is not None for m in ("group_norm", "attention"))


@pytest.mark.skipif(not _kernels_ready(), reason="needs the Triton group_norm and attention kernels")
def test_convergence_triton_ops_match_reference_ops():
    # Liger-style convergence test: the same short iCT run (3 SGD steps, dropout on) with every op on its Triton
    # path (interpreted on CPU) and on the PyTorch reference. Tolerances: the fp32 kernels differ from the reference
    # by summation order only (~1e-7 relative per op, measured 1.3e-7 on these losses), so losses must agree to
    # 1e-5 relative and each parameter to 1e-4 of its own update. SGD, not Adam: Adam divides by sqrt(v), which
    # turns rounding-level differences of near-zero gradients into lr-sized parameter differences.
    # One level, 8 channels, batch 2: every interpreted launch costs ~0.1 s, so the net is kept to ~60 launches.
    torch.manual_seed(0)
    kw = dict(model_channels=8, num_groups=2, channel_mult=(1,), attn_resolutions=(8,), mid_attention=False)
    ref = ConsistencyModel(build_unet("tiny", impl="torch", dropout=0.1, **kw))
    fast = copy.deepcopy(ref)
    fast.unet.set_impl("triton")
    start = copy.deepcopy(ref)
    x = _synthetic_batch(2)
    losses = {}
    for name, model in (("torch", ref), ("triton", fast)):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        loss_fn, losses[name] = ICTLoss(8, impl=name), []
        for k in range(3):
            loss = loss_fn(model, x, k, generator=torch.Generator().manual_seed(1000 + k)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    np.testing.assert_allclose(losses["triton"], losses["torch"], rtol=1e-5)
    for (name, a), b, a0 in zip(ref.named_parameters(), fast.parameters(), start.parameters()):
        update = (a - a0).abs().max().item()
        assert (a - b).abs().max().item() <= 1e-4 * update + 1e-9, name
