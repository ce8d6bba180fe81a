"""Stage 1 with every method (fastcm.train.train_method, ICTConfig(method=...)): exact resume, the method recorded in
checkpoints and picked up by load_model, the NaN guard, compile (eager backend: bit-identical to eager), the
wall-clock budget, the FD stage with the method's own one-step generator, and config validation."""
import json

import pytest
import torch
from torch import nn

from fastcm.cm import METHODS, MeanFlowModel, TrigFlowModel, get_method, method_of_model
from fastcm.cm.sampling import PerSampleNoise, resolve_seeds
from fastcm.data import ArrayDataset, load_digits
from fastcm.models import build_unet
from fastcm.train import (Callback, FDConfig, ICTConfig, NonFiniteError, finetune_fd, load_checkpoint, load_model,
                          reference_stats, train_method)
from fastcm.train.checkpoint_file import read_checkpoint_meta
from fastcm.train.fd import one_step_generate
from fastcm.train.loop import sampling_method
from helpers import torchrun

JVP_METHODS = ("sct", "meanflow")
CLASSES = {"ict": "ConsistencyModel", "sct": "TrigFlowModel", "meanflow": "MeanFlowModel"}


def _cfg(method, **kw):
    base = dict(total_steps=6, batch_size=8, lr=1e-3, ema_beta=0.9, log_every=1, sample_every=3, num_samples=10,
                save_every=3, keep_last=2, seed=3, s0=2, s1=8, method=method, tangent_warmup=4)
    return ICTConfig(**{**base, **kw})


def _model(method, seed=0):
    torch.manual_seed(seed)  # tiny preset: attention, seeded dropout 0.1; class-conditional
    method_obj = get_method(method, **_cfg(method).method_hyperparameters())
    return method_obj.make_model(build_unet("tiny", num_classes=10, impl="torch", **METHODS[method].unet_overrides))


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


class _Crash(Callback):
    def __init__(self, at):
        self.at = at

    def on_log(self, record):
        if record["step"] == self.at:
            raise KeyboardInterrupt("simulated crash")


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", JVP_METHODS)
def test_resume_is_exact_and_checkpoints_record_the_method(tmp_path, digits, method):
    ref = train_method(_cfg(method), digits, _model(method), out_dir=tmp_path / "ref", progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ref.records)
    if method == "sct":  # the tangent warm-up r = min(1, step / H) is logged, H = 4
        assert [r["tangent_warmup"] for r in ref.records] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(KeyboardInterrupt):
        train_method(_cfg(method), digits, _model(method), out_dir=tmp_path / "run", progress=False,
                     callbacks=[_Crash(at=5)])
    res = train_method(_cfg(method), digits, _model(method, seed=1), out_dir=tmp_path / "run", resume=True,
                       progress=False)
    assert res.step == 6 and _equal(ref.model, res.model) and _equal(ref.ema.module, res.ema.module)
    ckpt = res.checkpoint
    meta = read_checkpoint_meta(ckpt)
    assert meta["method"] == method and meta["stage"] == method and meta["model"]["method"] == method
    ema = load_model(ckpt)
    assert type(ema).__name__ == CLASSES[method] and method_of_model(ema) == method and not ema.training
    assert _equal(ema, ref.ema.module)
    assert _equal(load_model(ckpt, weights="model"), ref.model)
    # the run's sample grids come from the method's own sampler
    grid = sampling_method(method).sample(ema, 10, 1, torch.arange(10) % 10, seeds=3)
    assert grid.shape == (10, 1, 8, 8) and grid.abs().max() <= 1
    # resuming with another method, or handing train_method another method's model, is refused in one line
    other = "meanflow" if method == "sct" else "sct"
    with pytest.raises(ValueError, match=rf"is a '{method}' checkpoint; cannot resume the '{other}' stage"):
        train_method(_cfg(other), digits, _model(other), out_dir=tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ValueError, match=rf"cfg.method is '{other}' but the model is a {CLASSES[method]}"):
        train_method(_cfg(other), digits, _model(method), progress=False)


def test_old_checkpoints_load_as_ict(tmp_path, digits):
    res = train_method(_cfg("ict", total_steps=2, save_every=0), digits, _model("ict"), out_dir=tmp_path,
                       progress=False)
    tensors, meta = load_checkpoint(res.checkpoint)
    assert meta["method"] == "ict"
    from fastcm.train import save_checkpoint

    old = {k: v for k, v in meta.items() if k != "method"}  # written before the key existed
    save_checkpoint(tmp_path / "old.safetensors", tensors, old)
    assert type(load_model(tmp_path / "old.safetensors")).__name__ == "ConsistencyModel"


@pytest.mark.parametrize("method", JVP_METHODS)
def test_nan_guard_stops_a_method_run(digits, method):
    model = _model(method)
    model.unet.register_forward_hook(lambda module, args, out: out * float("nan"))  # every U-Net output is NaN
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        train_method(_cfg(method, max_nonfinite=3, sample_every=0, save_every=0), digits, model, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update was applied


@pytest.mark.parametrize("method", JVP_METHODS)
def test_compiled_step_matches_eager(method):
    """compile=True compiles the sampler's model call; the one-pass training step (dual inputs) runs eagerly
    (fastcm.cm.jvp: a compiled module fed forward-AD duals returns a wrong tangent on torch 2.13, silently), so no
    graph is captured during training. Results must be identical to eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.arange(32) % 10)
    cfg = _cfg(method, total_steps=2, sample_every=0, save_every=0)
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        res = train_method(cfg.replace(compile=compiled, compile_backend="eager"), data, _model(method),
                           progress=False)
        results[compiled] = res
        if compiled:
            assert counters["stats"]["unique_graphs"] == 0 and not counters["graph_break"]
    assert [r["loss"] for r in results[False].records] == [r["loss"] for r in results[True].records]
    assert _equal(results[False].model, results[True].model)
    torch._dynamo.reset()


def test_wall_clock_budget_stops_and_saves(tmp_path, digits):
    res = train_method(_cfg("sct", total_steps=50), digits, _model("sct"), out_dir=tmp_path, progress=False,
                       max_seconds=1e-6)
    assert res.step == 1 and res.checkpoint is not None and read_checkpoint_meta(res.checkpoint)["step"] == 1
    with pytest.raises(ValueError, match="max_seconds must be None or a positive number"):
        train_method(_cfg("sct"), digits, _model("sct"), progress=False, max_seconds=0)


@pytest.mark.parametrize("method", ("ict",) + JVP_METHODS)
def test_fd_stage_uses_the_methods_one_step_generator(tmp_path, method):
    model = _model(method).eval()
    labels, seeds = torch.arange(6) % 10, 40
    z = PerSampleNoise(resolve_seeds(6, seeds)).randn((1, 8, 8))
    with torch.no_grad():
        want = sampling_method(method).sample(model, 6, 1, labels, seeds=seeds)
        got = one_step_generate(model, z, labels).clamp(-1, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.manual_seed(11)
    feature_net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                nn.Linear(16, 5))
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.arange(40) % 10)
    ref = reference_stats(feature_net, data)
    cfg = FDConfig(total_steps=2, batch_size=20, lr=1e-3, ema_beta=0.5, log_every=1, sample_every=0, num_samples=10,
                   save_every=0, fd_mode="batch")
    res = finetune_fd(cfg, model.train(), feature_net, ref, out_dir=tmp_path, progress=False)
    assert res.step == 2 and all(r["fd"] >= 0 for r in res.records)
    assert read_checkpoint_meta(res.checkpoint)["method"] == method
    assert method_of_model(load_model(res.checkpoint)) == method
    if method != "ict":
        with pytest.raises(ValueError, match="needs an iCT model"):
            finetune_fd(cfg.replace(ict_weight=0.5), model, feature_net, ref, dataset=data, progress=False)


def test_config_validation():
    assert ICTConfig().method == "ict" and ICTConfig().tangent_warmup == 1000
    for bad, match in (({"method": "ect"}, "method must be one of"), ({"tangent_warmup": -1}, "tangent_warmup"),
                       ({"mf_ratio": 1.5}, "mf_ratio"), ({"sct_P_std": 0.0}, "sct_P_std"),
                       ({"tangent_c": float("nan")}, "tangent_c")):
        with pytest.raises(ValueError, match=match):
            ICTConfig(**bad)
    cfg = ICTConfig(method="sct", tangent_warmup=7)
    assert ICTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.method_hyperparameters()["warmup_steps"] == 7
    assert isinstance(get_method("sct", **cfg.method_hyperparameters()).make_model(
        build_unet("tiny", time_scale=1.0)), TrigFlowModel)
    assert isinstance(get_method("meanflow", **ICTConfig(method="meanflow").method_hyperparameters()).make_model(
        build_unet("tiny", time_inputs=2)), MeanFlowModel)


DDP_WORKER = '''
import os, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from fastcm.cm import METHODS, get_method
from fastcm.data import ArrayDataset
from fastcm.models import build_unet
from fastcm.train import ICTConfig, train_method

rank = int(os.environ["RANK"])
g = torch.Generator().manual_seed(0)
data = ArrayDataset(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.arange(64) % 10)
state = {}
for name in ("sct", "meanflow"):
    cfg = ICTConfig(total_steps=2, batch_size=8, lr=1e-3, ema_beta=0.5, log_every=1, sample_every=0,
                    num_samples=10, save_every=0, method=name, tangent_warmup=1)
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP broadcasts rank 0's
    unet = build_unet("tiny", num_classes=10, impl="torch", **METHODS[name].unet_overrides)
    model = get_method(name, **cfg.method_hyperparameters()).make_model(unet)
    init = {f"{name}/init/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    res = train_method(cfg, data, model, progress=False)
    state.update(init)
    state.update({f"{name}/model/{k}": v.detach().clone() for k, v in res.model.state_dict().items()})
save_file(state, os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
'''


@pytest.mark.slow
def test_ddp_two_cpu_ranks_train_sct_and_meanflow_in_sync(tmp_path):
    """Each rank draws its own batch and times; identical weights after two steps mean DDP averaged the gradients
    of the trainable pass (the JVP runs on the unwrapped module, outside DDP)."""
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    torchrun(script, tmp_path, timeout=300)
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    for name in ("sct", "meanflow"):
        keys = [k for k in a if k.startswith(f"{name}/model/")]
        assert keys and all(torch.equal(a[k], b[k]) for k in keys), f"{name}: ranks diverged"
        inits = [k.replace("/model/", "/init/") for k in keys]
        assert any(not torch.equal(a[k], b[k]) for k in inits)  # the ranks did start apart
        assert any(not torch.equal(a[k], a[i]) for k, i in zip(keys, inits)), f"{name}: no training"


@pytest.mark.parametrize("method", JVP_METHODS)
def test_sigint_saves_the_step_and_resume_is_exact(tmp_path, digits, method):
    import os
    import signal

    from fastcm.train import TrainingInterrupted

    class _Signal(Callback):
        def on_log(self, record):
            if record["step"] == 2:
                os.kill(os.getpid(), signal.SIGINT)  # arrives while step 3 is in flight (logged at step 2)

    cfg = _cfg(method, sample_every=0, save_every=0)
    ref = train_method(cfg, digits, _model(method), progress=False)
    with pytest.raises(TrainingInterrupted) as e:
        train_method(cfg, digits, _model(method), out_dir=tmp_path, progress=False, callbacks=[_Signal()])
    assert e.value.exit_code == 130 and read_checkpoint_meta(e.value.checkpoint)["step"] == e.value.step < 6
    res = train_method(cfg, digits, _model(method, seed=4), out_dir=tmp_path, resume=True, progress=False)
    assert res.step == 6 and _equal(res.model, ref.model)
