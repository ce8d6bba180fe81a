"""FID while training inside the loop: every method and the FD stage log fid_1step/fid_2step, keep
checkpoints/best.safetensors (atomic, never pruned, in config.json), leave the trajectory untouched, resume with
their schedule and best, refuse another evaluation on resume, and survive a failing evaluation."""
import json

import pytest
import torch
from torch import nn

from fastcm.cm import get_method
from fastcm.data import load_digits
from fastcm.fid import PixelFeatures, compute_stats
from fastcm.models import build_unet
from fastcm.train import (Callback, FDConfig, ICTConfig, finetune_fd, load_checkpoint, load_model,
                          read_checkpoint_meta, train_ict)
from fastcm.train.evaluate import FIDEvaluator


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory, digits):
    test = load_digits("test")
    path = tmp_path_factory.mktemp("stats") / "digits-test-pixels.npz"
    return str(compute_stats(test, PixelFeatures(), batch_size=500, name="pixels").save(path))


def _cfg(stats_file, **kw):
    base = dict(total_steps=6, batch_size=8, lr=2e-3, ema_beta=0.5, log_every=1, sample_every=0, num_samples=10,
                save_every=3, keep_last=1, seed=3, s0=2, s1=8, eval_every=2, eval_stats=stats_file, eval_samples=20,
                eval_batch_size=8)
    return ICTConfig(**{**base, **kw})


def _model(method="ict", seed=0):
    torch.manual_seed(seed)
    m = get_method(method, **({"total_steps": 6} if method == "ict" else {}))
    return m.make_model(build_unet("tiny", num_classes=10, impl="torch", **m.unet_overrides))


def _evals(records):
    return [r for r in records if "eval_seconds" in r]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", ["ict", "sct", "meanflow"])
def test_every_method_logs_fid_and_keeps_the_best(tmp_path, digits, stats_file, method):
    res = train_ict(_cfg(stats_file, method=method), digits, _model(method), out_dir=tmp_path, progress=False)
    evals = _evals(_jsonl(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in evals] == [0, 2, 4, 6]  # step 0 of a fresh run, every 2 steps, the last step
    assert all(r["fid_1step"] > 0 and r["fid_2step"] > 0 and r["eval_seconds"] > 0 and r["eval_samples"] == 20
               and r["stage"] == method for r in evals)
    best = min(evals, key=lambda r: r["fid_1step"])
    assert res.best == {"step": best["step"], "metric": "fid_1step", "value": best["fid_1step"]}
    path = tmp_path / "checkpoints" / "best.safetensors"
    assert res.best_checkpoint == path and read_checkpoint_meta(path)["step"] == best["step"]
    assert read_checkpoint_meta(path)["best"] == res.best
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["best"] == {**res.best, "path": "checkpoints/best.safetensors"}
    assert doc["evaluation"]["features"] == "pixels" and doc["evaluation"]["samples"] == 20
    # keep_last=1 pruned ckpt 3, never best; best holds the EMA weights that scored best (re-evaluated here)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.safetensors", "ckpt_00000006.safetensors"]
    again = FIDEvaluator(res_ref(stats_file), PixelFeatures(), get_method(method, **(
        {"total_steps": 1} if method == "ict" else {})), num_samples=20, seed=3, batch_size=8)
    assert again.evaluate(load_model(path), 0)["fid_1step"] == pytest.approx(best["fid_1step"], rel=1e-6)


def res_ref(stats_file):
    from fastcm.fid import FeatureStats

    return FeatureStats.load(stats_file)


def test_the_fd_stage_evaluates_too(tmp_path, digits, stats_file):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    ref = compute_stats(digits, net, batch_size=500)
    cfg = FDConfig(total_steps=2, batch_size=20, lr=1e-3, log_every=1, sample_every=0, save_every=0, fd_mode="batch",
                   eval_every=1, eval_stats=stats_file, eval_samples=20, eval_steps=(2, 1))
    res = finetune_fd(cfg, _model(), net, ref, out_dir=tmp_path, progress=False)
    evals = _evals(res.records)
    assert [r["step"] for r in evals] == [0, 1, 2] and all(r["stage"] == "fd" for r in evals)
    assert res.best["metric"] == "fid_2step"  # the first --eval-steps entry decides
    assert res.best["value"] == min(r["fid_2step"] for r in evals)


def test_evaluations_leave_the_trajectory_untouched(digits, stats_file):
    with_eval = train_ict(_cfg(stats_file, eval_every=1), digits, _model(), progress=False)
    without = train_ict(_cfg(stats_file, eval_every=0, eval_stats=None), digits, _model(), progress=False)
    for a, b in ((with_eval.model, without.model), (with_eval.ema.module, without.ema.module)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert len(_evals(with_eval.records)) == 7 and not _evals(without.records)
    assert with_eval.best is not None and with_eval.best_checkpoint is None  # no out_dir: nothing written


class _Crash(Callback):
    def __init__(self, at):
        self.at = at

    def on_log(self, record):
        if record["step"] == self.at and "eval_seconds" not in record:
            raise KeyboardInterrupt("simulated crash")


def test_resume_continues_the_schedule_and_keeps_the_best(tmp_path, digits, stats_file):
    whole = train_ict(_cfg(stats_file), digits, _model(), out_dir=tmp_path / "whole", progress=False)
    run = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):  # after the evaluation of step 4, before the checkpoint of step 6
        train_ict(_cfg(stats_file), digits, _model(), out_dir=run, progress=False, callbacks=[_Crash(5)])
    assert read_checkpoint_meta(run / "checkpoints" / "ckpt_00000003.safetensors")["step"] == 3
    res = train_ict(_cfg(stats_file), digits, _model(), out_dir=run, resume=True, progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "eval_seconds"} for r in _evals(rs)]  # noqa: E731
    assert strip(_jsonl(run / "metrics.jsonl")) == strip(_jsonl(tmp_path / "whole" / "metrics.jsonl"))
    assert res.best == whole.best
    a, _ = load_checkpoint(run / "checkpoints" / "best.safetensors")
    b, _ = load_checkpoint(tmp_path / "whole" / "checkpoints" / "best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b if k.startswith(("model/", "ema/")))
    with pytest.raises(ValueError, match=r"different evaluation \(samples: 20 -> 30\)"):
        train_ict(_cfg(stats_file, total_steps=6, eval_samples=30), digits, _model(), out_dir=run, resume=True,
                  progress=False)


def test_a_failing_evaluation_is_one_line_and_training_goes_on(tmp_path, digits, stats_file, monkeypatch, capsys):
    calls = []
    real = FIDEvaluator.local_stats

    def flaky(self, model, steps):
        calls.append(steps)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, model, steps)

    monkeypatch.setattr(FIDEvaluator, "local_stats", flaky)
    res = train_ict(_cfg(stats_file, total_steps=2), digits, _model(), out_dir=tmp_path, progress=False)
    assert res.step == 2
    evals = _evals(res.records)
    assert evals[0]["eval_error"].startswith("OutOfMemoryError: CUDA out of memory") and "fid_1step" not in evals[0]
    assert "fid_1step" in evals[1] and res.best["step"] == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "evaluation" in line]
    assert err == ["evaluation at step 0 failed, training goes on: OutOfMemoryError: CUDA out of memory. Tried to "
                   "allocate 20.00 GiB"]


def test_bad_eval_options_are_refused_before_anything_is_written(tmp_path, digits, stats_file):
    with pytest.raises(ValueError, match="eval_every=2 needs eval_stats"):
        ICTConfig(eval_every=2)
    with pytest.raises(ValueError, match="eval_samples"):
        ICTConfig(eval_samples=1)
    with pytest.raises(FileNotFoundError, match="fastcm stats"):
        train_ict(_cfg(str(tmp_path / "none.npz")), digits, _model(), out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert ICTConfig.from_dict(json.loads(json.dumps(_cfg(stats_file).to_dict()))) == _cfg(stats_file)
