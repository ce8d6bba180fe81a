"""Failure handling through the real `fastcm` entry point, as users run it (crafted checkpoints, full disks,
bad arguments, interrupted runs): one driver process runs every case in order
(``python -m fastcm.cli`` by runpy, so the matrix costs one interpreter start-up), with a few Python steps between
them that craft files. Under ``unshare -m`` (a private mount namespace, gone with the process) the driver mounts a
real 2 MB tmpfs for the full-disk cases; where that is not allowed they are skipped with the reason.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import CLI_IN_PROCESS

ROOT = Path(__file__).resolve().parents[1]

DRIVER = CLI_IN_PROCESS + textwrap.dedent('''
    import io, json, os, runpy, signal, subprocess, sys, threading, time
    results = {}

    def interrupt_when(path):  # SIGINT to this process once the training loop has logged (its handler is on)
        def watch():
            while not (os.path.exists(path) and os.path.getsize(path)):
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=watch, daemon=True).start()

    def rival_when(config, src, dst):  # a second trainer of the run: writes dst once this one has (re)started
        before = os.stat(config).st_mtime_ns
        def watch():
            while os.stat(config).st_mtime_ns == before:
                time.sleep(0.005)
            tmp = dst + ".rival"
            with open(src, "rb") as f, open(tmp, "wb") as g:
                g.write(f.read())
            os.replace(tmp, dst)
        threading.Thread(target=watch, daemon=True).start()

    for name, kind, arg in json.loads(sys.argv[1]):
        if kind == "py":
            try:
                exec(arg)
                results[name] = {"code": 0, "err": ""}
            except Exception as e:
                results[name] = {"code": -1, "err": f"{type(e).__name__}: {e}"}
            continue
        if results.get("tmpfs", {}).get("code", 0) and name.startswith("disk-"):
            continue  # no tmpfs here
        code, err = run_cli(arg)
        results[name] = {"code": code, "err": err}
    print(json.dumps(results))
''')

TRAIN = ["train", "--preset", "tiny", "--batch-size", 4, "--no-progress"]


def _craft(src, dst, edit: str) -> str:
    """A driver step: ``dst`` = the checkpoint ``src`` with ``edit`` applied to its header ``m`` (and a valid
    checksum: a crafted file, not a damaged one)."""
    return (f"from fastcm.train import load_checkpoint, save_checkpoint\n"
            f"t, m = load_checkpoint({str(src)!r})\n{edit}\n"
            f"save_checkpoint({str(dst)!r}, t, m, overwrite=True)")


def _stats_files(d: Path) -> str:
    """A driver step writing pixel statistics a.npz, the same as .safetensors with one exponent bit of mu flipped,
    statistics of |mu| = 1e200 (their FD overflows float64) and digits-space statistics dig.npz."""
    return textwrap.dedent(f'''
        import struct, torch
        from fastcm.fid import FeatureStats
        g = torch.Generator().manual_seed(0)
        a = FeatureStats.from_features(torch.randn(40, 6, generator=g, dtype=torch.float64), name="pixels")
        a.save({str(d / "a.npz")!r})
        blob = bytearray(open(a.save({str(d / "a.safetensors")!r}), "rb").read())
        i = blob.find(struct.pack("<d", a.mu[2].item()))
        blob[i + 7] ^= 1 << 6
        open({str(d / "flip.safetensors")!r}, "wb").write(bytes(blob))
        FeatureStats.from_moments(torch.full((6,), 1e200, dtype=torch.float64), torch.eye(6, dtype=torch.float64),
                                  n=10, features="pixels").save({str(d / "huge.npz")!r})
        FeatureStats.from_features(torch.randn(40, 6, generator=g, dtype=torch.float64), name="digits").save(
            {str(d / "dig.npz")!r})
    ''')


def _cases(d: Path):
    run, ck = d / "run", d / "run" / "checkpoints" / "ckpt_00000002.safetensors"
    forged, res = d / "forged", d / "res" / "checkpoints" / "ckpt_00000002.safetensors"
    disk, locked = d / "disk", d / "locked" / "checkpoints"
    header = (rb"\"step\": 2,", rb"\"step\": 9,")
    return [
        ("train", "cli", [*TRAIN, "--steps", 2, "--save-every", 1, "--out", run]),
        # item 6 and every count option
        ("sample-n0", "cli", ["sample", "--checkpoint", run, "-n", 0, "--out", d / "s0"]),
        ("sample-per-class", "cli", ["sample", "--checkpoint", run, "--per-class", -1, "--out", d / "s1"]),
        ("train-seed", "cli", [*TRAIN, "--seed", -1, "--steps", 1, "--out", d / "s2"]),
        # item 4
        ("other-data", "cli", [*TRAIN, "--data", "digits:test", "--steps", 2, "--save-every", 1, "--resume",
                               "--out", run]),
        ("copy", "py", f"import shutil; shutil.copytree({str(run)!r}, {str(d / 'res')!r})"),
        ("allowed", "cli", [*TRAIN, "--data", "digits:test", "--steps", 2, "--save-every", 1, "--resume",
                            "--allow-data-change", "--out", run]),
        # item 2: an edited header (same length) is refused like damaged tensors
        ("forge", "py", f"import os; os.mkdir({str(forged)!r}); b = open({str(ck)!r}, 'rb').read(); "
                        f"assert b.count({header[0]!r}) == 1; "
                        f"open({str(forged / 'ck.safetensors')!r}, 'wb').write(b.replace(*{header!r}))"),
        ("forged", "cli", ["sample", "--checkpoint", forged / "ck.safetensors", "--out", d / "s3"]),
        # item 11: crafted headers (valid checksums) for sample and train --resume
        ("craft1", "py", _craft(ck, d / "c1.safetensors", "m['model'] = [1, 2]")),
        ("crafted-model", "cli", ["sample", "--checkpoint", d / "c1.safetensors", "--out", d / "s4"]),
        ("craft2", "py", _craft(ck, d / "c2.safetensors", "m['model']['unet_config']['model_channels'] = 2 ** 20")),
        ("crafted-channels", "cli", ["sample", "--checkpoint", d / "c2.safetensors", "--out", d / "s5"]),
        ("craft3", "py", _craft(res, res, "del m['guard']")),
        ("crafted-guard", "cli", [*TRAIN, "--steps", 2, "--save-every", 1, "--resume", "--out", d / "res"]),
        ("craft4", "py", _craft(res, res, "m['guard'] = {'skipped': 0, 'consecutive': 0}; m['step'] = 10 ** 30")),
        ("crafted-step", "cli", [*TRAIN, "--steps", 2, "--save-every", 1, "--resume", "--out", d / "res"]),
        # item 12: a directory or a FIFO given as the checkpoint
        ("fifo", "py", f"import os; os.mkfifo({str(d / 'pipe.safetensors')!r})"),
        ("ck-fifo", "cli", ["sample", "--checkpoint", d / "pipe.safetensors", "--out", d / "s6"]),
        # item 3: a flipped bit in a .safetensors statistics file, and statistics whose FD overflows (was "FD: inf",
        # exit 0); item 7 through the command: pixel statistics against digits ones
        ("stats", "py", _stats_files(d)),
        ("fid-flipped", "cli", ["fid", d / "flip.safetensors", d / "a.npz", "--features", "pixels"]),
        ("fid-inf", "cli", ["fid", d / "a.npz", d / "huge.npz", "--features", "pixels"]),
        ("fid-spaces", "cli", ["fid", d / "a.npz", d / "dig.npz"]),
        # item 12: --weights that are no weight file ("IndexError: list index out of range" before), a directory
        ("weights-passwd", "cli", ["fid", "digits:test", "digits:test", "--features", "inception", "--weights",
                                   "/etc/passwd"]),
        ("weights-dir", "cli", ["fid", "digits:test", "digits:test", "--features", "inception", "--weights", d]),
        ("other-pth", "py", f"import torch; torch.save({{'fc.weight': torch.zeros(3)}}, {str(d / 'other.pth')!r})"),
        ("weights-other", "cli", ["fid", "digits:test", "digits:test", "--features", "inception", "--weights",
                                  d / "other.pth"]),
        ("ck-dir", "py", f"os.mkdir({str(d / 'empty.safetensors')!r})"),
        ("ck-directory", "cli", ["sample", "--checkpoint", d / "empty.safetensors", "--out", d / "s7"]),
        # item 5: images beside class folders (the root images were dropped) through `fastcm stats`
        ("mixed", "py", f"from PIL import Image; import numpy as np; os.makedirs({str(d / 'mixed' / 'a')!r})\n"
                        f"for i in range(5): Image.fromarray(np.zeros((8, 8), np.uint8)).save("
                        f"{str(d / 'mixed')!r} + f'/{{i}}.png')\n"
                        f"Image.fromarray(np.zeros((8, 8), np.uint8)).save({str(d / 'mixed' / 'a' / '1.png')!r})"),
        ("stats-mixed", "cli", ["stats", f"folder:{d / 'mixed'}", "--features", "pixels", "--out", d / "m.npz"]),
        # item 10: an unwritable checkpoints/ (chattr +i, refused even to root) on resume: one line, the previous
        # checkpoint intact
        ("train4", "cli", [*TRAIN, "--steps", 4, "--save-every", 2, "--out", d / "locked"]),
        ("lock", "py", f"os.remove({str(locked / 'ckpt_00000004.safetensors')!r})\n"
                       f"p = subprocess.run(['chattr', '+i', {str(locked)!r}], capture_output=True, text=True)\n"
                       "assert p.returncode == 0, p.stderr.strip()"),
        ("locked-resume", "cli", [*TRAIN, "--steps", 4, "--save-every", 2, "--resume", "--out", d / "locked"]),
        ("unlock", "py", f"subprocess.run(['chattr', '-i', {str(locked)!r}], check=True)"),
        ("locked-left", "py", f"from fastcm.train import load_checkpoint\n"
                              f"assert sorted(os.listdir({str(locked)!r})) == ['ckpt_00000002.safetensors']\n"
                              f"assert load_checkpoint({str(locked / 'ckpt_00000002.safetensors')!r})[1]['step'] == 2"),
        # item 12: two `train --resume` of one run at once (the second was told to "pass overwrite=True"): the
        # rival writes step 16 while this process trains steps 9..16 from ckpt_8
        ("train16", "cli", [*TRAIN, "--steps", 16, "--save-every", 4, "--out", d / "r16"]),
        ("rival", "py", f"import shutil; shutil.copytree({str(d / 'r16')!r}, {str(d / 'r16b')!r})\n"
                        f"for s in (12, 16): os.remove({str(d / 'r16b' / 'checkpoints')!r} + f'/ckpt_{{s:08d}}.safetensors')\n"
                        f"rival_when({str(d / 'r16b' / 'config.json')!r}, "
                        f"{str(d / 'r16' / 'checkpoints' / 'ckpt_00000016.safetensors')!r}, "
                        f"{str(d / 'r16b' / 'checkpoints' / 'ckpt_00000016.safetensors')!r})"),
        ("collide", "cli", [*TRAIN, "--steps", 16, "--save-every", 8, "--resume", "--out", d / "r16b"]),
        ("collide-left", "py", f"assert open({str(d / 'r16' / 'checkpoints' / 'ckpt_00000016.safetensors')!r}, "
                               f"'rb').read() == open({str(d / 'r16b' / 'checkpoints' / 'ckpt_00000016.safetensors')!r}"
                               ", 'rb').read()"),
        # item 10 on a real full file system: a 2 MB tmpfs cannot hold a 3.4 MB checkpoint
        ("tmpfs", "py", f"assert os.environ.get('FASTCM_TEST_UNSHARED') == '1', 'no private mount namespace'\n"
                        f"os.makedirs({str(disk)!r})\n"
                        f"p = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', {str(disk)!r}], "
                        "capture_output=True, text=True)\nassert p.returncode == 0, p.stderr.strip()"),
        ("disk-full", "cli", [*TRAIN, "--steps", 1, "--out", disk / "a"]),
        ("arm", "py", f"interrupt_when({str(disk / 'b' / 'metrics.jsonl')!r})"),
        ("disk-sigint", "cli", [*TRAIN, "--steps", 100_000, "--save-every", 0, "--save-minutes", 0, "--out",
                                disk / "b"]),
        ("disk-left", "py", f"left = sorted(str(p) for p in __import__('pathlib').Path({str(disk)!r}).rglob('*') "
                            "if 'ckpt' in p.name)\nassert not left, left"),
    ]


def _one_line(command, err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith(f"fastcm {command}: error: ")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliab-cli")
    cases = [(n, k, [str(a) for a in arg] if k == "cli" else arg) for n, k, arg in _cases(d)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-c", DRIVER, json.dumps(cases)]
    if shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
        cmd, env["FASTCM_TEST_UNSHARED"] = ["unshare", "-m", *cmd], "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=d, timeout=600)
    finally:  # whatever happened, pytest must be able to remove the directory again
        if shutil.which("chattr") and (d / "locked" / "checkpoints").is_dir():
            subprocess.run(["chattr", "-i", str(d / "locked" / "checkpoints")], capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _refused(runs, name, command, *words):
    r = runs[name]
    assert r["code"] == 2 and _one_line(command, r["err"]), (name, r)
    for w in words:
        assert w in r["err"], (name, w, r["err"])


def test_count_options_are_validated(runs, tmp_path):
    """Item 6: `sample -n 0` wrote 64 samples; every count option goes through fastcm._checks."""
    assert runs["train"]["code"] == 0, runs["train"]
    _refused(runs, "sample-n0", "sample", "-n/--num must be an integer >= 1, got 0")
    _refused(runs, "sample-per-class", "sample", "--per-class must be an integer >= 1, got -1")
    _refused(runs, "train-seed", "train", "--seed must be an integer >= 0")


def test_resume_on_other_data_needs_allow_data_change(runs):
    """Item 4: a run on digits continued on --data digits:test without a word."""
    _refused(runs, "other-data", "train", "other data", "'digits:train' then, 'digits:test' now",
             "--allow-data-change")
    assert runs["allowed"]["code"] == 0, runs["allowed"]


def test_an_edited_header_is_refused(runs):
    """Item 2 through the command: "step": 2 -> 9 in the header bytes."""
    assert runs["forge"]["code"] == 0, runs["forge"]
    _refused(runs, "forged", "sample", "header does not match its SHA-256")


def test_crafted_headers_end_in_one_line(runs):
    """Item 11: AttributeError, a 17 TB allocation, KeyError and OverflowError before."""
    for name in ("craft1", "craft2", "craft3", "craft4", "fifo"):
        assert runs[name]["code"] == 0, runs[name]
    _refused(runs, "crafted-model", "sample", "model must be a JSON object")
    _refused(runs, "crafted-channels", "sample", "model_channels must be an integer in [1, 8192], got 1048576")
    _refused(runs, "crafted-guard", "train", "guard is missing")
    _refused(runs, "crafted-step", "train", "step must be an integer")
    _refused(runs, "ck-fifo", "sample", "not a regular file")  # item 12: was "does not exist"


def test_a_full_disk_is_one_line_and_sigint_still_exits_130(runs):
    """Item 10 on a real tmpfs: safetensors' SafetensorError was a traceback (exit 1), with SIGINT too."""
    if runs["tmpfs"]["code"]:
        pytest.skip(f"no tmpfs in a private mount namespace here: {runs['tmpfs']['err']}")
    _refused(runs, "disk-full", "train", "No space left on device", "ckpt_00000001.safetensors",
             "free some space")
    r = runs["disk-sigint"]
    lines = r["err"].strip().splitlines()
    assert r["code"] == 128 + signal.SIGINT and len(lines) == 1, r
    assert lines[0].startswith("fastcm train: interrupted by SIGINT at step") and "saving failed" in lines[0] \
        and "No space left on device" in lines[0], r
    assert runs["disk-left"]["code"] == 0, runs["disk-left"]  # no partial checkpoint or temporary stays


def test_statistics_files_and_weights_through_the_command(runs):
    """Item 3: a flipped bit in a .safetensors statistics file, and an FD that overflows (was "FD: inf", exit 0),
    named by the statistics that caused it; item 7: two feature spaces; item 12: --weights that are no weight file
    ("IndexError: list index out of range"), a directory; a directory given as a checkpoint."""
    assert runs["stats"]["code"] == 0, runs["stats"]
    _refused(runs, "fid-flipped", "fid", "flip.safetensors: the file is corrupted", "SHA-256")
    _refused(runs, "fid-inf", "fid", "is inf (not finite)", "the statistics of B (", "huge.npz", "1e+200")
    assert "a.npz') overflow" not in runs["fid-inf"]["err"]  # only the culprit is named
    _refused(runs, "fid-spaces", "fid", "holds 'pixels' statistics")
    _refused(runs, "weights-passwd", "fid", "'/etc/passwd' is neither a PyTorch .pth file nor .safetensors")
    _refused(runs, "weights-dir", "fid", "is a directory")
    assert runs["other-pth"]["code"] == 0, runs["other-pth"]
    _refused(runs, "weights-other", "fid", "not the FID Inception-v3 state dict")  # was 3-8 lines
    assert runs["ck-dir"]["code"] == 0, runs["ck-dir"]
    _refused(runs, "ck-directory", "sample", "is a directory without checkpoints")


def test_images_beside_class_folders_are_refused_by_the_command(runs):
    """Item 5: 5 root images and a/1.png gave n = 1 (the root images dropped without a word)."""
    assert runs["mixed"]["code"] == 0, runs["mixed"]
    _refused(runs, "stats-mixed", "stats", "holds both images (5, e.g. 0.png) and class subfolders (a)")


def test_an_unwritable_checkpoint_directory_is_one_line(runs):
    """Item 10 with `chattr +i checkpoints` (immutable: root cannot write there either): the resumed run's save of
    step 4 fails in one line naming the file, and the step-2 checkpoint it resumed from stays whole."""
    assert runs["train4"]["code"] == 0, runs["train4"]
    if runs["lock"]["code"]:
        pytest.skip(f"chattr +i is not available here: {runs['lock']['err']}")
    _refused(runs, "locked-resume", "train", "Operation not permitted", "ckpt_00000004.safetensors",
             "ckpt_00000002.safetensors is intact")
    assert runs["unlock"]["code"] == 0 and runs["locked-left"]["code"] == 0, (runs["unlock"], runs["locked-left"])


def test_two_resumes_of_one_run_are_told_so(runs):
    """Item 12: the second of two colliding `train --resume` was told to "pass overwrite=True" (no CLI option);
    the rival's checkpoint stays as it wrote it."""
    assert runs["train16"]["code"] == 0 and runs["rival"]["code"] == 0, (runs["train16"], runs["rival"])
    _refused(runs, "collide", "train", "ckpt_00000016.safetensors already exists: another process is training",
             "nothing was replaced")
    assert "overwrite" not in runs["collide"]["err"] and "Errno" not in runs["collide"]["err"]
    assert runs["collide-left"]["code"] == 0, runs["collide-left"]
