"""The interpreter probe (kernels/_probe.py): its work counts, and the sanitizer that tests/conftest.py runs over every
interpreted launch of the suite. Deliberately broken kernels must each be caught with the kernel's name, the kind
and the first offending program; correct kernels (one with atomics among them) must give no finding."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastcm.kernels import _probe  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the probe instruments the CPU interpreter")
ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * 2
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unmasked_tail_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)  # no mask: the last program reads past the end of x
    tl.store(y_ptr + offs, x, mask=offs < n)


@triton.jit
def _shared_store_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr, tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0)))  # every program, one address


@triton.jit
def _atomic_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(out_ptr, tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0)))


@triton.jit
def _read_previous_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y_i = 2 x_i, then adds the previous program's y block, which that program stored (a GPU has no order)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)
    if pid > 0:
        prev = tl.load(y_ptr + offs - BLOCK)
        tl.store(y_ptr + offs, tl.load(y_ptr + offs, mask=mask) + prev, mask=mask)


@triton.jit
def _read_next_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """Loads the next program's x block from y before that program overwrote it (a write-after-read race)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    nxt = tl.load(y_ptr + offs + BLOCK, mask=offs + BLOCK < n, other=0.0)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + nxt, mask=offs < n)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b, input_precision="ieee"))


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


def test_correct_kernel_gives_no_finding_and_exact_counts():
    x = torch.randn(100)
    y = torch.empty_like(x)
    with _probe.probe() as p:
        _copy_kernel[_grid(100)](x, y, 100, BLOCK=BLOCK)
    assert torch.equal(y, 2 * x)
    assert p.findings == []
    (launch,) = p.launches
    assert launch.kernel == "_copy_kernel" and launch.grid == (4, 1, 1) and launch.programs == 4
    assert (launch.loaded, launch.stored, launch.atomic, launch.dot_flops) == (400, 400, 0, 0)


def test_bytes_count_the_pointer_dtype_and_active_lanes_only():
    x = torch.randn(70, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    with _probe.probe() as p:
        _copy_kernel[_grid(70)](x, y, 70, BLOCK=BLOCK)
    assert torch.equal(y, 2 * x)
    assert (p.launches[0].loaded, p.launches[0].stored) == (140, 140)  # 70 lanes of 2 bytes, of 96 launched


def test_dot_flops_are_2mnk_by_operand_dtype():
    a, b = torch.randn(16, 32, dtype=torch.float16), torch.randn(32, 64, dtype=torch.float16)
    c = torch.empty(16, 64)
    with _probe.probe() as p:
        _dot_kernel[(1,)](a, b, c, M=16, N=64, K=32)
    torch.testing.assert_close(c, a.float() @ b.float())
    assert p.launches[0].flops == {"fp16": 2 * 16 * 64 * 32}
    assert p.launches[0].loaded == 2 * (16 * 32 + 32 * 64) and p.launches[0].stored == 4 * 16 * 64


def test_unmasked_tail_load_is_out_of_bounds():
    storage = torch.randn(128)
    x = storage[:100]  # the overread stays inside the allocation, as a GPU's silent read of a neighbour would
    y = torch.empty(100)
    with _probe.probe() as p:
        _unmasked_tail_kernel[_grid(100)](x, y, 100, BLOCK=BLOCK)
    assert torch.equal(y, x)  # the interpreter's result is right: only the sanitizer sees the defect
    (f,) = p.findings
    assert (f.kernel, f.kind, f.program) == ("_unmasked_tail_kernel", "out-of-bounds", (3, 0, 0))
    assert "loads 4 B" in f.detail and "0 B past the end of argument `x_ptr`" in f.detail
    text = str(f)
    assert text.startswith("_unmasked_tail_kernel: out-of-bounds in program (3, 0, 0): loads 4 B at address")


def test_out_of_bounds_store_into_a_slice_is_caught():
    storage = torch.zeros(128)
    with _probe.probe() as p:
        _copy_kernel[_grid(100)](torch.randn(100), storage[:90], 100, BLOCK=BLOCK)  # n larger than y
    (f,) = p.findings
    assert f.kind == "out-of-bounds" and f.program == (2, 0, 0) and "stores 4 B" in f.detail
    assert "argument `y_ptr`" in f.detail


def test_store_to_a_shared_address_from_every_program_is_a_write_write_race():
    x, out = torch.randn(100), torch.zeros(1)
    with _probe.probe() as p:
        _shared_store_kernel[_grid(100)](x, out, 100, BLOCK=BLOCK)
    (f,) = p.findings
    assert (f.kernel, f.kind, f.program) == ("_shared_store_kernel", "write-write race", (1, 0, 0))
    assert "which program (0, 0, 0) also stores" in f.detail and "byte 0 of argument `out_ptr`" in f.detail


def test_atomic_add_from_every_program_is_no_finding():
    x, out = torch.randn(100), torch.zeros(1)
    with _probe.probe() as p:
        _atomic_sum_kernel[_grid(100)](x, out, 100, BLOCK=BLOCK)
    torch.testing.assert_close(out, x.sum().view(1))
    assert p.findings == []
    assert p.launches[0].atomic == 4 * 4 and p.launches[0].stored == 0


def test_reading_another_programs_output_is_a_read_after_write_race():
    x, y = torch.randn(96), torch.empty(96)
    with _probe.probe() as p:
        _read_previous_kernel[_grid(96)](x, y, 96, BLOCK=BLOCK)
    (f,) = p.findings
    assert (f.kernel, f.kind, f.program) == ("_read_previous_kernel", "read-after-write race", (1, 0, 0))
    assert "which program (0, 0, 0) stored" in f.detail


def test_loading_what_a_later_program_overwrites_is_a_write_after_read_race():
    x, y = torch.randn(96), torch.randn(96)
    with _probe.probe() as p:
        _read_next_kernel[_grid(96)](x, y, 96, BLOCK=BLOCK)
    (f,) = p.findings
    assert (f.kind, f.program) == ("write-after-read race", (1, 0, 0))
    assert "which program (0, 0, 0) loaded" in f.detail


def test_findings_go_to_the_innermost_sanitizing_probe():
    x, out = torch.randn(100), torch.zeros(1)
    with _probe.probe() as outer:
        with _probe.probe(sanitize=False) as counter:
            with _probe.probe() as inner:
                _shared_store_kernel[_grid(100)](x, out, 100, BLOCK=BLOCK)
    assert len(inner.findings) == 1 and outer.findings == [] and counter.findings == []
    assert len(outer.launches) == len(counter.launches) == len(inner.launches) == 1
    with pytest.raises(_probe.SanitizerError, match="write-write race in program"):
        inner.check()


def test_views_of_one_storage_bound_by_their_own_spans():
    """A packed buffer read through two views: each access lies inside one view's span, so no finding; the probe's
    hooks are gone once the last probe closes."""
    buf = torch.randn(2, 100)
    y = torch.empty(100)
    with _probe.probe() as p:
        _copy_kernel[_grid(100)](buf[1], y, 100, BLOCK=BLOCK)
    assert p.findings == [] and torch.equal(y, 2 * buf[1])
    from triton.runtime import interpreter
    assert "create_masked_load" not in vars(interpreter.interpreter_builder) or _probe._ACTIVE


def test_the_suite_sanitizes_every_test():
    """tests/conftest.py holds a sanitizing probe around each test's call (FASTCM_SANITIZE=0 turns it off)."""
    if os.environ.get("FASTCM_SANITIZE", "1") == "0":
        pytest.skip("sanitizer switched off for this run")
    assert any(p.sanitize for p in _probe._ACTIVE)


@pytest.mark.skipif(os.environ.get("FASTCM_PLANTED") != "1", reason="run by the test below, in a subprocess")
def test_planted_race():
    _shared_store_kernel[_grid(100)](torch.randn(100), torch.zeros(1), 100, BLOCK=BLOCK)


def test_a_planted_defect_fails_its_test_under_the_suite_sanitizer():
    env = dict(os.environ, FASTCM_PLANTED="1")
    env.pop("FASTCM_SANITIZE", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{Path(__file__).name}::test_planted_race"], cwd=ROOT / "tests", env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed" in out and "_shared_store_kernel: write-write race in program (1, 0, 0)" in out
