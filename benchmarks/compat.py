"""`make compat`: the compile gate and the interpreted kernel tests under other torch/triton pairs.

A CUDA torch brings its own triton, so users arrive with versions other than the 3.7.0 that `make test` installs.
For each ``torch:triton`` pair this builds a throwaway virtual environment under ``.compat/`` (gitignored), installs
``torch==X triton==Y`` (where torch pins another triton, triton ``Y`` is installed over the pin with ``--no-deps``
and the row says so), then fastcm itself with ``--no-deps`` and its runtime and test requirements except torch and
triton, checks that the pair is still the one asked for, and runs the compile-gate subset plus the interpreted kernel
and patch tests. Every result is kept in ``benchmarks/results/compat.json`` (a pair run again replaces its row) and
the table in ``benchmarks/results/compat.md`` is written from all of them.

    python benchmarks/compat.py                  # 2.10.0:3.6.0:2.3.5 and 2.14.1:3.9.0, the tested floor and top
    python benchmarks/compat.py --pairs 2.13.0:3.6.0,2.13.0:3.8.0:2.3.5  # TORCH:TRITON[:NUMPY]
    python benchmarks/compat.py --pairs 2.13.0:3.8.0 --keep      # reuse an existing environment
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TESTS = ["tests/test_gpu_compile.py", "tests/test_attention.py", "tests/test_group_norm.py",
         "tests/test_pseudo_huber.py", "tests/test_sqrtm.py", "tests/test_jvp_ops.py", "tests/test_kernel_work.py",
         "tests/test_launch_options.py"]
PINNED = {"torch", "triton"}  # installed by the pair itself; any other requirement comes from setup.py
VERSIONS = ("import sys, numpy, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__,"
            " numpy.__version__)")


def parse_pairs(text: str) -> list:
    """``TORCH:TRITON[:NUMPY]`` items -> (torch, triton, numpy or None) triples."""
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[\w.+]+", p) for p in parts):
            raise SystemExit(f"--pairs: expected TORCH:TRITON[:NUMPY] items such as 2.13.0:3.6.0, got {item!r}")
        pairs.append((parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    if not pairs:
        raise SystemExit("--pairs: expected at least one TORCH:TRITON pair, got none")
    return pairs


def _run(cmd, log, env=None, timeout=None):
    """Run ``cmd``, appending its output to ``log``; return the exit code (124 on time-out)."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout)
            return proc.returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[timed out after {timeout} s]\n")
            return 124


def _requirements(py: Path, numpy_v) -> list:
    """fastcm's runtime and ``test`` requirements (from its installed metadata) without torch and triton, with
    numpy pinned to ``numpy_v`` where one is given."""
    code = ("import importlib.metadata as m, json; print(json.dumps(m.requires('fastcm')))")
    reqs = json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout)
    keep = []
    for req in reqs:
        spec, _, marker = req.partition(";")
        name = re.match(r"[A-Za-z0-9_.-]+", spec.strip()).group(0).lower()
        if name in PINNED or ("extra" in marker and "'test'" not in marker.replace('"', "'")):
            continue
        keep.append(f"numpy=={numpy_v}" if name == "numpy" and numpy_v else spec.strip())
    return keep


def install(env_dir: Path, versions: tuple, log: Path, keep: bool) -> tuple:
    """Build the environment (or, with ``keep``, reuse a complete one); return (python, note, error, seconds)."""
    py, marker, t0 = env_dir / "bin" / "python", env_dir / ".installed.json", time.time()
    if keep and marker.exists():
        done = json.loads(marker.read_text())
        return py, done["note"], None, done["install_s"]
    py, note, error = _install(env_dir, versions, log)
    seconds = round(time.time() - t0)
    if error is None:
        marker.write_text(json.dumps({"note": note, "install_s": seconds}) + "\n")
    return py, note, error, seconds


def _install(env_dir: Path, versions: tuple, log: Path) -> tuple:
    (torch_v, triton_v, numpy_v), py = versions, env_dir / "bin" / "python"
    if env_dir.exists():
        subprocess.run(["rm", "-rf", str(env_dir)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    if _run([sys.executable, "-m", "venv", str(env_dir)], log):
        return py, "", "could not create the virtual environment"
    note = ""
    if _run(pip + [f"torch=={torch_v}", f"triton=={triton_v}"], log):
        if "ResolutionImpossible" not in log.read_text():
            return py, note, f"pip could not install torch=={torch_v} triton=={triton_v}"
        if _run(pip + [f"torch=={torch_v}"], log):
            return py, note, f"pip could not install torch=={torch_v}"
        code = "import importlib.metadata as m; print(*[r.split(';')[0] for r in m.requires('torch') if 'triton' in r])"
        pin = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd="/").stdout.strip() or "a triton"
        note = f"torch {torch_v} requires {pin}: triton {triton_v} installed over it with --no-deps"
        if _run(pip + ["--no-deps", f"triton=={triton_v}"], log):
            return py, note, f"pip could not install triton=={triton_v}"
    if _run(pip + ["--no-deps", "-e", "."], log):
        return py, note, "pip install --no-deps -e . failed"
    if _run(pip + _requirements(py, numpy_v), log):
        return py, note, "the test requirements did not install"
    return py, note, None


def _failures(junit: Path, n: int = 3) -> list:
    """The first lines of the first ``n`` failing or erroring tests of a JUnit XML report."""
    if not junit.exists():
        return []
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            text = (bad.get("message") or bad.text or "").strip().splitlines()
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            out.append(f"{name}: {' / '.join(line.strip() for line in text[:2])[:300]}")
        if len(out) >= n:
            break
    return out[:n]


def _counts(junit: Path) -> dict:
    if not junit.exists():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def run_tests(py: Path, env_dir: Path, log: Path, timeout: int) -> dict:
    junit = env_dir / "junit.xml"
    junit.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_CACHE_DIR": str(env_dir / "triton-cache")}
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it; the gate's subprocess needs it unset
    tests = TESTS + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_patch*.py"))
    rc = _run([str(py), "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}", *tests], log, env,
              timeout)
    return {"rc": rc, **_counts(junit), "first_failures": _failures(junit)}


def run_pair(versions: tuple, args) -> dict:
    torch_v, triton_v, numpy_v = versions
    name = f"torch-{torch_v}_triton-{triton_v}" + (f"_numpy-{numpy_v}" if numpy_v else "")
    env_dir = Path(args.root).resolve() / name
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    log = env_dir.parent / f"{name}.log"
    if not args.keep:
        log.write_text("")
    row = {"pair": ":".join(v for v in versions if v), "date": time.strftime("%Y-%m-%d"),
           "log": str(log.relative_to(ROOT))}
    py, row["note"], error, row["install_s"] = install(env_dir, versions, log, args.keep)
    if error is None:
        got = subprocess.run([str(py), "-c", VERSIONS], capture_output=True, text=True, cwd="/")
        parts = got.stdout.split()
        if got.returncode or len(parts) != 4:
            error = f"the environment does not import torch/triton/numpy: {got.stderr.strip().splitlines()[-1:]}"
        else:
            row.update(zip(("python", "torch", "triton", "numpy"), parts))
            if parts[1].split("+")[0] != torch_v or parts[2] != triton_v or numpy_v not in (None, parts[3]):
                error = f"pip left torch {parts[1]} / triton {parts[2]} / numpy {parts[3]}, not what was asked for"
    if error is not None or args.install_only:
        row.update(error=error or "installed only (--install-only)", passed=0, failed=0, errors=0, skipped=0,
                   test_s=0, rc=0, first_failures=[])
        return row
    t0 = time.time()
    row.update(run_tests(py, env_dir, log, args.timeout))
    row["test_s"] = round(time.time() - t0)
    return row


def write_report(rows: dict, path: Path) -> None:
    lines = ["# Compatibility: torch/triton pairs (`make compat`)", "",
             "Each pair in a fresh virtual environment (benchmarks/compat.py): the compile-gate subset "
             "(tests/test_gpu_compile.py, sm_80 and sm_90 without a GPU) plus the interpreted kernel, JVP, work, "
             "launch-option and patch tests (" + ", ".join(Path(t).name for t in TESTS[1:]) + ", test_patch*.py), "
             "on 2 CPU cores (no GPU). Install and test times are wall seconds.", "",
             "| pair | python | torch | triton | numpy | passed | failed | errors | skipped | install s | test s "
             "| date | result |", "|" + "---|" * 13]
    def order(key):
        return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"[.:]", key)]

    for key in sorted(rows, key=order):
        r = rows[key]
        ok = "error: " + r["error"] if r.get("error") else ("pass" if not (r["failed"] or r["errors"] or r["rc"])
                                                             else f"fail (pytest exit {r['rc']})")
        lines.append(f"| {key} | {r.get('python', '-')} | {r.get('torch', '-')} | {r.get('triton', '-')} | "
                     f"{r.get('numpy', '-')} | {r['passed']} | {r['failed']} | {r['errors']} | {r['skipped']} | "
                     f"{r['install_s']} | {r['test_s']} | {r['date']} | {ok} |")
    notes = [(k, rows[k]) for k in sorted(rows) if rows[k].get("note") or rows[k].get("first_failures")]
    if notes:
        lines += ["", "## Notes and first failures", ""]
        for key, r in notes:
            lines += [f"- {key}: {r['note']}" if r.get("note") else f"- {key}:"]
            lines += [f"  - `{f}`" for f in r.get("first_failures", [])]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="2.10.0:3.6.0:2.3.5,2.14.1:3.9.0",  # the oldest and newest claimed
                    help="TORCH:TRITON[:NUMPY],... (default: %(default)s); NUMPY pins numpy (else the newest)")
    ap.add_argument("--root", default=str(ROOT / ".compat"), help="where the environments go (default: .compat/)")
    ap.add_argument("--keep", action="store_true", help="reuse an environment that installed completely before")
    ap.add_argument("--install-only", action="store_true", help="build the environments, run no test")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds for one pair's tests (default: %(default)s)")
    ap.add_argument("--out", default=str(RESULTS / "compat.md"), help="the report (default: %(default)s)")
    args = ap.parse_args(argv)
    pairs = parse_pairs(args.pairs)
    out = Path(args.out)
    store = out.with_suffix(".json")
    bad = 0
    for versions in pairs:
        print(f"[compat] torch {versions[0]} + triton {versions[1]}" + (f" + numpy {versions[2]}" if versions[2]
                                                                        else "") + " ...", flush=True)
        row = run_pair(versions, args)
        if args.install_only:
            print(f"[compat] {row['pair']}: {row['error']} in {row['install_s']} s", flush=True)
            continue
        rows = json.loads(store.read_text()) if store.exists() else {}  # re-read: another run may have added rows
        rows[row["pair"]] = row
        store.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
        write_report(rows, out)
        bad += bool(row.get("error") or row["failed"] or row["errors"] or row["rc"])
        outcome = row.get("error") or "passed %(passed)s failed %(failed)s errors %(errors)s" % row
        print(f"[compat] {row['pair']}: {outcome} (install {row['install_s']} s, tests {row['test_s']} s; "
              f"log {row['log']})", flush=True)
    print(f"[compat] wrote {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
