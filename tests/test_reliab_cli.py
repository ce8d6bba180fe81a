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

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent('''
    import io, json, os, runpy, signal, subprocess, sys, threading, time
    results = {}

    def interrupt_when(path):  # SIGINT to this process once the training loop has logged (its handler is on)
        def watch():
            while not (os.path.exists(path) and os.path.getsize(path)):
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)
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
        sys.argv = ["fastcm", *arg]
        err = io.StringIO()
        stderr, sys.stderr = sys.stderr, err
        try:
            runpy.run_module("fastcm.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:  # a traceback: what the test must never see
            import traceback
            code, _ = 1, traceback.print_exc(file=err)
        finally:
            sys.stderr = stderr
        results[name] = {"code": code, "err": err.getvalue()}
    print(json.dumps(results))
''')

TRAIN = ["train", "--preset", "tiny", "--batch-size", 4, "--no-progress"]


def _craft(src, dst, edit: str) -> str:
    """A driver step: ``dst`` = the checkpoint ``src`` with ``edit`` applied to its header ``m`` (and a valid
    checksum: a crafted file, not a damaged one)."""
    return (f"from fastcm.train import load_checkpoint, save_checkpoint\n"
            f"t, m = load_checkpoint({str(src)!r})\n{edit}\n"
            f"save_checkpoint({str(dst)!r}, t, m, overwrite=True)")


def _cases(d: Path):
    run, ck = d / "run", d / "run" / "checkpoints" / "ckpt_00000002.safetensors"
    forged, res = d / "forged", d / "res" / "checkpoints" / "ckpt_00000002.safetensors"
    disk = d / "disk"
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
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=d, timeout=600)
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
