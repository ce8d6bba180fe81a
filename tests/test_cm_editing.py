"""Zero-shot editing (CM Algorithm 4): the known part is preserved exactly; an oracle model recovers the image."""
import math

import pytest
import torch
from torch import nn

from fastcm.cm import (ConsistencyModel, block_average, colorize, denoise, inpaint, luminance, super_resolution)
from fastcm.cm.editing import LUMA, orthogonal_basis
from fastcm.models import build_unet

EPS = 0.002


class DeltaOracle(nn.Module):
    """Exact consistency function of a one-image data set {x_star}: every noisy input maps to x_star (sigma > eps)."""

    sigma_min, num_classes = EPS, 0

    def __init__(self, x_star):
        super().__init__()
        self.x_star, self.input_shape = x_star, tuple(x_star.shape)
        self.sigmas = []

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(sigma)
        return self.x_star.expand_as(x).clone()


def _images(c=3, n=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g, dtype=torch.float64) * 1.6 - 0.8


def _random_model(channels):
    net = build_unet("tiny", impl="torch", in_channels=channels, dropout=0.0)
    nn.init.normal_(net.conv_out.weight, std=0.5)
    return ConsistencyModel(net)


def test_orthogonal_basis():
    for first in (torch.tensor(LUMA), torch.ones(16)):
        Q = orthogonal_basis(first)
        torch.testing.assert_close(Q @ Q.T, torch.eye(len(first), dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(Q[0], first.double() / first.double().norm(), rtol=0, atol=1e-12)


def test_inpaint_keeps_known_pixels_and_oracle_fills_the_rest():
    x_star = _images(n=1)[0].float()
    y = _images(n=2, seed=1).float()
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1  # keep the left half
    oracle = DeltaOracle(x_star)
    out = inpaint(oracle, y, mask, sigmas=(80.0, 5.0, 0.5), seeds=0)
    assert oracle.sigmas == [80.0, 5.0, 0.5]
    assert torch.equal(out[..., :4], y[..., :4])
    assert torch.equal(out[..., 4:], x_star.expand_as(y)[..., 4:])
    # With a real (random) network the constraint holds exactly too.
    model = _random_model(3)
    out = inpaint(model, y, mask, seeds=0)
    assert torch.equal(out[..., :4], y[..., :4]) and not torch.equal(out, y)


def test_colorize_preserves_luminance_and_oracle_recovers_colour():
    x_star = _images(n=1)[0]
    grey = luminance(x_star[None].expand(2, -1, -1, -1))
    out = colorize(DeltaOracle(x_star.float()), grey.float(), seeds=0)
    torch.testing.assert_close(out.double(), x_star.expand(2, -1, -1, -1), rtol=0, atol=1e-6)
    model = _random_model(3)
    grey = luminance(_images(n=3, seed=2)).float()
    out = colorize(model, grey, sigmas=(80.0, 2.0, 0.2), seeds=1)
    torch.testing.assert_close(luminance(out), grey, rtol=0, atol=1e-6)
    assert out[:, 0].sub(out[:, 1]).abs().max() > 1e-3  # it is colour, not grey copied into 3 channels


def test_luminance_weights():
    rgb = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert luminance(rgb).item() == pytest.approx(0.2989)


@pytest.mark.parametrize("factor", [2, 4])
def test_super_resolution_preserves_block_averages(factor):
    x_star = _images(n=1)[0]
    low = block_average(x_star[None].expand(2, -1, -1, -1), factor)
    out = super_resolution(DeltaOracle(x_star.float()), low.float(), factor, seeds=0)
    torch.testing.assert_close(out.double(), x_star.expand(2, -1, -1, -1), rtol=0, atol=1e-6)
    model = _random_model(1)
    low = block_average(_images(c=1, n=2, seed=3), factor).float()
    out = super_resolution(model, low, factor, seeds=0)
    torch.testing.assert_close(block_average(out, factor), low, rtol=0, atol=1e-6)
    assert out.std() > 0 and not torch.allclose(out, torch.nn.functional.interpolate(low, scale_factor=factor))


def test_denoise_from_known_sigma():
    s, sigma = 0.25, 1.5

    class Gaussian(DeltaOracle):  # exact consistency function of N(0, s^2) data
        def forward(self, x, sig, class_labels=None):
            self.sigmas.append(sig)
            return x * math.sqrt(s**2 + EPS**2) / math.sqrt(s**2 + sig**2)

    model = Gaussian(torch.zeros(1, 8, 8))
    noisy = torch.randn(4, 1, 8, 8) * math.sqrt(s**2 + sigma**2)
    out = denoise(model, noisy, sigma, seeds=0)
    torch.testing.assert_close(out, (noisy * math.sqrt(s**2 + EPS**2) / math.sqrt(s**2 + sigma**2)).clamp(-1, 1))
    denoise(model, noisy, sigma, sigmas=(0.5, 0.1), seeds=0)
    assert model.sigmas[-3:] == [sigma, 0.5, 0.1]
    delta = DeltaOracle(_images(c=1, n=1)[0].float())
    assert torch.equal(denoise(delta, noisy, sigma, seeds=0), delta.x_star.expand_as(noisy))


def test_editing_is_seeded_per_sample():
    model = _random_model(1)
    y = _images(c=1, n=3, seed=4).float()
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 0
    a = inpaint(model, y, mask, seeds=[5, 6, 7])
    b = inpaint(model, y[1:2], mask, seeds=[6])
    torch.testing.assert_close(a[1:2], b, rtol=1e-5, atol=1e-6)


def test_editing_validation():
    model = _random_model(1)
    y = _images(c=1, n=2).float()
    with pytest.raises(ValueError, match="mask"):
        inpaint(model, y, torch.full((1, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match="mask"):
        inpaint(model, y, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="images"):
        inpaint(model, torch.full_like(y, float("nan")), torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="3-channel"):
        colorize(model, y)
    with pytest.raises(ValueError, match="factor"):
        super_resolution(model, y[..., :3, :3], 3)
    with pytest.raises(ValueError, match="low_res"):
        super_resolution(model, y, 2)
    with pytest.raises(ValueError, match="factor"):
        block_average(y, 3)
    with pytest.raises(ValueError, match="sigma"):
        denoise(model, y, 0.001)
    with pytest.raises(ValueError, match="sigmas"):
        denoise(model, y, 1.0, sigmas=(2.0,))
