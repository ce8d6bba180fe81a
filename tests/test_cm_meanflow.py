"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): the MeanFlow identity u = v - (t - r) du/dt with the JVP along
(v, 0, 1), checked on a closed-form flow (Gaussian data, whose average velocity is known exactly); the (r, t)
sampler's distribution; the adaptive weighting and stop-gradient; one- and two-step sampling."""
import math

import pytest
import torch
from torch import nn

from fastcm.cm.meanflow import (MeanFlowLoss, MeanFlowModel, meanflow_adaptive_loss, meanflow_sample,
                                meanflow_sample_times, meanflow_target)
from fastcm.cm.sampling import PerSampleNoise
from fastcm.models import build_unet

MU, S = 0.3, 0.4  # data x ~ N(MU, S^2) per pixel; noise e ~ N(0, 1)


def _m(t):
    return (1 - t) * MU


def _sigma(t):
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def marginal_velocity(z, t):
    """v(z, t) = E[e - x | z_t = z] = -MU + sigma'(t)/sigma(t) (z - m(t)) for z_t = (1 - t) x + t e."""
    t = t.view(-1, 1, 1, 1)
    return -MU + (t - (1 - t) * S**2) / _sigma(t) ** 2 * (z - _m(t))


class GaussianMeanFlowNet(nn.Module):
    """The exact average velocity of the Gaussian flow, posing as a U-Net with labels (t, h = t - r): the PF-ODE
    moves z(tau) = m(tau) + sigma(tau) xi, so u(z, r, t) = (z(t) - z(r)) / (t - r) = -MU + (sigma(t) - sigma(r)) /
    (t - r) xi with xi = (z - m(t)) / sigma(t)."""

    input_shape, num_classes = (1, 2, 2), 0

    def forward(self, z, labels, class_labels=None, dropout_seed=None):
        t, h = labels[:, 0].view(-1, 1, 1, 1), labels[:, 1].view(-1, 1, 1, 1)
        r = t - h
        xi = (z - _m(t)) / _sigma(t)
        return -MU + (_sigma(t) - _sigma(r)) / h * xi


def test_meanflow_identity_on_the_gaussian_flow():
    """u(z, r, t) = v(z, t) - (t - r) du/dt with du/dt the JVP along (v, 0, 1) (MeanFlow Eq. 6 / Alg. 1)."""
    model = MeanFlowModel(GaussianMeanFlowNet())
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.99, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.4, 0.0, 0.05], dtype=torch.float64)
    v = marginal_velocity(z, t)
    u_minus, u_tgt = MeanFlowLoss().target(model, z, r, t, v)
    u = model(z, r, t)
    torch.testing.assert_close(u_minus, u)
    torch.testing.assert_close(u_tgt, u, rtol=1e-12, atol=1e-12)
    assert (u - v).abs().max() > 0.05  # the average velocity really differs from the instantaneous one


def test_one_and_two_step_sampling_are_exact_on_the_gaussian_flow():
    """z_0 = z_1 - u(z_1, 0, 1) = MU + S e exactly (the flow map of N(0,1) -> N(MU, S^2)); two steps compose."""
    model = MeanFlowModel(GaussianMeanFlowNet())
    seeds = [3, 4, 5]
    e = PerSampleNoise(seeds).randn((1, 2, 2))
    for kw in ({"steps": 1}, {"steps": 2}, {"times": (1.0, 0.7, 0.2, 0.0)}):
        out = meanflow_sample(model, 3, seeds=seeds, clip=False, **kw)
        torch.testing.assert_close(out, MU + S * e, rtol=1e-5, atol=1e-6)
    x = meanflow_sample(model, 2, seeds=[4, 5], times=(1.0, 0.5), clip=False)  # stop half-way: z_0.5 = m + sigma e
    torch.testing.assert_close(x, _m(torch.tensor(0.5)) + _sigma(torch.tensor(0.5)) * e[1:])


def test_time_sampler_distribution_paper_config():
    n = 200_000
    r, t = meanflow_sample_times(n, -2.0, 2.0, 0.75, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)
    assert bool(((0 < r) & (r <= t) & (t < 1)).all())
    same = r == t
    assert abs(same.double().mean().item() - 0.25) < 0.005  # 1 - ratio of the pairs have r = t
    Phi = lambda a: 0.5 * (1 + math.erf((a + 2.0) / (2.0 * math.sqrt(2))))  # noqa: E731  logit-N(-2, 2) CDF
    logit_t, logit_r = torch.logit(t), torch.logit(r[~same])
    for a in (-4.0, -2.0, 0.0, 1.5):  # t = max of two draws: CDF^2; r (when r != t) = min: 1 - (1 - CDF)^2
        assert abs((logit_t <= a).double().mean().item() - Phi(a) ** 2) < 0.005
        assert abs((logit_r <= a).double().mean().item() - (1 - (1 - Phi(a)) ** 2)) < 0.006


def test_time_sampler_distribution_separate_r_config():
    n = 200_000
    r, t = meanflow_sample_times(n, -0.6, 1.6, 0.75, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64, r_P_mean=-4.0, r_P_std=1.6)
    logit_t = torch.logit(t)
    assert abs(logit_t.mean().item() + 0.6) < 0.02 and abs(logit_t.std().item() - 1.6) < 0.02
    assert bool((r <= t).all())
    # r = t when the coin says so (25 %) or the r draw exceeds t: 0.25 + 0.75 P(N(-4, 1.6) >= N(-0.6, 1.6))
    p_exceed = 0.5 * (1 + math.erf((-4.0 + 0.6) / (1.6 * math.sqrt(2)) / math.sqrt(2)))
    assert abs((r == t).double().mean().item() - (0.25 + 0.75 * p_exceed)) < 0.005


def test_adaptive_weighted_loss_value_and_gradient():
    u = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = meanflow_adaptive_loss(u, tgt, p=0.75, c=1e-3)
    L = ((u - tgt) ** 2).sum(dim=(1, 2, 3)).detach()
    torch.testing.assert_close(out.detach(), L / (L + 1e-3) ** 0.75)
    out.sum().backward()  # sg(w) grad L: 2 (u - tgt) / (L + c)^p
    torch.testing.assert_close(u.grad, 2 * (u - tgt).detach() / (L + 1e-3).view(-1, 1, 1, 1) ** 0.75)


def _unet_model():
    torch.manual_seed(0)
    net = build_unet("tiny", impl="torch", time_inputs=2)
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.2)
    return MeanFlowModel(net).double().train()


def test_loss_is_alg1_with_a_finite_difference_du_dt():
    """Replay the loss's draws; du/dt by a central difference along (v, 0, 1); the gradient only flows through the
    primal u_theta (u_tgt is a stop-gradient constant)."""
    model = _unet_model()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    loss = MeanFlowLoss(ratio=0.75)
    per = loss(model, x0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    r, t = meanflow_sample_times(4, loss.P_mean, loss.P_std, loss.ratio, g, dtype=torch.float64)
    e = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    seed = torch.randint(0, 2**31 - 1, (), generator=g)
    tv = t.view(-1, 1, 1, 1)
    z, v = (1 - tv) * x0 + tv * e, e - x0
    eps = 1e-6
    with torch.no_grad():
        dudt = (model(z + eps * v, r, t + eps, dropout_seed=seed) - model(z - eps * v, r, t - eps, dropout_seed=seed)) \
            / (2 * eps)
    u_tgt = meanflow_target(v, r, t, dudt)
    params = list(model.parameters())
    surrogate = meanflow_adaptive_loss(model(z, r, t, dropout_seed=seed), u_tgt)
    torch.testing.assert_close(per, surrogate, rtol=1e-7, atol=0)
    for a, b in zip(torch.autograd.grad(per.sum(), params), torch.autograd.grad(surrogate.sum(), params)):
        # The central difference is exact to O(eps^2) plus roundoff ~1e-16/eps relative to the whole tensor's
        # scale, so the tolerance is scaled by the gradient's largest entry, not by each (possibly tiny) entry.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * b.abs().max().item())


def test_r_equal_t_is_flow_matching():
    model = _unet_model()
    z, v = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    _, u_tgt = MeanFlowLoss().target(model, z, t, t, v, dropout_seed=1)
    torch.testing.assert_close(u_tgt, v, rtol=0, atol=0)


def test_model_conditions_on_t_and_t_minus_r():
    model = _unet_model().eval()
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    r, t = torch.tensor([0.1, 0.5], dtype=torch.float64), torch.tensor([0.9, 0.5], dtype=torch.float64)
    want = model.unet(z, torch.stack([t, t - r], 1))
    torch.testing.assert_close(model(z, r, t), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="r and t must satisfy 0 <= r <= t <= 1"):
        model(z, 0.6, 0.5)
    with pytest.raises(ValueError, match="time_inputs=2"):
        MeanFlowModel(build_unet("tiny"))
    with pytest.raises(TypeError, match="model must be a fastcm.cm.MeanFlowModel"):
        MeanFlowLoss()(build_unet("tiny"), z.float())
    with pytest.raises(ValueError, match="times must be >= 2 strictly descending"):
        meanflow_sample(model, 2, times=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio must be a finite number in"):
        MeanFlowLoss(ratio=1.5)
    with pytest.raises(ValueError, match="r_P_mean and r_P_std must be given together"):
        meanflow_sample_times(3, r_P_mean=-4.0)
