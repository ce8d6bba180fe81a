"""sCT in TrigFlow (Lu & Song 2025, arXiv 2410.11081) against the paper's equations: TrigFlow (Eqs. 3-5, 30),
the tangent of Eq. 6 with the JVP rearrangement (Sec. 5.1) against a finite difference of f along the trajectory,
tangent warm-up and normalisation (Alg. 1), the adaptive weighting and loss (Eq. 8, App. D), the CT gradient of
Sec. 4.2, the time proposal and the one-/two-step samplers (App. G.2)."""
import math

import pytest
import torch
from torch import nn

from fastcm.cm import ConsistencyModel
from fastcm.cm.jvp import ops_impl
from fastcm.ops import current_impl
from fastcm.cm.sct import (SCTLoss, TrigFlowModel, sct_adaptive_loss, normalize_tangent, sct_sample,
                           sct_sample_t, sct_tangent, tangent_warmup, trigflow_interpolate, trigflow_sigma,
                           trigflow_time)
from fastcm.cm.sampling import PerSampleNoise
from fastcm.models import build_unet

SD = 0.5


def _model(dtype=torch.float64, preset="tiny", **kw):
    torch.manual_seed(0)
    net = build_unet(preset, impl="torch", time_scale=1.0, **kw)
    for m in net.modules():  # random last layers: F (and its tangent) are not identically zero
        if isinstance(m, nn.Conv2d) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.2)
    model = TrigFlowModel(net, sigma_data=SD).to(dtype)
    nn.init.normal_(model.weight.linear.weight, std=0.3)  # a non-trivial w_phi(t)
    return model.train()


def _batch(B=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, 1, 8, 8, generator=g, dtype=dtype) * 2 - 1
    z = SD * torch.randn(B, 1, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=dtype)[:B]
    return x0, z, t


def test_trigflow_conversions_and_t_max():
    """t = arctan(sigma / sigma_d) and x_t = cos(t) x_sigma (Eq. 30); t_max = arctan(160) = 1.56454 (App. G.2)."""
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    t = trigflow_time(sigma, SD)
    torch.testing.assert_close(trigflow_sigma(t, SD), sigma, rtol=1e-14, atol=0)
    assert abs(TrigFlowModel(nn.Identity()).t_max - 1.56454) < 1e-5  # the paper prints 1.56454 (truncated)
    x0, eps = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    x_sigma = x0 + sigma.view(-1, 1, 1, 1) * eps  # EDM: x_sigma = x0 + sigma eps
    x_t = trigflow_interpolate(x0, SD * eps, t)
    torch.testing.assert_close(x_t, t.cos().view(-1, 1, 1, 1) * x_sigma, rtol=1e-13, atol=1e-13)


def test_trigflow_parametrisation_eq5():
    model = _model().eval()
    x_t = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, math.pi / 2], dtype=torch.float64)
    F_x = model.unet(x_t / SD, t)  # c_noise(t) = t, c_in = 1 / sigma_d
    want = t.cos().view(-1, 1, 1, 1) * x_t - t.sin().view(-1, 1, 1, 1) * SD * F_x
    torch.testing.assert_close(model(x_t, t), want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(model(x_t, 0.0), x_t, rtol=0, atol=0)  # f(x, 0) = x for any weights
    torch.testing.assert_close(model(x_t, t, output="F"), F_x)
    F2, w = model(x_t, t, output="F_and_weight")
    torch.testing.assert_close(w, model.weight(t))
    assert w.shape == (3,) and w.abs().max() > 0


def _f_along_trajectory(model, x0, z, t, seed):
    """f^-(x_t, t) on x_t = cos t x0 + sin t z (the CT trajectory through the sampled x0, z)."""
    return model(trigflow_interpolate(x0, z, t), t, dropout_seed=seed)


def test_tangent_is_cos_t_times_total_derivative_of_f():
    """g (r = 1, no normalisation) = cos(t) df^-/dt of Eq. 6, with df/dt taken by a central difference along
    x_t = cos t x0 + sin t z (dx_t/dt = cos t z - sin t x0, the sCT estimate), dropout on with one seed."""
    model, (x0, z, t) = _model(), _batch()
    seed = torch.tensor(5)
    tv = t.view(-1, 1, 1, 1)
    x_t, dxt_dt = trigflow_interpolate(x0, z, t), tv.cos() * z - tv.sin() * x0
    F_minus, g = SCTLoss(tangent_c=None, warmup_steps=0).tangent(model, x_t, t, dxt_dt, step=0, dropout_seed=seed)
    eps = 1e-6
    with torch.no_grad():
        df_dt = (_f_along_trajectory(model, x0, z, t + eps, seed) - _f_along_trajectory(model, x0, z, t - eps, seed)) \
            / (2 * eps)
        torch.testing.assert_close(F_minus, model(x_t, t, dropout_seed=seed, output="F"), rtol=1e-12, atol=1e-12)
    want = tv.cos() * df_dt
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-7 * want.abs().max().item())


def test_tangent_warmup_scales_only_the_second_term():
    assert [tangent_warmup(k, 10_000) for k in (0, 2500, 10_000, 50_000)] == [0.0, 0.25, 1.0, 1.0]
    assert tangent_warmup(0, 0) == 1.0
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        tangent_warmup(-1, 10)
    F_minus, jvp_out, x_t, dxt, _ = (torch.randn(3, 1, 4, 4, dtype=torch.float64) for _ in range(5))
    t = torch.tensor([0.2, 0.8, 1.5], dtype=torch.float64)
    g0, g1, gr = (sct_tangent(F_minus, jvp_out, x_t, dxt, t, SD, r) for r in (0.0, 1.0, 0.3))
    c = t.cos().view(-1, 1, 1, 1)
    torch.testing.assert_close(g0, -c**2 * (SD * F_minus - dxt))  # r = 0: the first term of Alg. 1 alone
    torch.testing.assert_close(gr, g0 + 0.3 * (g1 - g0))
    loss = SCTLoss(tangent_c=None, warmup_steps=100)  # the loss uses r = step / H
    model, (x0, z, t) = _model(), _batch()
    x_t = trigflow_interpolate(x0, z, t)
    dxt = t.view(-1, 1, 1, 1).cos() * z - t.view(-1, 1, 1, 1).sin() * x0
    _, ga = loss.tangent(model, x_t, t, dxt, 0, dropout_seed=1)
    _, gb = loss.tangent(model, x_t, t, dxt, 100, dropout_seed=1)
    _, gc = loss.tangent(model, x_t, t, dxt, 25, dropout_seed=1)
    torch.testing.assert_close(gc, ga + 0.25 * (gb - ga))


def test_normalize_tangent():
    g = torch.randn(4, 3, 5, 7, dtype=torch.float64)[:, :, ::2]  # non-contiguous
    g[1] *= 1e-4
    n = torch.linalg.vector_norm(g.flatten(1), dim=1)
    out = normalize_tangent(g, 0.1)
    torch.testing.assert_close(torch.linalg.vector_norm(out.flatten(1), dim=1), n / (n + 0.1))
    torch.testing.assert_close(out, g / (n + 0.1).view(-1, 1, 1, 1))
    rms = n / math.sqrt(g[0].numel())
    torch.testing.assert_close(normalize_tangent(g, 0.1, "rms"), g / (rms + 0.1).view(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="norm must be one of"):
        normalize_tangent(g, 0.1, "l1")


def test_sct_adaptive_loss_and_its_optimum():
    """Eq. 8 per sample: e^w / D ||Delta||^2 - w; at the optimum over w, e^{w*} / D ||Delta||^2 = 1 (App. D)."""
    a, b = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    w = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    sq = ((a - b) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(sct_adaptive_loss(a, b, w), w.exp() / 32 * sq - w)
    w_star = (32 / sq).log().requires_grad_()
    sct_adaptive_loss(a, b, w_star).sum().backward()
    torch.testing.assert_close(w_star.grad, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_time_proposal_is_lognormal_in_sigma():
    g = torch.Generator().manual_seed(0)
    t = sct_sample_t(200_000, -1.0, 1.4, SD, generator=g, dtype=torch.float64)
    assert bool(((t > 0) & (t < math.pi / 2)).all())
    log_sigma = (SD * t.tan()).log()  # log(sigma_d tan t) ~ N(P_mean, P_std^2)
    assert abs(log_sigma.mean().item() + 1.0) < 0.01 and abs(log_sigma.std().item() - 1.4) < 0.01
    with pytest.raises(ValueError, match="P_std must be a positive finite number"):
        sct_sample_t(3, -1.0, 0.0)


def _replay_draws(x0, gen_seed, loss):
    """(t, z, seed) exactly as SCTLoss.__call__ draws them from a generator with this seed."""
    g = torch.Generator().manual_seed(gen_seed)
    t = sct_sample_t(x0.shape[0], loss.P_mean, loss.P_std, SD, g, dtype=x0.dtype)
    z = SD * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    return t, z, torch.randint(0, 2**31 - 1, (), generator=g)


def test_loss_gradient_is_the_continuous_time_ct_gradient():
    """Sec. 4.2: with w = 0, no normalisation and r = 1, grad_theta of Eq. 8 equals (2 / D) grad_theta E[-cos(t)
    F_theta^T sg(df/dt)] (the CT gradient with the prior weight 1/(sigma_d tan t)); df/dt by central differences."""
    model, (x0, _, _) = _model(), _batch()
    nn.init.zeros_(model.weight.linear.weight)
    nn.init.zeros_(model.weight.linear.bias)
    loss = SCTLoss(tangent_c=None, warmup_steps=0)
    params = [p for p in model.unet.parameters()]
    per = loss(model, x0, step=0, generator=torch.Generator().manual_seed(9))
    assert per.shape == (3,)
    grads = torch.autograd.grad(per.sum(), params)
    t, z, seed = _replay_draws(x0, 9, loss)
    eps = 1e-6
    with torch.no_grad():
        df_dt = (_f_along_trajectory(model, x0, z, t + eps, seed) - _f_along_trajectory(model, x0, z, t - eps, seed)) \
            / (2 * eps)
    F_x = model(trigflow_interpolate(x0, z, t), t, dropout_seed=seed, output="F")
    surrogate = (2 / 64) * (-t.cos().view(-1, 1, 1, 1) * F_x * df_dt).sum()
    want = torch.autograd.grad(surrogate, params)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_loss_value_is_eq8_with_the_replayed_draws():
    model, (x0, _, _) = _model(), _batch()
    loss = SCTLoss(warmup_steps=20)
    per = loss(model, x0, step=5, generator=torch.Generator().manual_seed(3))
    t, z, seed = _replay_draws(x0, 3, loss)
    tv = t.view(-1, 1, 1, 1)
    x_t, dxt = trigflow_interpolate(x0, z, t), tv.cos() * z - tv.sin() * x0
    F_minus, g = loss.tangent(model, x_t, t, dxt, 5, dropout_seed=seed)
    with torch.no_grad():
        F_x, w = model(x_t, t, dropout_seed=seed, output="F_and_weight")
    n = torch.linalg.vector_norm(g.flatten(1), dim=1)
    assert bool((n < 1).all())  # normalised: ||g|| / (||g|| + c) < 1
    want = w.exp() / 64 * ((F_x - F_minus - g) ** 2).sum(dim=(1, 2, 3)) - w
    torch.testing.assert_close(per.detach(), want, rtol=1e-12, atol=1e-12)
    per.sum().backward()  # gradients reach theta (through F_theta) and phi (through w)
    assert model.weight.linear.weight.grad.abs().max() > 0
    assert model.unet.conv_out.weight.grad.abs().max() > 0


def test_jvp_runs_on_the_reference_ops_and_restores_the_route():
    model = _model()
    assert model.unet.config.impl == "torch"
    model.unet.set_impl("triton")
    config = model.unet.config
    with ops_impl(model, "torch"):
        assert current_impl() == "torch" and model.unet.config is config  # the model itself is untouched
    assert current_impl() is None and model.unet.config.impl == "triton"
    with pytest.raises(RuntimeError, match="boom"), ops_impl(model, "torch"):
        raise RuntimeError("boom")
    assert current_impl() is None and model.unet.config is config


def test_samplers_follow_the_trigflow_multistep_rule():
    model = _model(torch.float32)
    one = sct_sample(model, 3, seeds=[4, 5, 6], clip_denoised=False)
    two = sct_sample(model, 3, seeds=[4, 5, 6], steps=2, clip_denoised=False)
    assert model.training  # restored
    noise = PerSampleNoise([4, 5, 6])
    model.eval()
    with torch.no_grad():
        x0 = model(SD * noise.randn((1, 8, 8)), model.t_max)
        torch.testing.assert_close(one, x0.clamp(-1, 1))
        x = math.cos(1.1) * x0 + math.sin(1.1) * SD * noise.randn((1, 8, 8))
        torch.testing.assert_close(two, model(x, 1.1).clamp(-1, 1))
    torch.testing.assert_close(sct_sample(model, 2, seeds=[5, 6], clip_denoised=False), one[1:])  # per-sample seeds


def test_input_validation():
    model = _model()
    x = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"t must lie in \[0, pi/2\]"):
        model(x, 2.0)
    with pytest.raises(ValueError, match="output must be one of"):
        model(x, 0.5, output="g")
    with pytest.raises(ValueError, match="ts must be strictly descending"):
        sct_sample(model, 2, ts=(0.5, 1.0))
    with pytest.raises(ValueError, match="steps must be 1 or 2"):
        sct_sample(model, 2, steps=3)
    with pytest.raises(TypeError, match="model must be a fastcm.cm.TrigFlowModel"):
        SCTLoss()(ConsistencyModel(build_unet("tiny")), x.float(), 0)
    for kw, match in (({"tangent_c": 0.0}, "tangent_c"), ({"warmup_steps": -1}, "warmup_steps"),
                      ({"tangent_norm": "max"}, "tangent_norm"), ({"P_std": -1.0}, "P_std")):
        with pytest.raises(ValueError, match=match):
            SCTLoss(**kw)


def test_jvp_restores_the_config_object_and_takes_channels_last_inputs():
    model = _model()
    config = model.unet.config
    x0, z, t = _batch()
    x_t = trigflow_interpolate(x0, z, t)
    dxt = t.view(-1, 1, 1, 1).cos() * z - t.view(-1, 1, 1, 1).sin() * x0
    loss = SCTLoss(tangent_c=None, warmup_steps=0)
    F_a, g_a = loss.tangent(model, x_t, t, dxt, 0, dropout_seed=2)
    assert model.unet.config is config  # a compiled forward's guards see the same object
    cl = torch.channels_last
    F_b, g_b = loss.tangent(model, x_t.contiguous(memory_format=cl), t, dxt.contiguous(memory_format=cl), 0,
                            dropout_seed=2)
    torch.testing.assert_close(g_b, g_a, rtol=1e-12, atol=1e-12)
    # channels_last weights: on torch 2.13 torch.group_norm's forward AD fails there, and the error says why; once
    # the reference group norm carries channels_last tangents the tangent must simply be right.
    model.to(memory_format=cl)
    try:
        _, g_c = loss.tangent(model, x_t, t, dxt, 0, dropout_seed=2)
    except RuntimeError as e:
        assert "channels_last layout: forward AD of torch.group_norm" in str(e)
    else:
        torch.testing.assert_close(g_c, g_a, rtol=1e-10, atol=1e-10)


def test_jvp_ignores_the_callers_autocast():
    model = _model(torch.float32)
    x0, z, t = (a.float() for a in _batch())
    x_t = trigflow_interpolate(x0, z, t)
    dxt = t.view(-1, 1, 1, 1).cos() * z - t.view(-1, 1, 1, 1).sin() * x0
    loss = SCTLoss(tangent_c=None, warmup_steps=0)
    F_a, g_a = loss.tangent(model, x_t, t, dxt, 0, dropout_seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F_b, g_b = loss.tangent(model, x_t, t, dxt, 0, dropout_seed=2)
    assert g_b.dtype == torch.float32
    torch.testing.assert_close(g_b, g_a, rtol=0, atol=0)


def test_jvp_on_the_models_own_triton_route_matches_the_reference_route():
    """jvp_impl=None (the default) keeps the Triton route (interpreted here): the fused forward+tangent kernels give
    the reference route's tangent (before them, torch.func.jvp through the custom ops silently returned zero)."""
    model = _model(torch.float32)
    x0, z, t = (a.float() for a in _batch(B=1))  # batch 1: interpreted kernels
    x_t = trigflow_interpolate(x0, z, t)
    dxt = t.view(-1, 1, 1, 1).cos() * z - t.view(-1, 1, 1, 1).sin() * x0
    _, g_ref = SCTLoss(tangent_c=None, warmup_steps=0, jvp_impl="torch").tangent(model, x_t, t, dxt, 0,
                                                                                  dropout_seed=2)
    model.unet.set_impl("triton")
    _, g = SCTLoss(tangent_c=None, warmup_steps=0).tangent(model, x_t, t, dxt, 0, dropout_seed=2)
    assert g_ref.abs().max() > 1e-3
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_a_route_without_tangents_is_refused_by_the_probe(monkeypatch):
    """A Triton route that returns a wrong tangent (here: the bare custom op, as before the JVP rules) is refused
    with one clear error, never trained on."""
    import importlib

    import fastcm.cm.jvp as J

    G = importlib.import_module("fastcm.ops.group_norm")  # the module (fastcm.ops re-exports the function's name)
    monkeypatch.setattr(G, "has_tangent", lambda *a: False)  # the custom op alone: a silently zero tangent
    monkeypatch.setattr(J, "_PROBED", {})
    model = _model(torch.float32)
    model.unet.set_impl("triton")
    x0, z, t = (a.float() for a in _batch())
    with pytest.raises(RuntimeError, match="does not carry forward-mode tangents.*jvp_impl='torch'"):
        SCTLoss(tangent_c=None, warmup_steps=0).tangent(model, trigflow_interpolate(x0, z, t), t, z, 0)
