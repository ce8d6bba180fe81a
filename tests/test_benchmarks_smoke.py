"""Each benchmark suite runs once at a tiny size (BENCH_SMOKE=1), so the suites cannot rot."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("suite", SUITES)
def test_benchmark_suite_smoke(suite, tmp_path):
    env = dict(os.environ, BENCH_SMOKE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"benchmarks/{suite}",
           "--benchmark-enable", "--benchmark-json", str(tmp_path / "out.json"), "-o", "addopts="]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = subprocess.run([sys.executable, "benchmarks/report.py", str(tmp_path / "out.json"), "--smoke",
                             "--out", str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert list((tmp_path / "results").glob("*.csv")) and list((tmp_path / "results").glob("*.md"))
