"""diffusers in and out (fastcm.integrations.diffusers_io, `fastcm train --init diffusers:DIR`, `fastcm export`) on a
tiny random UNet2DModel saved with save_pretrained in a temporary folder (no network): the folder's model is the
CM-parametrized diffusers U-Net, checkpoints rebuild it, and the exported ConsistencyModelPipeline samples what
fastcm's own samplers draw from the same seeds."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[test])")
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel  # noqa: E402

from fastcm.cli import main  # noqa: E402
from fastcm.cm import get_method, sample  # noqa: E402
from fastcm.cm.methods import ICT_TWO_STEP_SIGMA  # noqa: E402
from fastcm.integrations.adapter import DiffusersUNet  # noqa: E402
from fastcm.integrations.diffusers_io import load_consistency_model  # noqa: E402
from fastcm.train import load_model, read_checkpoint_meta  # noqa: E402

SIGMAS = dict(sigma_min=0.002, sigma_max=40.0, sigma_data=0.6)  # not the defaults: they must come from the config


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTCM_CACHE", str(tmp_path_factory.getbasetemp() / "fastcm-cache"))


def tiny_unet(seed=0) -> UNet2DModel:
    """The layout of the public CM ImageNet-64 UNet2DModels (resnet up/down sampling, scale-shift norm, attention,
    class embedding) at 1x8x8 for the digits data."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), norm_num_groups=4,
                       attention_head_dim=8, resnet_time_scale_shift="scale_shift", downsample_type="resnet",
                       upsample_type="resnet", num_class_embeds=10).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A pipeline folder (model_index.json, unet/, scheduler/) as diffusers writes one."""
    path = tmp_path_factory.mktemp("diffusers-in")
    ConsistencyModelPipeline(unet=tiny_unet(), scheduler=CMStochasticIterativeScheduler(**SIGMAS)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ict_run(folder, tmp_path_factory):
    """`fastcm train --stage ict --init diffusers:DIR`, 2 steps: its run directory."""
    out = tmp_path_factory.mktemp("ict-run")
    assert main(["train", "--init", f"diffusers:{folder}", "--steps", "2", "--batch-size", "8", "--out", str(out),
                 "--overwrite", "--no-progress"]) == 0
    return out


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_folder_loads_as_the_cm_parametrized_unet(folder, tmp_path):
    cm = load_consistency_model(f"diffusers:{folder}")
    assert (cm.sigma_min, cm.sigma_max, cm.sigma_data) == (0.002, 40.0, 0.6)
    ref = tiny_unet()  # unpatched, the weights of the folder
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    sigma = torch.tensor([0.01, 1.0, 30.0])
    s, sd, smin = sigma.view(-1, 1, 1, 1), 0.6, 0.002
    # CM App. C with diffusers' scheduler: t = 250 ln sigma, c_skip / c_out shifted by sigma_min
    F = ref(x / (s**2 + sd**2).sqrt(), 250 * sigma.log(), class_labels=labels).sample
    want = sd**2 / ((s - smin) ** 2 + sd**2) * x + (s - smin) * sd / (s**2 + sd**2).sqrt() * F
    with torch.no_grad():
        torch.testing.assert_close(cm(x, sigma, labels), want, rtol=1e-5, atol=1e-5)
    assert cm.unet.unet.__dict__.get("_fastcm_patch") is not None  # patched with fastcm ops
    bare = tmp_path / "bare"  # a bare model folder, its scheduler config beside it
    ref.save_pretrained(bare)
    CMStochasticIterativeScheduler(sigma_max=20.0).save_config(bare)
    cm2 = load_consistency_model(str(bare))
    assert (cm2.sigma_max, cm2.sigma_data) == (20.0, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(cm2.unet.unet.state_dict().values(), ref.state_dict().values()))


def _pipeline_images(pipe, seeds, labels, **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(batch_size=len(seeds), class_labels=labels, generator=gens, output_type="pt", **kw).images


def test_ict_checkpoint_exports_a_pipeline_that_samples_like_fastcm(ict_run, tmp_path, capsys, monkeypatch):
    meta = read_checkpoint_meta(next((ict_run / "checkpoints").glob("ckpt_*.safetensors")))
    assert meta["model"]["diffusers"]["unet_config"]["_class_name"] == "UNet2DModel"
    rc, out, err = run(capsys, "export", "--checkpoint", ict_run, "--diffusers", tmp_path / "pipe")
    assert rc == 0, err
    pipe = ConsistencyModelPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert {k: pipe.scheduler.config[k] for k in SIGMAS} == SIGMAS
    model = load_model(next((ict_run / "checkpoints").glob("ckpt_*.safetensors")))
    seeds, labels = [11, 12, 13], torch.tensor([2, 5, 7])
    one = get_method("ict", total_steps=2).sample(model, 3, 1, class_labels=labels, seeds=seeds)
    torch.testing.assert_close(_pipeline_images(pipe, seeds, labels, num_inference_steps=1), (one + 1) / 2,
                               rtol=0, atol=1e-5)
    # two steps at a Karras grid point of the scheduler: fastcm's sampler at the same sigma
    two = _pipeline_images(pipe, seeds, labels, num_inference_steps=None, timesteps=[17, 0])
    mid = float(pipe.scheduler.sigmas[1])
    ref = sample(model, 3, labels, sigmas=(40.0, mid), seeds=seeds)
    torch.testing.assert_close(two, (ref + 1) / 2, rtol=0, atol=1e-5)
    assert (ref - one).abs().max() > 1e-2  # the second step changed the samples
    # iCT's own two-step sigma: the scheduler reaches only grid points, so put 0.821 on its grid
    original = pipe.scheduler.set_timesteps

    def at_ict_sigma(*a, **kw):
        original(*a, **kw)
        pipe.scheduler.sigmas[1] = ICT_TWO_STEP_SIGMA
        pipe.scheduler.timesteps[1] = float(pipe.scheduler.sigma_to_t(ICT_TWO_STEP_SIGMA))

    monkeypatch.setattr(pipe.scheduler, "set_timesteps", at_ict_sigma)
    ict_two = get_method("ict", total_steps=2).sample(model, 3, 2, class_labels=labels, seeds=seeds)
    torch.testing.assert_close(_pipeline_images(pipe, seeds, labels, num_inference_steps=None, timesteps=[17, 0]),
                               (ict_two + 1) / 2, rtol=0, atol=1e-5)


def test_checkpoints_rebuild_the_diffusers_unet_and_resume(folder, ict_run, tmp_path, capsys):
    ckpt = sorted((ict_run / "checkpoints").glob("ckpt_*.safetensors"))[-1]
    model = load_model(ckpt, weights="model")
    assert isinstance(model.unet, DiffusersUNet) and (model.sigma_max, model.sigma_data) == (40.0, 0.6)
    assert any((a - b).abs().max() > 0 for a, b in zip(model.unet.unet.state_dict().values(),
                                                        tiny_unet().state_dict().values()))  # trained weights
    rc, out, err = run(capsys, "sample", "--checkpoint", ict_run, "--per-class", 1, "--out", tmp_path / "s")
    assert rc == 0 and (tmp_path / "s" / "samples.npz").is_file(), err
    args = ["train", "--init", f"diffusers:{folder}", "--steps", 2, "--save-every", 1, "--batch-size", 8,
            "--out", tmp_path / "run", "--no-progress"]
    assert run(capsys, *args)[0] == 0
    last = tmp_path / "run" / "checkpoints" / "ckpt_00000002.safetensors"
    final = load_model(last, weights="model").state_dict()
    last.unlink()
    rc, out, err = run(capsys, *args, "--resume")
    assert rc == 0 and "trained 2 steps" in out, err
    for k, v in load_model(last, weights="model").state_dict().items():  # the resumed step 2 is step 2
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)


def test_fd_stage_from_a_diffusers_folder_and_from_its_ict_run(folder, ict_run, tmp_path, capsys):
    for name, init in (("fd", f"diffusers:{folder}"), ("fd-of-run", ict_run)):
        rc, out, err = run(capsys, "train", "--stage", "fd", "--init", init, "--steps", 1, "--batch-size", 10,
                           "--out", tmp_path / name, "--no-progress")
        assert rc == 0, err
        ckpt = next((tmp_path / name / "checkpoints").glob("ckpt_*.safetensors"))
        model = load_model(ckpt)
        assert isinstance(model.unet, DiffusersUNet) and model.sigma_max == 40.0
    rc, out, err = run(capsys, "export", "--checkpoint", ckpt, "--diffusers", tmp_path / "pipe")
    assert rc == 0 and (tmp_path / "pipe" / "unet" / "config.json").is_file(), err


def _write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory"),
    ("no-config", "has no"),
    ("not-unet2d", "describes a 'UNet2DConditionModel', not a UNet2DModel"),
    ("wrong-scheduler", "configures a 'DDPMScheduler', not a CMStochasticIterativeScheduler"),
    ("no-weights", "holds no weights"),
])
def test_bad_folders_are_refused_in_one_line(case, message, folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    if case == "no-config":
        bad.mkdir()
    elif case == "not-unet2d":
        _write(bad / "config.json", {"_class_name": "UNet2DConditionModel"})
    elif case in ("wrong-scheduler", "no-weights"):
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        _write(bad / "config.json", cfg)
        if case == "wrong-scheduler":
            (bad / "diffusion_pytorch_model.safetensors").write_bytes(
                (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
            _write(bad / "scheduler_config.json", {"_class_name": "DDPMScheduler"})
    rc, out, err = run(capsys, "train", "--stage", "fd", "--init", f"diffusers:{bad}", "--out", tmp_path / "o")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_python_api_rejects_bad_arguments(folder, tmp_path):
    from fastcm.integrations.diffusers_io import export_pipeline, load_unet

    with pytest.raises(TypeError, match="must be a folder path"):
        load_unet(3)
    with pytest.raises(TypeError, match="model must be a fastcm ConsistencyModel"):
        export_pipeline("model", tmp_path / "x")
    with pytest.raises(TypeError, match="out must be a folder path"):
        export_pipeline(load_consistency_model(str(folder)), None)


def test_export_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0 and "ConsistencyModelPipeline" in capsys.readouterr().out


def test_export_refusals(ict_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "file").write_text("")
    for target, message in ((tmp_path / "full", "exists and is not empty"), (tmp_path / "file", "is a file"),
                            (tmp_path / "file" / "sub", "not a directory")):
        rc, out, err = run(capsys, "export", "--checkpoint", ict_run, "--diffusers", target)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    rc, out, err = run(capsys, "export", "--checkpoint", ict_run, "--diffusers", tmp_path / "full", "--overwrite")
    assert rc == 0 and (tmp_path / "full" / "model_index.json").is_file(), err


@pytest.mark.parametrize("method, message", [
    ("ict", "a fastcm U-Net cannot be converted to a diffusers UNet2DModel exactly: its residual blocks"),
    ("sct", "is a sct checkpoint: diffusers' CMStochasticIterativeScheduler samples only"),
])
def test_fastcm_unets_and_sct_are_refused(method, message, tmp_path, capsys):
    rc, out, err = run(capsys, "train", "--preset", "tiny", "--method", method, "--steps", 1, "--batch-size", 4,
                       "--out", tmp_path / "run", "--no-progress")
    assert rc == 0, err
    rc, out, err = run(capsys, "export", "--checkpoint", tmp_path / "run", "--diffusers", tmp_path / "pipe")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pipe").exists()


def test_the_refusal_is_true_unet2d_blocks_add_without_a_scale():
    # what the refusal claims: UNet2DModel's down/up resnets and attention keep output_scale_factor 1, while every
    # fastcm block divides by sqrt(2) (only the mid block has a factor: mid_block_scale_factor)
    unet = tiny_unet()
    factors = {m.output_scale_factor for b in (*unet.down_blocks, *unet.up_blocks) for m in b.modules()
               if hasattr(m, "output_scale_factor")}
    assert factors == {1.0}
