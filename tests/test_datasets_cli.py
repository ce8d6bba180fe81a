"""One dataset grammar for every command: each form (digits, digits:train, digits:test, cifar10:DIR,
cifar10:DIR:train, cifar10:DIR:test, folder:DIR, FILE.npz) through `train --data`, `stats`, `fid`, `cas --real` and
`edit --input`, each run as the real `fastcm` console script in a subprocess, on small data."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fastcm.data import FORMS, load_digits, parse_dataset

ROOT = Path(__file__).resolve().parents[1]


def _fastcm_command():
    """The installed console script (setup.py's entry point) when there is one, else `python -m fastcm.cli`; the
    checkout's package is imported either way (PYTHONPATH)."""
    script = shutil.which("fastcm", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "fastcm.cli"]


def _write_cifar(root: Path):
    """Fake CIFAR-10 python batches in the real format, 2 images of every class per batch."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(20)]
        data = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({b"labels": labels, b"data": data}, f, protocol=2)


def _write_folder(root: Path, x, y):
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(((img[0] + 1) * 127.5).round().astype(np.uint8), mode="L").save(root / str(label) / f"{i}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datasets_cli")
    _write_cifar(tmp / "cifar" / "cifar-10-batches-py")
    te = load_digits("test")
    x, y = te.images[:40].numpy(), te.labels[:40].numpy()
    _write_folder(tmp / "imgs", x, y)
    np.savez(tmp / "real.npz", x=x, y=y)
    np.savez(tmp / "syn8.npz", x=x[:20], y=y[:20])
    rng = np.random.default_rng(1)
    np.savez(tmp / "syn32.npz", x=rng.uniform(-1, 1, (20, 3, 32, 32)).astype(np.float32), y=np.arange(20) % 10)
    forms = {"digits": 8, "digits:train": 8, "digits:test": 8, f"cifar10:{tmp / 'cifar'}": 32,
             f"cifar10:{tmp / 'cifar'}:train": 32, f"cifar10:{tmp / 'cifar'}:test": 32,
             f"folder:{tmp / 'imgs'}": 8, str(tmp / "real.npz"): 8}
    return tmp, forms


def _run(args, tmp):
    env = dict(os.environ, PYTHONPATH=str(ROOT), FASTCM_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(_fastcm_command() + [str(a) for a in args], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _parallel(jobs, tmp):
    with ThreadPoolExecutor(max_workers=3) as pool:  # the subprocesses mostly wait on imports
        return list(pool.map(lambda a: _run(a, tmp), jobs))


@pytest.mark.slow  # about 2.5 CPU-minutes: 45 subprocesses, three of them a 3072-d eigh (CIFAR pixels)
def test_every_form_through_every_command(world):
    tmp, forms = world
    assert {parse_dataset(f).kind for f in forms} == {"digits", "cifar10", "folder", "npz"}
    jobs = {}
    for i, (form, side) in enumerate(forms.items()):
        preset = "tiny" if side == 8 else "cifar10-small"
        jobs[("train", form)] = ["train", "--data", form, "--preset", preset, "--steps", 1, "--batch-size", 4,
                                 "--out", tmp / f"train{i}", "--no-progress", "--device", "cpu"]
        jobs[("stats", form)] = ["stats", form, "--features", "pixels", "--out", tmp / f"stats{i}.npz"]
        jobs[("fid", form)] = ["fid", form, form, "--features", "pixels", "--json"]
        jobs[("cas", form)] = ["cas", "--synthetic", tmp / f"syn{side}.npz", "--real", form, "--judge", "logreg",
                               "--seeds", 0, 1]
    results = dict(zip(jobs, _parallel(list(jobs.values()), tmp)))
    for (command, form), (rc, out, err) in results.items():
        assert rc == 0, f"fastcm {command} {form}: {err[-2000:]}"
    for i, form in enumerate(forms):
        assert "statistics of" in results[("stats", form)][1]
        assert abs(json.loads(results[("fid", form)][1])["fd"]) < 1e-6  # a set against itself
        assert "real + synthetic beats real alone" in results[("cas", form)][1]
        assert next((tmp / f"train{i}" / "checkpoints").glob("*.safetensors"))
    # edit needs a checkpoint of each image shape: those of the digits and cifar10 training runs above
    ckpt = {side: next((tmp / f"train{list(forms).index(form)}" / "checkpoints").glob("*.safetensors"))
            for form, side in (("digits", 8), (f"cifar10:{tmp / 'cifar'}", 32))}
    edits = [["edit", "--checkpoint", ckpt[side], "--task", "denoise", "-n", 2, "--input", form, "--out",
              tmp / f"edit{i}", "--device", "cpu"] for i, (form, side) in enumerate(forms.items())]
    edits.append(["edit", "--checkpoint", ckpt[8], "--task", "denoise", "--input", "imgs", "--out", tmp / "e"])
    *done, (rc, _, err) = _parallel(edits, tmp)
    for form, (rc_form, out, err_form) in zip(forms, done):
        assert rc_form == 0 and "denoise: 2 images" in out, f"fastcm edit --input {form}: {err_form[-2000:]}"
    assert rc == 2 and FORMS in err and "write folder:imgs" in err, err


def test_one_error_message_lists_every_form(world):
    tmp, _ = world
    jobs = [["train", "--data", "imgs", "--out", tmp / "bad_train"], ["stats", "imgs", "--out", tmp / "bad.npz"],
            ["fid", "digits", "imgs", "--features", "pixels"],
            ["cas", "--synthetic", tmp / "syn8.npz", "--real", "digits:val"]]
    for args, (rc, _, err) in zip(jobs, _parallel(jobs, tmp)):
        assert rc == 2 and err.count("\n") == 1 and FORMS in err and "Traceback" not in err, (args, err)
        assert args[-1] == "digits:val" or "write folder:imgs" in err


def test_collapsed_sets_and_single_seed_cas_through_the_command(world):
    # As a user meets them: constant images (zero covariances) give the exact FD instead of a
    # LAPACK traceback, and `cas` with one seed makes no claim about real + synthetic.
    tmp, _ = world
    np.savez(tmp / "const_a.npz", x=np.full((10, 1, 4, 4), -0.5, np.float32))
    np.savez(tmp / "const_b.npz", x=np.full((12, 1, 4, 4), 0.25, np.float32))
    jobs = [["fid", tmp / "const_a.npz", tmp / "const_b.npz", "--features", "pixels", "--json"],
            ["cas", "--synthetic", tmp / "syn8.npz", "--real", "digits", "--judge", "logreg", "--seeds", 0]]
    (rc, out, err), (rc2, out2, err2) = _parallel(jobs, tmp)
    assert rc == 0 and "Traceback" not in err, err
    assert json.loads(out)["fd"] == pytest.approx(16 * 0.75 ** 2, rel=1e-14)
    assert rc2 == 0, err2
    assert "real + synthetic beats real alone: no claim can be made from one seed" in out2
    assert ": yes" not in out2 and ": no (" not in out2
