"""The `fastcm` command in a subprocess, as users run it: every fixable mistake ends in one line and exit status 2,
and a failed command leaves no partial output behind.

One driver process runs the real entry point (the ``fastcm.cli`` package's ``__main__``, as ``python -m fastcm.cli``
does) once per case, so the matrix costs one interpreter start-up; a read-only file system is simulated there by
making every write under one directory fail with EROFS, as a read-only mount does.
"""
import json
import os
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
from fastcm.train.checkpoint import CheckpointManager, _digest

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent('''
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
        sys.argv = ["fastcm", *argv]
        err = io.StringIO()
        stderr, sys.stderr = sys.stderr, err
        try:
            runpy.run_module("fastcm.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # a traceback: what the test must never see
            import traceback
            code, _ = 1, traceback.print_exc(file=err)
        finally:
            sys.stderr = stderr
        results.append({"argv": argv, "code": code, "err": err.getvalue()})
    print(json.dumps(results))
''')


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def fastcm(*argv, cwd=None, timeout=300):
    """``python -m fastcm.cli ARGV`` in a subprocess: (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "fastcm.cli", *map(str, argv)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


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
    return {"dir": d, "ckpt": res.checkpoint, "nan": d / "nan.safetensors"}


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


def test_every_subcommand_reports_unusable_outputs_and_devices_in_one_line(files):
    """Item 5: EROFS, an output path under a regular file, --device bogus, --device cuda on a CPU-only torch."""
    d = files["dir"]
    cases = [(c, a, "read-only") for c, a in _output_cases(files, d / "readonly")]
    cases += [(c, a, "not a directory") for c, a in _output_cases(files, d / "a_file")]
    cases += [(c, a, "not a device name") for c, a in _device_cases(files, "bogus")]
    if not torch.cuda.is_available():
        cases += [(c, a, "cpu-only build" if not torch.backends.cuda.is_built() else "no cuda device")
                  for c, a in _device_cases(files, "cuda")]
    argvs = [[str(x) for x in a] for _, a, _ in cases]
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(d / "readonly"), json.dumps(argvs)],
                          capture_output=True, text=True, env=_env(), cwd=d, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = [(r["argv"][0], r["code"], r["err"][-400:]) for (cmd, _, want), r in zip(cases, results)
           if r["code"] != 2 or not one_line_error(cmd, r["err"]) or want not in r["err"].lower()]
    assert not bad, bad
    assert not any((d / "readonly").iterdir()) and not (d / "dev-t").exists() and not (d / "dev-s").exists()


def test_sample_from_nan_weights_writes_nothing(files, tmp_path):
    """Item 7: non-finite EMA weights are refused before sampling; no samples.npz, no --out directory."""
    rc, _, err = fastcm("sample", "--checkpoint", files["nan"], "--per-class", 1, "--out", tmp_path / "s")
    assert rc == 2 and one_line_error("sample", err) and "nan" in err.lower(), err
    assert not (tmp_path / "s").exists()
    rc, _, err = fastcm("edit", "--checkpoint", files["nan"], "--task", "inpaint", "--out", tmp_path / "e")
    assert rc == 2 and one_line_error("edit", err) and not (tmp_path / "e").exists(), err


def test_failed_train_and_demo_leave_no_directory(tmp_path):
    """Item 7: a train that fails validation creates no --out; `demo --preset tiny` (unconditional) fails at once."""
    rc, _, err = fastcm("train", "--preset", "cifar10-small", "--steps", 1, "--out", tmp_path / "r")
    assert rc == 2 and one_line_error("train", err) and not (tmp_path / "r").exists(), err
    rc, _, err = fastcm("train", "--lr", "-1", "--steps", 1, "--out", tmp_path / "r")
    assert rc == 2 and one_line_error("train", err) and "lr" in err and not (tmp_path / "r").exists(), err
    rc, _, err = fastcm("demo", "--preset", "tiny", "--out", tmp_path / "d", timeout=60)
    assert rc == 2 and one_line_error("demo", err) and "unconditional" in err and "10-class" in err, err
    assert not (tmp_path / "d").exists()


def test_train_stops_a_diverging_run_in_one_line(tmp_path):
    """Item 8: --lr 1e30 drives the weights past max_weight_rms; training stops, nothing is saved. (With the digits
    preset the loss stays finite: the NaN guard alone let this run finish and save weights of 1e30.)"""
    rc, out, err = fastcm("train", "--lr", "1e30", "--steps", 40, "--batch-size", 2, "--save-every", 1,
                          "--out", tmp_path / "r", "--no-progress")
    assert rc == 2 and one_line_error("train", err) and "diverged" in err and "learning rate" in err, (out, err)
    assert CheckpointManager(tmp_path / "r" / "checkpoints").checkpoints() == []
    rc, out, err = fastcm("train", "--preset", "tiny", "--lr", "1e-3", "--steps", 2, "--batch-size", 4,
                          "--out", tmp_path / "ok", "--no-progress")
    assert rc == 0, err  # the bound leaves ordinary training alone


def test_edit_needs_labels_for_a_class_conditional_model(files, tmp_path):
    """Item 8: unlabelled input to a class-conditional model is refused (no random labels); --labels fixes it."""
    unlabelled = files["dir"] / "unlabelled.npz"
    rc, _, err = fastcm("edit", "--checkpoint", files["ckpt"], "--task", "inpaint", "--input", unlabelled,
                        "--out", tmp_path / "e")
    assert rc == 2 and one_line_error("edit", err) and "--labels" in err and not (tmp_path / "e").exists(), err
    rc, _, err = fastcm("edit", "--checkpoint", files["ckpt"], "--task", "inpaint", "--input", unlabelled,
                        "--labels", 3, "--out", tmp_path / "e")
    assert rc == 0, err
    with np.load(tmp_path / "e" / "edited.npz") as f:
        assert f["y"].tolist() == [3] * 6
    rc, _, err = fastcm("edit", "--checkpoint", files["ckpt"], "--task", "inpaint", "--input", unlabelled,
                        "--labels", 1, 2, "--out", tmp_path / "e2")
    assert rc == 2 and "1 label (for all) or 6" in err and not (tmp_path / "e2").exists(), err
    # a failure after the --out directory was made (here the task itself) removes it again while it is empty
    rc, _, err = fastcm("edit", "--checkpoint", files["ckpt"], "--task", "colorize", "--out", tmp_path / "e3")
    assert rc == 2 and "3-channel" in err and not (tmp_path / "e3").exists(), err
