"""Interrupted training loses nothing: signals sent to real training processes (`fastcm train` in a subprocess, and
the FD stage in this process), time-based checkpoints, and metrics.jsonl continued across a resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastcm.cm import ConsistencyModel
from fastcm.data import ArrayDataset
from fastcm.models import build_unet
from fastcm.train import (CheckpointManager, FDConfig, ICTConfig, TrainingInterrupted, finetune_fd, load_checkpoint,
                          reference_stats, train_ict)

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^fastcm train: interrupted by (SIG\w+) at step (\d+); checkpoint saved to (\S+); continue with "
                  r"--resume")


def _start(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "fastcm.cli", "train", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("training did not get going in time")
        time.sleep(0.05)


def _records(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_sigint_and_sigterm_save_the_step_and_resume_continues_the_log(tmp_path):
    run = tmp_path / "run"
    # time-based checkpoints every 0.06 s show the loop is running; keep_last 3 (the default) prunes them
    argv = ["--preset", "tiny", "--steps", 100_000, "--batch-size", 4, "--save-every", 0, "--save-minutes", 0.001,
            "--out", run, "--no-progress"]
    ckpts, metrics = CheckpointManager(run / "checkpoints"), run / "metrics.jsonl"
    proc = _start(*argv, cwd=tmp_path)
    _wait_for(lambda: len(ckpts.checkpoints()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and (m := LINE.match(lines[0])), err
    name, step, path = m.group(1), int(m.group(2)), Path(m.group(3))
    assert name == "SIGINT" and path == ckpts.path(step) and ckpts.checkpoints()[-1][0] == step
    assert load_checkpoint(path)[1]["step"] == step and _records(metrics)[-1] == step  # the partial interval too
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["save_every"] == 0 and config["save_minutes"] == 0.001  # the CLI options reach the config
    # a killed writer's temporary file is removed by the next start; the log is appended to, never rewritten
    stale = run / "checkpoints" / ".ckpt_00000099.safetensors.tmp-999999999"
    stale.write_bytes(b"partial")
    before, inode = metrics.read_bytes(), metrics.stat().st_ino
    proc = _start(*argv, "--resume", cwd=tmp_path)
    _wait_for(lambda: ckpts.checkpoints()[-1][0] > step + 1, proc)
    assert not stale.exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    m = LINE.match(err.strip())
    assert m and m.group(1) == "SIGTERM" and int(m.group(2)) > step + 1, err
    assert ckpts.checkpoints()[-1][0] == int(m.group(2)) and load_checkpoint(Path(m.group(3)))[1]["step"] > step
    after = metrics.read_bytes()
    assert after.startswith(before) and metrics.stat().st_ino == inode
    steps = _records(metrics)
    assert steps == sorted(set(steps)) and step in steps and steps[-1] == int(m.group(2))


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler installed for signum (Linux: the SigCgt mask of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal dispositions from /proc (Linux)")
def test_a_second_sigint_exits_at_once(tmp_path):
    g = np.random.default_rng(0)  # slow steps (a CIFAR-sized net), so the second signal lands inside one
    np.savez(tmp_path / "x.npz", x=g.uniform(-1, 1, (32, 3, 32, 32)).astype(np.float32), y=np.arange(32) % 10)
    proc = _start("--data", tmp_path / "x.npz", "--preset", "cifar10-small", "--steps", 1000, "--batch-size", 16,
                  "--save-every", 0, "--out", tmp_path / "run", "--no-progress", cwd=tmp_path)
    # No sleeps to guess with. Python catches SIGINT from its start, SIGTERM only once training's StopSignals is
    # installed: the first signal goes then; the second once that handler has run and put back the default action
    # for both (the step in flight, seconds long, is still going).
    _wait_for(lambda: _catches(proc.pid, signal.SIGTERM), proc)
    proc.send_signal(signal.SIGINT)
    _wait_for(lambda: not _catches(proc.pid, signal.SIGTERM), proc, timeout=30)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGINT and time.monotonic() - t0 < 5.0, proc.stderr.read()
    run = tmp_path / "run"
    json.loads((run / "config.json").read_text())  # nothing half-written
    assert not list(run.rglob(".*tmp*")) and CheckpointManager(run / "checkpoints").checkpoints() == []


def _feature_net():
    torch.manual_seed(11)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 6))


def _model(seed=0):
    torch.manual_seed(seed)
    return ConsistencyModel(build_unet("tiny", num_classes=10, impl="torch"))


class _Signal:
    """Sends ``signum`` to this process at the record of step ``at`` (the loop is inside a training step's
    aftermath; it stops after the next step)."""

    def __init__(self, at, signum):
        self.at, self.signum = at, signum

    def on_log(self, record):
        if record["step"] == self.at:
            os.kill(os.getpid(), self.signum)


def test_fd_stage_saves_on_sigterm_and_resumes_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(60, 1, 8, 8, generator=g) * 2 - 1, torch.arange(60) % 10)
    net = _feature_net()
    ref = reference_stats(net, data)
    cfg = FDConfig(total_steps=5, batch_size=20, lr=1e-3, ema_beta=0.5, log_every=1, sample_every=0, save_every=0,
                   save_minutes=0, fd_mode="batch", fd_normalize=True, fd_dropout=True)
    whole = finetune_fd(cfg, _model(), net, ref, progress=False)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        finetune_fd(cfg, _model(), net, ref, out_dir=tmp_path, progress=False,
                    callbacks=[_Signal(2, signal.SIGTERM)])
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers are given back
    assert stop.value.exit_code == 143 and stop.value.step == 3 and stop.value.checkpoint.is_file()
    assert "SIGTERM at step 3" in str(stop.value)
    res = finetune_fd(cfg, _model(seed=5), net, ref, out_dir=tmp_path, resume=True, progress=False)
    assert [r["step"] for r in res.records] == [4, 5]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(res.model.state_dict()[k], v), k
    # the progress bar and the log carry the FD itself, not the normalised loss (~1 by construction)
    from fastcm.train.progress import bar_postfix

    raw = finetune_fd(cfg.replace(total_steps=1, fd_normalize=False), _model(), net, ref, progress=False)
    first = whole.records[0]
    assert first["fd"] == pytest.approx(raw.records[0]["fd"], rel=1e-12)  # the same samples' FD, unnormalised
    assert first["loss"] == pytest.approx(first["fd"] / (first["fd"] + 0.01), rel=1e-9) != first["fd"]
    assert bar_postfix(first) == {"fd": f"{first['fd']:.4g}", "img/s": f"{first['img_per_s']:.1f}"}


def test_time_based_checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.arange(40) % 10)
    base = dict(total_steps=4, batch_size=4, s0=2, s1=4, sample_every=0, log_every=2, save_every=0, keep_last=None)
    assert ICTConfig().save_minutes == 10.0 and FDConfig().save_minutes == 10.0  # the default: every 10 minutes
    train_ict(ICTConfig(**base, save_minutes=1e-9), data, _model(), out_dir=tmp_path / "a", progress=False)
    train_ict(ICTConfig(**base, save_minutes=0), data, _model(), out_dir=tmp_path / "b", progress=False)
    assert [s for s, _ in CheckpointManager(tmp_path / "a" / "checkpoints").checkpoints()] == [1, 2, 3, 4]
    assert [s for s, _ in CheckpointManager(tmp_path / "b" / "checkpoints").checkpoints()] == [4]
    with pytest.raises(ValueError, match="save_minutes"):
        ICTConfig(save_minutes=-1)
