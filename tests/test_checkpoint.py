"""Checkpoint files: safetensors + JSON round trip, atomic replacement, damage detection, keep-last-k, no pickle."""
import json
import os
import pathlib
import pickle

import pytest
import torch

from fastcm.train.checkpoint import optimizer_from_flat, optimizer_to_flat
from fastcm.train.checkpoint_file import (CheckpointError, CheckpointManager, load_checkpoint, read_checkpoint_meta,
                                          save_checkpoint)
from fastcm.train.guards import DivergenceError, NonFiniteError, NonFiniteGuard, grad_norm


def _tensors():
    return {"model/w": torch.randn(3, 4), "model/b": torch.randn(4).to(torch.bfloat16),
            "optim/0/step": torch.tensor(7.0), "rng/cpu": torch.get_rng_state(),
            "idx": torch.arange(5), "empty": torch.zeros(0, 3)}


def test_round_trip(tmp_path):
    t = _tensors()
    t["view"] = t["model/w"][:, 1]  # a non-contiguous view sharing storage: stored as its own copy
    meta = {"stage": "ict", "config": {"lr": 1e-4, "betas": [0.9, 0.999], "grad_clip": None}, "step": 5}
    p = save_checkpoint(tmp_path / "c.safetensors", t, meta)
    back, m = load_checkpoint(p)
    assert back.keys() == t.keys()
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k
    assert m["config"] == meta["config"] and m["step"] == 5 and m["format"] == "fastcm-checkpoint"
    assert read_checkpoint_meta(p)["stage"] == "ict"
    # the header is JSON any safetensors reader can inspect
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert json.loads(header["__metadata__"]["fastcm"])["config"]["betas"] == [0.9, 0.999]


def test_refuses_overwrite_nonfinite_and_non_json(tmp_path):
    p = save_checkpoint(tmp_path / "c.safetensors", _tensors(), {})
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(p, _tensors(), {})
    with pytest.raises(ValueError, match="non-finite values in 'model/w'"):
        save_checkpoint(p, {**_tensors(), "model/w": torch.tensor([1.0, float("inf")])}, {}, overwrite=True)
    with pytest.raises(ValueError, match="plain JSON"):
        save_checkpoint(p, _tensors(), {"loss": float("nan")}, overwrite=True)
    with pytest.raises(ValueError, match="plain JSON"):
        save_checkpoint(p, _tensors(), {"obj": object()}, overwrite=True)
    with pytest.raises(ValueError, match=".safetensors"):
        save_checkpoint(tmp_path / "c.pt", _tensors(), {})
    assert p.read_bytes() == before and sorted(x.name for x in tmp_path.iterdir()) == ["c.safetensors"]
    save_checkpoint(p, {"a": torch.ones(2)}, {"v": 2}, overwrite=True)
    assert load_checkpoint(p)[1]["v"] == 2


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    p = save_checkpoint(tmp_path / "c.safetensors", _tensors(), {"v": 1})
    before = p.read_bytes()

    def crash(tensors, filename, metadata=None):  # the disk fills up half-way through the write
        pathlib.Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(p, _tensors(), {"v": 2}, overwrite=True)
    assert p.read_bytes() == before and [x.name for x in tmp_path.iterdir()] == ["c.safetensors"]
    assert load_checkpoint(p)[1]["v"] == 1


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/fastcm_pwned_by_checkpoint",))


def test_damaged_and_foreign_files(tmp_path):
    import os
    from safetensors.torch import save_file

    good = save_checkpoint(tmp_path / "good.safetensors", _tensors(), {"v": 1})
    data = good.read_bytes()
    cases = {
        "missing": (None, "does not exist"),
        "truncated": (data[:-17], "truncated or a foreign file"),
        "header_cut": (data[:20], "truncated or a foreign file"),
        "pickle": (pickle.dumps({"model": _Evil()}), "truncated or a foreign file"),
        "bitflip": (data[:-30] + bytes([data[-30] ^ 1]) + data[-29:], "SHA-256"),
    }
    for name, (blob, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if blob is not None:
            path.write_bytes(blob)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path)
    assert not os.path.exists("/tmp/fastcm_pwned_by_checkpoint")
    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a fastcm checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "future.safetensors"),
              metadata={"fastcm": json.dumps({"format": "fastcm-checkpoint", "version": 99, "sha256": ""})})
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "future.safetensors")


def test_manager_keeps_last_k_and_never_touches_a_damaged_file(tmp_path):
    m = CheckpointManager(tmp_path / "ck", keep_last=2)
    assert m.latest() is None
    for step in (10, 20, 30):
        m.save(step, {"w": torch.full((2,), float(step))}, {"stage": "ict"})
    assert [s for s, _ in m.checkpoints()] == [20, 30]
    path, tensors, meta = m.load_latest()
    assert path.name == "ckpt_00000030.safetensors" and meta["step"] == 30 and tensors["w"][0] == 30
    torn = tmp_path / "ck" / "ckpt_00000030.safetensors"
    torn.write_bytes(b"\x00" * 10)  # torn newest file: evidence, neither skipped nor replaced
    (tmp_path / "ck" / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"ckpt_00000030.*left untouched.*previous one is ckpt_00000020.*"
                                              r"restart=True"):
        m.load_latest()
    with pytest.raises(FileExistsError):
        m.save(30, {"w": torch.ones(2)}, {})
    assert torn.read_bytes() == b"\x00" * 10
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_checkpoints_honour_the_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        p = save_checkpoint(tmp_path / "a.safetensors", _tensors(), {})
        q = CheckpointManager(tmp_path / "ck").save(1, _tensors(), {})
    finally:
        os.umask(old)
    assert oct(p.stat().st_mode & 0o777) == oct(0o640) and oct(q.stat().st_mode & 0o777) == oct(0o640)
    p2 = save_checkpoint(tmp_path / "b.safetensors", _tensors(), {})  # the usual 022: like every other file, 0644
    assert oct(p2.stat().st_mode & 0o777) == oct(0o666 & ~old)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    m = CheckpointManager(tmp_path)
    m.save(1, {"w": torch.ones(2)}, {})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ckpt_00000002.safetensors.tmp-{int(dead.stdout)}"
    live = tmp_path / f".ckpt_00000002.safetensors.tmp-{os.getppid()}"  # a running process may still write it
    for p in (stale, live):
        p.write_bytes(b"partial")
    assert m.remove_stale_temporaries() == [stale]
    assert not stale.exists() and live.exists() and m.path(1).exists()


def test_optimizer_state_round_trip_continues_identically():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    data = torch.randn(4, 6, 5)

    def run(w, opt, batches):
        for x in batches:
            opt.zero_grad()
            (x @ w).square().mean().backward()
            opt.step()

    wa = w0.clone().requires_grad_()
    opt_a = torch.optim.RAdam([wa], lr=1e-2, betas=(0.8, 0.99))
    run(wa, opt_a, data[:2])
    tensors, doc = optimizer_to_flat(opt_a.state_dict())
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from the file (no aliasing)
    doc = json.loads(json.dumps(doc))  # as stored in the checkpoint header
    assert set(tensors) == {"optim/0/step", "optim/0/exp_avg", "optim/0/exp_avg_sq"}
    wb = wa.detach().clone().requires_grad_()
    opt_b = torch.optim.RAdam([wb], lr=0.5)
    opt_b.load_state_dict(optimizer_from_flat(tensors, doc))
    assert opt_b.param_groups[0]["betas"] == (0.8, 0.99) and opt_b.param_groups[0]["lr"] == 1e-2
    run(wa, opt_a, data[2:])
    run(wb, opt_b, data[2:])
    assert torch.equal(wa, wb)


def test_guard_counts_and_stops():
    g = NonFiniteGuard(max_consecutive=3)
    assert g.update(True, 0) and not g.update(False, 1) and not g.update(False, 2)
    assert g.update(True, 3) and (g.skipped, g.consecutive) == (2, 0)
    g.update(False, 4)
    g.update(False, 5)
    with pytest.raises(NonFiniteError, match="3 consecutive steps .*step 6.*5 skipped"):
        g.update(False, 6)
    h = NonFiniteGuard(3)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert (h.skipped, h.consecutive) == (5, 3)
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(0)
    d = NonFiniteGuard(3, max_weight_rms=10.0)
    for rms in (5.0, 11.0, float("nan"), 9.0, 11.0, float("inf")):  # NaN counts as above; a step below resets
        d.check_weights(rms, 0)
    assert d.diverged == 2 and json.loads(json.dumps(d.state_dict()))["diverged"] == 2
    with pytest.raises(DivergenceError, match=r"max_weight_rms=10 for 3 steps in a row.*Lower the learning rate"):
        d.check_weights(1e30, 7)
    NonFiniteGuard(3).check_weights(1e30, 0)  # max_weight_rms=None: no bound


def test_grad_norm_matches_torch_clip():
    torch.manual_seed(0)
    ps = [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    for p, q in zip(ps, qs):
        p.grad = torch.randn_like(p) * 10
        q.grad = p.grad.clone()
    norm = grad_norm(ps, max_norm=1.0)
    ref = torch.nn.utils.clip_grad_norm_(qs, max_norm=1.0)
    torch.testing.assert_close(norm, ref)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad, q.grad)
    ps[0].grad[0] = float("nan")
    before = ps[1].grad.clone()
    assert not torch.isfinite(grad_norm(ps, max_norm=1.0)) and torch.equal(ps[1].grad, before)


def test_no_pickle_in_training_code():
    root = pathlib.Path(__file__).resolve().parents[1] / "fastcm"
    for sub in ("train", "data"):
        for f in (root / sub).glob("*.py"):
            src = f.read_text()
            assert "torch.load(" not in src and "torch.save(" not in src, f
            assert "pickle.load(" not in src and "pickle.loads(" not in src, f  # cifar.py uses a restricted Unpickler
