"""iCT stage: exact resume after a crash, EMA and clipping against closed forms, the NaN guard, run directories."""
import json

import pytest
import torch

from fastcm.cm import ConsistencyModel
from fastcm.data import ArrayDataset, load_digits
from fastcm.models import build_unet
from fastcm.train import (Callback, CheckpointError, CheckpointManager, ICTConfig, NonFiniteError, Trainer,
                          load_checkpoint, load_model, train_ict)


def _cfg(**kw):
    base = dict(total_steps=10, batch_size=8, lr=1e-3, ema_beta=0.9, log_every=1, sample_every=4, num_samples=10,
                save_every=5, keep_last=2, hflip=True, seed=3, s0=2, s1=8)
    return ICTConfig(**{**base, **kw})


def _model(seed=0, **kw):
    torch.manual_seed(seed)  # tiny preset: attention, seeded dropout 0.1, Fourier embedding; here class-conditional
    return ConsistencyModel(build_unet("tiny", num_classes=10, impl="torch", **kw))



@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


class _Crash(Callback):
    """Simulates a killed job: raises at the record of step ``at`` (after the checkpoint of an earlier step)."""

    def __init__(self, at):
        self.at, self.samples, self.checkpoints = at, [], []

    def on_log(self, record):
        if record["step"] == self.at:
            raise KeyboardInterrupt("simulated crash")

    def on_sample(self, step, images):
        self.samples.append((step, images.shape))

    def on_checkpoint(self, step, path):
        self.checkpoints.append(step)


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("time", "img_per_s")} for r in records]


def test_resume_after_crash_is_exact(tmp_path, digits):
    ref = train_ict(_cfg(), digits, _model(), out_dir=tmp_path / "ref", progress=False)
    crash = _Crash(at=7)
    with pytest.raises(KeyboardInterrupt):
        train_ict(_cfg(), digits, _model(), out_dir=tmp_path / "run", progress=False, callbacks=[crash])
    assert crash.checkpoints == [5] and crash.samples == [(4, torch.Size([10, 1, 8, 8]))]
    with pytest.raises(FileExistsError, match="resume=True"):  # never silently restarts over a run
        train_ict(_cfg(), digits, _model(), out_dir=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"config changed \(lr: 0.001 -> 0.002\)"):
        train_ict(_cfg(lr=2e-3), digits, _model(), out_dir=tmp_path / "run", resume=True, progress=False)
    seen = []
    res = train_ict(_cfg(log_every=2), digits, _model(seed=1), out_dir=tmp_path / "run", resume=True,
                    progress=False, callbacks=[seen.append])  # log_every may change; the weights come from disk
    assert res.step == 10 and [r["step"] for r in seen] == [6, 8, 10]
    for a, b in [(ref.model.state_dict(), res.model.state_dict()), (ref.ema.state_dict(), res.ema.state_dict())]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl: the crashed run's records after step 5 were dropped, then steps 6, 8, 10 appended
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 8, 10]
    assert _strip(lines[:5]) == _strip(ref.records[:5])  # later records average 2 steps (log_every=2)
    assert ref.records[0]["N"] == 3 and ref.records[-1]["N"] == 9  # N(k) = min(s0 2^floor(k/K'), s1) + 1
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == \
        ["step_00000004.png", "step_00000008.png", "step_00000010.png"]
    ckpts = CheckpointManager(tmp_path / "run" / "checkpoints").checkpoints()
    assert [s for s, _ in ckpts] == [5, 10]
    meta = load_checkpoint(ckpts[-1][1])[1]
    assert meta["curriculum"] == {"N": 9, "s0": 2, "s1": 8, "K": 10} and meta["step"] == 10
    assert meta["config"] == json.loads(json.dumps(_cfg().to_dict())) | {"log_every": 2}
    ema = load_model(ckpts[-1][1])
    raw = load_model(ckpts[-1][1], weights="model")
    for k, v in ref.ema.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in ref.model.state_dict().items())
    assert not ema.training and isinstance(ema, ConsistencyModel) and ema.num_classes == 10


def test_damaged_newest_checkpoint_is_refused_and_kept(tmp_path, digits):
    cfg = _cfg(total_steps=6, save_every=2, keep_last=3, sample_every=0)
    ref = train_ict(cfg, digits, _model(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_ict(cfg, digits, _model(), out_dir=tmp_path, progress=False, callbacks=[_Crash(at=5)])
    newest = tmp_path / "checkpoints" / "ckpt_00000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # the disk filled up while it was written
    damaged = newest.read_bytes()
    with pytest.raises(CheckpointError, match=r"ckpt_00000004.safetensors .*left untouched.*restart"):
        train_ict(cfg, digits, _model(seed=5), out_dir=tmp_path, resume=True, progress=False)
    assert newest.read_bytes() == damaged  # evidence: neither skipped (and later overwritten) nor deleted
    res = train_ict(cfg, digits, _model(), out_dir=tmp_path, restart=True, progress=False)  # explicit start over
    assert all(torch.equal(a, b) for a, b in zip(ref.model.state_dict().values(), res.model.state_dict().values()))
    (previous,) = tmp_path.glob("previous-*")
    assert (previous / "checkpoints" / newest.name).read_bytes() == damaged
    assert sorted(p.name for p in previous.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert [s for s, _ in CheckpointManager(tmp_path / "checkpoints").checkpoints()] == [2, 4, 6]


def _toy_trainer(cfg, **kw):
    """A Trainer with a loss whose gradient is known in closed form: L = sum_p <p, w_p>, so dL/dp = w_p."""
    model = _model().eval().requires_grad_(False)  # frozen, like an EMA copy: the trainer must unfreeze it
    trainer = Trainer("ict", cfg, model, progress=False, **kw).start()
    torch.manual_seed(1)
    w = [torch.randn_like(p) for p in trainer.cm.parameters()]
    return trainer, w


def test_ema_and_grad_clip_closed_form():
    trainer, w = _toy_trainer(_cfg(total_steps=1, ema_beta=0.75, grad_clip=0.5, lr=1e-2))
    theta0 = [p.detach().clone() for p in trainer.cm.parameters()]

    def loss_fn(step):
        return sum((p * g).sum() for p, g in zip(trainer.cm.parameters(), w)), {"N": 1}

    res = trainer.run(loss_fn)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in w]))
    scale = min(1.0, 0.5 / (norm.item() + 1e-6))
    assert res.records[0]["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    for p0, p, e, g in zip(theta0, res.model.parameters(), res.ema.module.parameters(), w):
        # RAdam's first step is un-rectified SGD on the bias-corrected moment: theta1 = theta0 - lr * g_clipped
        torch.testing.assert_close(p.detach(), p0 - 1e-2 * scale * g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(e, 0.75 * p0 + 0.25 * p.detach(), rtol=1e-5, atol=1e-7)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    trainer, w = _toy_trainer(_cfg(total_steps=20, max_nonfinite=3, save_every=0, sample_every=0),
                              out_dir=tmp_path)
    snapshots = {}

    def loss_fn(step):
        snapshots[step] = [p.detach().clone() for p in trainer.cm.parameters()]
        loss = sum((p * g).sum() for p, g in zip(trainer.cm.parameters(), w))
        bad = {2: float("nan"), 4: float("inf"), 6: float("nan"), 7: float("nan"), 8: float("nan")}
        return (loss * bad[step] if step in bad else loss), {}

    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        trainer.run(loss_fn)
    assert trainer.guard.skipped == 5 and trainer.step == 8
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    recs = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[2]["loss"] is None and recs[3]["skipped"] == 1 and recs[4]["skipped"] == 2  # NaN -> null
    # a non-finite weight is never written to disk
    with torch.no_grad():
        next(trainer.cm.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="refusing to save"):
        trainer._save(trainer_logger_stub())
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def trainer_logger_stub():
    class _Log:
        callbacks = []

        def event(self, *a):
            pass
    return _Log()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_autocast_on_cuda(tmp_path, digits, precision):
    res = train_ict(_cfg(total_steps=3, precision=precision, sample_every=0), digits, _model(), out_dir=tmp_path,
                    device="cuda", progress=False)
    # fp16's GradScaler may overflow on its first steps (scale 2**16); those steps are skipped and counted
    assert res.skipped_steps <= (2 if precision == "fp16" else 0) and res.records[-1]["loss"] is not None
    assert next(res.model.parameters()).device.type == "cuda" and next(res.model.parameters()).dtype == torch.float32
    meta = load_model(res.checkpoint).state_dict()  # the fp32 master weights were saved
    assert all(torch.equal(meta[k], v.cpu()) for k, v in res.ema.state_dict().items())


def test_dataset_and_config_validation(digits):
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\) but the model expects \(3, 8, 8\)"):
        train_ict(_cfg(), digits, ConsistencyModel(build_unet("tiny", in_channels=3, impl="torch")), progress=False)
    unlabelled = ArrayDataset(digits.images[:64])
    with pytest.raises(ValueError, match="class-conditional .* no labels"):
        train_ict(_cfg(), unlabelled, _model(), progress=False)
    with pytest.raises(TypeError, match="ICTConfig"):
        train_ict({"total_steps": 3}, digits, _model())
    for bad, match in [(dict(lr=0.0), "lr"), (dict(s0=20, s1=8), "s0 must be <= s1"), (dict(precision="fp8"),
                       "precision"), (dict(betas=(0.9,)), "betas"), (dict(keep_last=0), "keep_last"),
                       (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ValueError, match=match):
            _cfg(**bad)
    cfg = _cfg(betas=[0.8, 0.9])
    assert ICTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown MethodConfig field"):
        ICTConfig.from_dict({"steps": 3})
    with pytest.raises(ValueError, match="precision='bf16' needs a CUDA device"):
        Trainer("ict", _cfg(precision="bf16"), _model(), progress=False)
