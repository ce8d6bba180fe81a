"""fastcm's consistency-model maths against a library nobody here wrote: diffusers' CMStochasticIterativeScheduler
and ConsistencyModelPipeline (Karras sigmas, boundary-condition coefficients, c_in / timestep, one-step and
multistep sampling on the same noise), and a diffusers UNet2DModel trained with fastcm's iCT through the adapter."""
import math

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[test])")
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel  # noqa: E402

import fastcm  # noqa: E402
from fastcm.cm import ConsistencyModel, cm_coefficients, karras_sigmas, sample  # noqa: E402
from fastcm.data import ArrayDataset  # noqa: E402
from fastcm.integrations.adapter import DiffusersUNet  # noqa: E402
from fastcm.train import ICTConfig, train_ict  # noqa: E402


def tiny_unet(num_class_embeds=None, dropout=0.0):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds,
                       dropout=dropout)


@pytest.mark.parametrize("N", [2, 11, 40, 1281])
def test_karras_sigmas_match_the_scheduler(N):
    sched = CMStochasticIterativeScheduler(num_train_timesteps=N)  # descending, float64 from numpy
    ours = karras_sigmas(N, 0.002, 80.0, 7.0)                        # ascending (iCT numbering)
    torch.testing.assert_close(ours.flip(0), sched.sigmas.to(torch.float64), rtol=1e-13, atol=0)


def test_boundary_condition_coefficients_c_in_and_timestep():
    sched = CMStochasticIterativeScheduler(num_train_timesteps=40)
    sigma = torch.cat([torch.tensor([0.002, 0.0021, 0.5, 1.0, 80.0], dtype=torch.float64),
                       torch.logspace(-2.6, 1.9, 37, dtype=torch.float64)])
    c_skip, c_out, c_in, c_noise = cm_coefficients(sigma, 0.5, 0.002)
    d_skip, d_out = sched.get_scalings_for_boundary_condition(sigma)
    torch.testing.assert_close(c_skip, d_skip, rtol=1e-14, atol=0)
    torch.testing.assert_close(c_out, d_out, rtol=1e-14, atol=1e-300)
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, sigma_min) = x exactly
    torch.testing.assert_close(1000 * c_noise, torch.from_numpy(sched.sigma_to_t(sigma.numpy())), rtol=1e-14, atol=0)
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    for i in (0, 20, 39):  # scale_model_input divides by sqrt(sigma^2 + sigma_data^2): EDM's c_in
        sched._step_index = i
        s = sched.sigmas[i].to(torch.float64)
        torch.testing.assert_close(sched.scale_model_input(x, sched.timesteps[i]),
                                   cm_coefficients(s, 0.5, 0.002)[2] * x, rtol=1e-14, atol=0)


def test_consistency_function_matches_a_scheduler_step():
    """f(x, sigma) of ConsistencyModel(DiffusersUNet(unet)) = the scheduler's denoised estimate on the same x."""
    unet = tiny_unet().double()
    cm = ConsistencyModel(DiffusersUNet(unet)).eval()
    sched = CMStochasticIterativeScheduler(num_train_timesteps=40, clip_denoised=False)
    sched.set_timesteps(timesteps=[30, 22, 0])
    x = 3 * torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            sigma = float(sched.sigmas[i])  # the scheduler keeps its sigmas in float32
            sched._step_index = i
            F_x = unet(sched.scale_model_input(x, t), t).sample
            c_skip, c_out = sched.get_scalings_for_boundary_condition(sched.sigmas[i].double())
            ours = cm(x, sigma)
            # diffusers' timestep comes from the float64 sigma before its float32 rounding: |dt| ~ 250 * 6e-8
            torch.testing.assert_close(ours, c_skip * x + c_out * F_x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("timesteps", [None, [22, 0], [35, 22, 0]], ids=["one-step", "two-step", "three-step"])
def test_sampler_matches_the_diffusers_pipeline(timesteps):
    """Same network, same seed: the pipeline draws x_T and each step's noise from one generator in the order
    fastcm's per-sample generator does, so the samples agree. (Timestep 0 is sigma_max in diffusers; the pipeline
    scales x_T by sigma_max whatever its first timestep, so every schedule here starts there.)"""
    unet = tiny_unet(num_class_embeds=4)
    sched = CMStochasticIterativeScheduler(num_train_timesteps=40)
    pipe = ConsistencyModelPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=1) if timesteps is None else dict(timesteps=timesteps)
    seed, label = 1234, 3
    theirs = pipe(batch_size=1, class_labels=label, generator=torch.Generator().manual_seed(seed), output_type="pt",
                  **kw).images
    sigmas = [float(s) for s in sched.sigmas[:-1]]  # the float32 sigmas the pipeline used (last: sigma_min)
    assert sigmas[0] == 80.0 and len(sigmas) == (1 if timesteps is None else len(timesteps))
    cm = ConsistencyModel(DiffusersUNet(unet))
    ours = sample(cm, 1, class_labels=label, sigmas=sigmas, seeds=[seed])
    ours = (ours / 2 + 0.5).clamp(0, 1)  # the pipeline's output_type="pt" range
    assert theirs.shape == ours.shape == (1, 3, 8, 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # measured <= 1e-6: t from float64 vs float32 sigma
    if timesteps is not None:  # the later steps changed the result (so the multistep noise was matched)
        one = (sample(cm, 1, class_labels=label, sigmas=sigmas[:1], seeds=[seed]) / 2 + 0.5).clamp(0, 1)
        assert (one - theirs).abs().max() > 1e-2


def test_adapter_bad_input_and_properties():
    unet = tiny_unet(num_class_embeds=4)
    net = DiffusersUNet(unet)
    assert net.input_shape == (3, 8, 8) and net.num_classes == 4 and DiffusersUNet(tiny_unet()).num_classes == 0
    with pytest.raises(TypeError, match="unet must be a diffusers UNet2DModel-like model"):
        DiffusersUNet(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="timestep_scale must be a positive finite number"):
        DiffusersUNet(unet, timestep_scale=0)
    with pytest.raises(ValueError, match="in_channels=3, out_channels=4"):
        DiffusersUNet(UNet2DModel(sample_size=8, in_channels=3, out_channels=4, block_out_channels=(8, 16),
                                  norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                  up_block_types=("UpBlock2D",) * 2))


def test_dropout_seed_fixes_the_masks():
    net = DiffusersUNet(tiny_unet(dropout=0.5)).train()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.1, -0.5])
    a, b, c = (net(x, t, dropout_seed=s) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("patched", [False, True])
def test_ict_trains_a_diffusers_unet(patched):
    unet = tiny_unet()
    if patched:
        report = fastcm.patch(unet)
        assert report.counts["AttnProcessor2_0 -> FastcmAttnProcessor"] > 0
    model = ConsistencyModel(DiffusersUNet(unet))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(16, 3, 8, 8, generator=g) * 2 - 1)
    cfg = ICTConfig(total_steps=4, batch_size=4, lr=1e-3, ema_beta=0.9, log_every=1, sample_every=0, save_every=0,
                    s0=2, s1=8, seed=0)
    seen = []
    result = train_ict(cfg, data, model, progress=False, callbacks=[seen.append])
    assert result.step == 4 and result.skipped_steps == 0
    losses = [r["loss"] for r in seen]
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses)
    after = result.model.state_dict()
    assert list(after) == list(before) and any(not torch.equal(after[k], before[k]) for k in before)
    images = sample(result.ema.module, 3, sigmas=(80.0, 0.821), seeds=0)  # fastcm's two-step sampler
    assert images.shape == (3, 3, 8, 8) and images.abs().max() <= 1


def test_fd_stage_fine_tunes_a_diffusers_unet():
    # fastcm's FD-loss stage (finetune_fd) through the adapter, on the patched model: the logged FD of step 0 is
    # the Frechet distance of the initial model's one-step samples (checked against scipy's formula) and the
    # weights move.
    from scipy import linalg

    from fastcm.train import FDConfig, finetune_fd, reference_stats
    from fastcm.train.fd import one_step_inputs

    unet = tiny_unet()
    fastcm.patch(unet)
    model = ConsistencyModel(DiffusersUNet(unet))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 6))
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(64, 3, 8, 8, generator=g) * 2 - 1)
    ref = reference_stats(net, data)
    cfg = FDConfig(total_steps=3, batch_size=16, lr=1e-3, ema_beta=0.5, log_every=1, sample_every=0, save_every=0,
                   s1=8, fd_mode="batch")
    with torch.no_grad():
        z, _ = one_step_inputs(cfg.seed, 0, 0, 16, (3, 8, 8), 0, True)
        feats = net(model(z * 80.0, torch.full((16,), 80.0))).double().numpy()
    res = finetune_fd(cfg, model, net, ref, progress=False)
    mu, sigma = feats.mean(0), torch.from_numpy(feats).T.cov().numpy()
    mu_r, sigma_r = ref.mu.numpy(), ref.sigma.numpy()
    expected = ((mu - mu_r) ** 2).sum() + sigma.trace() + sigma_r.trace() \
        - 2 * linalg.sqrtm(sigma @ sigma_r).real.trace()
    assert res.step == 3 and res.records[0]["fd"] == pytest.approx(float(expected), rel=1e-5)
    assert any(not torch.equal(res.model.state_dict()[k], v) for k, v in init.items())
