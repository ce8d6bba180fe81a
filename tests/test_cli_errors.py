"""The `fastcm` command in a subprocess, as users run it: every fixable mistake ends in one line and exit status 2,
and a failed command leaves no partial output behind.

One driver process runs the real entry point (the ``fastcm.cli`` package's ``__main__``, as ``python -m fastcm.cli``
does) once per case, so the matrix costs one interpreter start-up; a read-only file system is simulated there by
making every write under one directory fail with EROFS, as a read-only mount does.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcm.cm import ConsistencyModel
from fastcm.data import ArrayDataset, load_digits
from fastcm.models import build_unet
from fastcm.train import ICTConfig, load_checkpoint, train_ict
from fastcm.train.checkpoint_file import CheckpointManager, _digest
from helpers import CLI_IN_PROCESS

ROOT = Path(__file__).resolve().parents[1]

DRIVER = CLI_IN_PROCESS + textwrap.dedent('''
    import builtins, errno, io, json, os, runpy, sys
    readonly = os.path.realpath(sys.argv[1])

    def refuse(path):
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(readonly):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_mkdir, real_open, real_os_open = os.mkdir, builtins.open, os.open

    def mkdir(path, *a, **k):
        refuse(path)
        return real_mkdir(path, *a, **k)

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    os.mkdir, builtins.open, io.open, os.open = mkdir, open_, open_, os_open
    results = []
    for argv in json.loads(sys.argv[2]):
        code, err = run_cli(argv)
        results.append({"argv": argv, "code": code, "err": err})
    print(json.dumps(results))
''')


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def one_line_error(command, err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith(f"fastcm {command}: error: ") and "Traceback" not in err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A class-conditional checkpoint, the same with NaN EMA weights, unlabelled images and synthetic samples."""
    d = tmp_path_factory.mktemp("cli-errors")
    torch.manual_seed(0)
    model = ConsistencyModel(build_unet("tiny", num_classes=10, impl="torch"))
    digits = load_digits("train")
    cfg = ICTConfig(total_steps=1, batch_size=4, s0=2, s1=4, sample_every=0, log_every=1)
    res = train_ict(cfg, ArrayDataset(digits.images[:32], digits.labels[:32]), model, out_dir=d / "run",
                    progress=False)
    tensors, meta = load_checkpoint(res.checkpoint)
    tensors = {k: v.clone() for k, v in tensors.items()}
    next(v for k, v in tensors.items() if k.startswith("ema/") and v.is_floating_point()).fill_(float("nan"))
    from safetensors.torch import save_file  # save_checkpoint refuses NaN: written the way another tool might

    meta["sha256"] = _digest(tensors)
    save_file(tensors, str(d / "nan.safetensors"), metadata={"fastcm": json.dumps(meta)})
    te = load_digits("test")
    np.savez(d / "unlabelled.npz", x=te.images[:6].numpy())
    np.savez(d / "syn.npz", x=te.images[:200].numpy(), y=te.labels[:200].numpy())
    (d / "bench").mkdir()
    (d / "bench" / "bench_x.py").write_text("def test_x(benchmark):\n    benchmark(sum, [1])\n")
    (d / "a_file").write_text("not a directory")
    (d / "readonly").mkdir()
    shutil.copytree(d / "run", d / "damaged")
    torn = d / "damaged" / "checkpoints" / res.checkpoint.name
    torn.write_bytes(torn.read_bytes()[:500])  # the disk filled up while it was written
    return {"dir": d, "ckpt": res.checkpoint, "nan": d / "nan.safetensors", "damaged": d / "damaged",
            "torn": torn.read_bytes()}


def _output_cases(f, base):
    """(command, argv) writing under ``base``, for every subcommand that writes a file or a directory."""
    ck, d = f["ckpt"], f["dir"]
    return [
        ("demo", ["demo", "--out", f"{base}/demo", "--steps", "1", "--no-progress"]),
        ("train", ["train", "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--out", f"{base}/t",
                   "--no-progress"]),
        ("sample", ["sample", "--checkpoint", ck, "--per-class", "1", "--out", f"{base}/s"]),
        ("edit", ["edit", "--checkpoint", ck, "--task", "inpaint", "-n", "2", "--out", f"{base}/e"]),
        ("stats", ["stats", "digits:test", "--features", "pixels", "--out", f"{base}/s.npz"]),
        ("cas", ["cas", "--synthetic", d / "syn.npz", "--judge", "logreg", "--seeds", "0", "--json",
                 f"{base}/c.json"]),
        ("bench", ["bench", "--benchmarks", d / "bench", "--json", f"{base}/b/run.json"]),
    ]


def _device_cases(f, device):
    ck = f["ckpt"]
    return [
        ("train", ["train", "--preset", "tiny", "--steps", "1", "--device", device, "--out", f["dir"] / "dev-t"]),
        ("sample", ["sample", "--checkpoint", ck, "--device", device, "--out", f["dir"] / "dev-s"]),
        ("edit", ["edit", "--checkpoint", ck, "--task", "inpaint", "--device", device, "--out", f["dir"] / "dev-e"]),
        ("stats", ["stats", "digits:test", "--features", "pixels", "--device", device, "--out",
                   f["dir"] / "dev.npz"]),
        ("fid", ["fid", "digits:test", "digits:test", "--features", "pixels", "--device", device]),
    ]


def _refusal_cases(f):
    """(name, argv, expected text, a path that must not exist afterwards) of items 7 and 8."""
    d, ck, unlabelled = f["dir"], f["ckpt"], f["dir"] / "unlabelled.npz"
    return [
        ("nan-sample", ["sample", "--checkpoint", f["nan"], "--per-class", 1, "--out", d / "nan-s"], "nan",
         d / "nan-s"),
        ("nan-edit", ["edit", "--checkpoint", f["nan"], "--task", "inpaint", "--out", d / "nan-e"], "nan",
         d / "nan-e"),
        ("train-shape", ["train", "--preset", "cifar10-small", "--steps", 1, "--out", d / "r1"], "preset", d / "r1"),
        ("train-lr", ["train", "--lr", "-1", "--steps", 1, "--out", d / "r2"], "lr", d / "r2"),
        ("demo-tiny", ["demo", "--preset", "tiny", "--out", d / "demo"], "unconditional", d / "demo"),
        ("edit-unlabelled", ["edit", "--checkpoint", ck, "--task", "inpaint", "--input", unlabelled, "--out",
                             d / "e1"], "--labels", d / "e1"),
        ("edit-colorize", ["edit", "--checkpoint", ck, "--task", "colorize", "--out", d / "e2"], "3-channel",
         d / "e2"),  # fails after --out was made: removed again while empty
        # --lr 1e30: with the digits preset the loss stays finite, so the NaN guard alone let such runs finish and
        # save weights of 1e30; the weight-RMS bound stops it (a non-empty run directory, but no checkpoint)
        ("diverge", ["train", "--lr", "1e30", "--steps", 40, "--batch-size", 2, "--save-every", 1, "--out",
                     d / "r3", "--no-progress"], "diverged", d / "r3" / "checkpoints"),
    ]


def _drive(cases, readonly, cwd):
    argvs = [[str(x) for x in a] for a in cases]
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(readonly), json.dumps(argvs)], capture_output=True,
                          text=True, env=_env(), cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(files):
    """Every case below through the real entry point, in one driver process: {name: (exit code, stderr)}."""
    d = files["dir"]
    cases = {f"rofs-{c}": (c, a, "read-only") for c, a in _output_cases(files, d / "readonly")}
    cases.update({f"notdir-{c}": (c, a, "not a directory") for c, a in _output_cases(files, d / "a_file")})
    cases.update({f"bogus-{c}": (c, a, "not a device name") for c, a in _device_cases(files, "bogus")})
    if not torch.cuda.is_available():
        want = "cpu-only build" if not torch.backends.cuda.is_built() else "no cuda device"
        cases.update({f"cuda-{c}": (c, a, want) for c, a in _device_cases(files, "cuda")})
    for name, argv, want, _ in _refusal_cases(files):
        cases[name] = (argv[0], argv, want)
    cases["damaged-resume"] = ("train", ["train", "--preset", "tiny", "--steps", 1, "--batch-size", 4, "--resume",
                                         "--out", files["damaged"], "--no-progress"], "--restart")
    cases["damaged-restart"] = ("train", ["train", "--preset", "tiny", "--steps", 1, "--batch-size", 4,
                                          "--restart", "--out", files["damaged"], "--no-progress"], "")
    cases["edit-labels"] = ("edit", ["edit", "--checkpoint", files["ckpt"], "--task", "inpaint", "--input",
                                     d / "unlabelled.npz", "--labels", 3, "--out", d / "e3"], "")
    results = _drive([a for _, a, _ in cases.values()], d / "readonly", d)
    return {name: (cmd, want, r["code"], r["err"]) for (name, (cmd, _, want)), r in zip(cases.items(), results)}


def _failures(runs, prefixes):
    return [(name, code, err[-400:]) for name, (cmd, want, code, err) in runs.items() if name.startswith(prefixes)
            and (code != 2 or not one_line_error(cmd, err) or want not in err.lower())]


def test_every_subcommand_reports_unusable_outputs_and_devices_in_one_line(runs, files):
    """Item 5: EROFS, an output path under a regular file, --device bogus, --device cuda on a CPU-only torch."""
    assert not _failures(runs, ("rofs-", "notdir-", "bogus-", "cuda-"))
    d = files["dir"]
    assert not any((d / "readonly").iterdir()) and not (d / "dev-t").exists() and not (d / "dev-s").exists()


def test_failed_commands_leave_no_partial_output(runs, files):
    """Item 7: NaN EMA weights are refused before sampling (no samples.npz, no --out); a train that fails
    validation creates no --out; `demo --preset tiny` (unconditional) fails before training."""
    assert not _failures(runs, ("nan-", "train-", "demo-", "edit-colorize"))
    assert "10-class" in runs["demo-tiny"][3]
    for name, _, _, gone in _refusal_cases(files):
        assert not gone.exists(), name


def test_train_stops_a_diverging_run_in_one_line(runs):
    """Item 8: --lr 1e30 drives the weights past max_weight_rms; training stops in one line, nothing is saved."""
    assert not _failures(runs, ("diverge",))
    assert "learning rate" in runs["diverge"][3]


def test_edit_needs_labels_for_a_class_conditional_model(runs, files):
    """Item 8: unlabelled input to a class-conditional model is refused (no random labels); --labels fixes it."""
    assert not _failures(runs, ("edit-unlabelled",))
    assert runs["edit-labels"][2] == 0, runs["edit-labels"]
    with np.load(files["dir"] / "e3" / "edited.npz") as f:
        assert f["y"].tolist() == [3] * 6


def test_a_damaged_checkpoint_is_refused_and_never_overwritten(runs, files):
    """Item 2: --resume stops at a damaged newest checkpoint with one line naming it and --restart; --restart moves
    the whole run aside (the damaged file with it, byte for byte) and starts over."""
    assert not _failures(runs, ("damaged-resume",))
    assert "ckpt_00000001.safetensors" in runs["damaged-resume"][3]
    assert runs["damaged-restart"][2] == 0, runs["damaged-restart"]
    (previous,) = files["damaged"].glob("previous-*")
    assert (previous / "checkpoints" / "ckpt_00000001.safetensors").read_bytes() == files["torn"]
    assert load_checkpoint(files["damaged"] / "checkpoints" / "ckpt_00000001.safetensors")[1]["step"] == 1


def test_the_console_entry_point_itself(tmp_path):
    """The same one-line contract from `python -m fastcm.cli` (no driver)."""
    proc = subprocess.run([sys.executable, "-m", "fastcm.cli", "fid", "digits:test", "digits:test", "--device",
                           "bogus"], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and one_line_error("fid", proc.stderr), proc.stderr
