"""fastcm.patch against diffusers' own behaviour: FusedResnetBlock2D vs diffusers' ResnetBlock2D for every
configuration diffusers can build, and the model methods that must keep working on a patched model
(IP-Adapter's ``proc.__class__()``, set_default_attn_processor, fuse_qkv_projections, pickle / torch.save)."""
import copy
import io
import itertools
import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[test])")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import (AttnProcessor, AttnProcessor2_0,  # noqa: E402
                                                  FusedAttnProcessor2_0)
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

import fastcm  # noqa: E402
from fastcm.integrations.diffusers_unet import FastcmAttnProcessor, FusedResnetBlock2D  # noqa: E402
from helpers import assert_close  # noqa: E402

N, CIN, H = 2, 4, 4
TEMB = 6
# every constructor argument of ResnetBlock2D that changes its forward's path (diffusers 0.42): the branches (norm,
# temb projection, resampling, width change) in full product, the three flags cycled over the product so that each
# value meets each norm branch
GRID = dict(norm=["default", "scale_shift", "group"], temb_channels=[TEMB, None], out=[4, 8],
            resample=["none", "up", "down", "up-fir", "down-sde_vp"])
FLAGS = dict(output_scale_factor=[1.0, 2.0], conv_shortcut=[False, True], skip_time_act=[False, True])


def build(norm, temb_channels, out, resample, output_scale_factor, conv_shortcut, skip_time_act):
    """diffusers' ResnetBlock2D, or None for a configuration diffusers refuses to build."""
    kind, _, kernel = resample.partition("-")
    try:
        torch.manual_seed(0)
        block = ResnetBlock2D(in_channels=CIN, out_channels=out, temb_channels=temb_channels, groups=2,
                              time_embedding_norm=norm, output_scale_factor=output_scale_factor,
                              conv_shortcut=conv_shortcut, use_in_shortcut=True if conv_shortcut else None,
                              skip_time_act=skip_time_act, up=kind == "up", down=kind == "down",
                              kernel=kernel or None)
    except ValueError:  # e.g. time_embedding_norm="group" with a temb_channels
        return None
    with torch.no_grad():
        for m in (block.norm1, block.norm2):
            m.weight.normal_(1.0, 0.5), m.bias.normal_(0.0, 0.5)
    return block.double()


def tembs(norm, temb_channels, out):
    """The temb values diffusers' forward takes: a vector to project, or (no projection) none or a raw map."""
    if temb_channels is not None:
        return {"vector": torch.randn(N, TEMB, dtype=torch.float64)}
    width = 2 * out if norm == "scale_shift" else out
    raw = {"raw (N, C, 1, 1)": torch.randn(N, width, 1, 1, dtype=torch.float64)}
    return raw if norm == "scale_shift" else {"None": None, **raw}


CASES = []
for i, values in enumerate(itertools.product(*GRID.values())):
    cfg = dict(zip(GRID, values), **{k: v[(i >> j) % 2] for j, (k, v) in enumerate(FLAGS.items())})
    if build(**cfg) is not None:
        CASES += [(cfg, name) for name in tembs(cfg["norm"], cfg["temb_channels"], cfg["out"])]


def _check(cfg, temb_name, impl):
    ref_block = build(**cfg)
    block = copy.deepcopy(ref_block)
    report = fastcm.patch(block, impl=impl)
    assert type(block) is FusedResnetBlock2D
    assert report.replaced == [("", f"ResnetBlock2D -> FusedResnetBlock2D (2 GroupNorm+SiLU, {cfg['norm']})")]
    torch.manual_seed(1)
    x = torch.randn(N, CIN, H, H, dtype=torch.float64, requires_grad=True)
    temb = tembs(cfg["norm"], cfg["temb_channels"], cfg["out"])[temb_name]
    ref = ref_block(x, temb)
    out = block(x, temb)
    assert_close(out, ref, torch.float64)
    g, g_ref = (torch.autograd.grad(o.square().sum(), x)[0] for o in (out, ref))
    assert_close(g, g_ref, torch.float64)


def test_every_buildable_configuration_is_covered():
    norms = {cfg["norm"] for cfg, _ in CASES}
    assert norms == {"default", "scale_shift", "group"}  # "group": the VAE decoder's blocks (temb_channels=None)
    assert {t for _, t in CASES} == {"vector", "None", "raw (N, C, 1, 1)"}
    for norm in norms:  # each flag value meets each norm branch
        cfgs = [c for c, _ in CASES if c["norm"] == norm]
        assert all({c[k] for c in cfgs} == set(v) for k, v in FLAGS.items()), norm


@pytest.mark.parametrize("cfg, temb", CASES, ids=[f"{c['norm']}-{c['temb_channels']}-{c['out']}-{c['resample']}-"
                                                  f"{c['output_scale_factor']}-{c['conv_shortcut']}-"
                                                  f"{c['skip_time_act']}-{t}" for c, t in CASES])
def test_fused_block_matches_diffusers_torch(cfg, temb):
    _check(cfg, temb, "torch")


# the interpreted Triton route on one configuration per norm branch and temb kind (fastcm's kernels, fused calls)
TRITON = [(c, t) for c, t in CASES if c["out"] == 8 and c["resample"] in ("none", "down")]


@pytest.mark.parametrize("cfg, temb", TRITON, ids=[f"{c['norm']}-{c['resample']}-{t}" for c, t in TRITON])
def test_fused_block_matches_diffusers_triton(cfg, temb):
    _check(cfg, temb, "triton")


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=2,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def test_vae_decoder_runs_patched():
    vae = tiny_vae().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = vae(x, sample_posterior=False).sample
        report = fastcm.patch(vae, impl="torch")
        out = vae(x, sample_posterior=False).sample
    assert sum("group)" in kind for _, kind in report.replaced) > 0  # the decoder's blocks, labelled as they are
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def tiny_cond():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=12,
                                layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def cond_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 617]), torch.randn(2, 5, 12, generator=g)


def test_processor_rebuilt_without_arguments():
    # diffusers' IP-Adapter loading, unload_ip_adapter and the motion/Flux loaders call proc.__class__()
    model = tiny_cond()
    with torch.no_grad():
        ref = model(*cond_inputs()).sample
        fastcm.patch(model, impl="torch")
        model.set_attn_processor({k: p.__class__() for k, p in model.attn_processors.items()})
        out = model(*cond_inputs()).sample
    assert all(type(p) is FastcmAttnProcessor and type(p.original) is AttnProcessor2_0
               for p in model.attn_processors.values())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl"):
        FastcmAttnProcessor(impl="cuda")


def test_set_default_attn_processor_on_a_patched_model():
    model, twin = tiny_cond(), tiny_cond()
    fastcm.patch(model, impl="torch")
    model.set_default_attn_processor()
    twin.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in model.attn_processors.values())
    with torch.no_grad():
        torch.testing.assert_close(model(*cond_inputs()).sample, twin(*cond_inputs()).sample, rtol=0, atol=0)
    fastcm.unpatch(model)
    assert all(type(p) is AttnProcessor for p in model.attn_processors.values())
    assert "set_default_attn_processor" not in model.__dict__


def test_fuse_qkv_projections_keeps_fastcm_attention():
    model, twin = tiny_cond(), tiny_cond()
    fastcm.patch(model, impl="torch")
    model.fuse_qkv_projections()
    twin.fuse_qkv_projections()
    procs = list(model.attn_processors.values())
    assert all(type(p) is FastcmAttnProcessor and type(p.original) is FusedAttnProcessor2_0 for p in procs)
    with torch.no_grad():
        torch.testing.assert_close(model(*cond_inputs()).sample, twin(*cond_inputs()).sample, rtol=1e-5, atol=1e-5)
        model.unfuse_qkv_projections()
        assert all(type(p) is FastcmAttnProcessor and type(p.original) is AttnProcessor2_0
                   for p in model.attn_processors.values())
        # the unfused projections are read again: a changed to_q shows
        model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(2)
        twin.unfuse_qkv_projections()
        twin.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(2)
        torch.testing.assert_close(model(*cond_inputs()).sample, twin(*cond_inputs()).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_whole_patched_model_pickles(how):
    model = tiny_cond()
    fastcm.patch(model, impl="torch")
    if how == "pickle":
        copy_ = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        copy_ = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(copy_(*cond_inputs()).sample, model(*cond_inputs()).sample, rtol=0, atol=0)
    assert fastcm.unpatch(copy_) and all(type(p) is AttnProcessor2_0 for p in copy_.attn_processors.values())
    assert all(type(m) is ResnetBlock2D for m in copy_.modules() if isinstance(m, ResnetBlock2D))
