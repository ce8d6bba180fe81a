"""The compile gate (fastcm.perf.gate --subset, generic over the ops registry): every Triton kernel compiled for sm_80 and sm_90 at the
launch configs its launcher picks, without a GPU.

The interpreter that runs the other kernel tests never type-checks loop-carried variables and never sees shared
memory, registers or MMA lowering; this module does. It runs the gate in a subprocess (jit kernels need
TRITON_INTERPRET unset, which is an import-time switch of triton) and checks every compiled (kernel, target,
dtype, config): compiled; dynamic shared memory within the target's per-block limit; fp16/bf16 attention dots on
tensor cores. Compiled kernels and ptxas figures are cached in the Triton cache (~/.triton/cache): a warm run takes
seconds, a cold one about two minutes on 2 cores. The full matrix is ``make gpu-compile``.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = {80: 166_912, 90: 232_448}


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "fastcm.perf.gate", "--subset", "--json", str(out)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"the gate did not finish:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _fmt(rows):
    return "\n".join(f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['config']}: {r['problems']}" for r in rows)


def test_gate_covers_every_kernel_in_kernels(gate):
    """Every @triton.jit kernel (a function named *_kernel) of every kernels/*.py is one the gate compiles."""
    declared = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()):
            declared.add(f"{path.stem}.{name}")
    assert declared and declared <= set(gate["kernels"]), f"not in the gate: {declared - set(gate['kernels'])}"


def test_every_kernel_compiles_for_sm80_and_sm90(gate):
    compiled = {(r["kernel"], r["arch"]) for r in gate["rows"] if not r["problems"].startswith(("Compilation",
                                                                                                "PTXAS"))}
    kernels = [k.split(".", 1)[1] for k in gate["kernels"]]
    missing = [(k, a) for k in kernels for a in (80, 90) if (k, a) not in compiled]
    failed = [r for r in gate["rows"] if "Error" in r["problems"]]
    assert not failed, "kernels that fail to compile:\n" + _fmt(failed)
    assert not missing, f"kernels never compiled: {missing}"


def test_shared_memory_within_the_per_block_limit(gate):
    over = [r for r in gate["rows"] if r["shared"] > LIMIT[r["arch"]]]
    assert not over, "configs a launcher may pick that exceed the shared-memory limit:\n" + _fmt(over)


def test_attention_dots_use_tensor_cores_in_fp16_bf16_and_tf32(gate):
    rows = [r for r in gate["rows"] if r["op"] == "attention" and "preprocess" not in r["kernel"]
            and not r["problems"].startswith("Compilation")]
    tensor_core = [r for r in rows if r["dtype"] in ("float16", "bfloat16") or "PRECISION=tf32" in r["config"]]
    ieee = [r for r in rows if r["dtype"] == "float32" and "PRECISION=ieee" in r["config"]]
    assert tensor_core and ieee
    no_mma = [r for r in tensor_core if not r["mma"]]
    assert not no_mma, "fp16/bf16/tf32 attention dots not on tensor cores:\n" + _fmt(no_mma)
    wrong = [r for r in tensor_core if r["arch"] == 80 and not r["mma"].startswith("mma.")]
    assert not wrong, _fmt(wrong)
    assert all("tf32" in r["mma"] for r in tensor_core if r["dtype"] == "float32")
    assert not any(r["mma"] for r in ieee), "fp32 with TF32 disallowed must not use tensor cores"


def test_gate_rows_hold_ptxas_figures(gate):
    """Registers come from ptxas -v: every compiled kernel uses some, and never more than the 255 a thread has."""
    ok = [r for r in gate["rows"] if not r["problems"]]
    assert ok and all(0 < r["registers"] <= 255 for r in ok)


def _gpu_check():
    from fastcm.perf import gpu_check

    return gpu_check


def test_gpu_check_compares_ops_and_a_training_step_on_this_device(device, tmp_path):
    """make gpu-check's own checks, run here on the interpreter (fp32, smallest cases): the code path a GPU user
    runs, and its tolerances met by correct kernels."""
    import torch

    check = _gpu_check()
    rows = check.check_ops(device, cases=["tiny"], dtypes=(torch.float32,))
    assert len(rows) == 5 and all(r["ok"] for r in rows), rows
    step = check.check_training_step(device, preset="tiny", batch=2)
    assert step["ok"], step
    check.write_report([*rows, step], "test-device", tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert text.count("| ok |") == 6 and "tiny iCT step" in text


def test_gpu_check_flags_a_wrong_kernel(device, monkeypatch):
    import torch

    from fastcm.ops import REGISTRY

    check = _gpu_check()
    spec = REGISTRY["attention"]
    wrong = spec._replace(op=lambda impl, **kw: spec.op(impl=impl, **kw) * 1.01)
    row = check.check_op("attention", wrong, "tiny", torch.float32, device)
    assert not row["ok"] and "max rel err 1.00e-02" in row["detail"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the no-CUDA path")
def test_gpu_check_without_cuda_runs_the_gate_and_says_so_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device") and "0 failing" in lines[0]


def test_attention_shared_memory_bound_holds(gate):
    """The bound the attention prune hook uses before compiling is never below what Triton allocates."""
    rows = [r for r in gate["rows"] if r["bound"] is not None and not r["problems"].startswith("Compilation")]
    assert rows
    under = [r for r in rows if r["shared"] > r["bound"]]
    assert not under, "shared_bytes underestimates:\n" + _fmt(under)
