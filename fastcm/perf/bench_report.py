"""Gather a pytest-benchmark JSON run into benchmarks/results/<device>.md and .csv.

    python benchmarks/report.py RUN.json [--out benchmarks/results]   (or python -m fastcm.perf.bench_report)

Each row: op or pipeline, case/shape, dtype, mode, provider, device, torch/triton versions, commit, median and
20th/80th percentiles (ms), speedup vs the group's reference path (BASELINES) (measured side by side in one run),
GB/s or TFLOP/s where the entry recorded bytes or flops, images/s where it recorded items, and peak memory where
the device reports it (CUDA). Goals (GOALS below) are checked and reported as met or missed.
"""
import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (benchmarks/ and its results/)

# (group regex, fast provider, baseline provider, minimum speedup, what the goal is)
GOALS = [
    (r"^pipeline:sample:cifar10-small:64$", "compiled", "eager", 1.5, "compiled one-step sampling ≥1.5× eager"),
    (r"^pipeline:ict-step:", "compiled", "eager", 1.3, "compiled iCT step ≥1.3× eager"),
    (r"^frechet:metric:2048", "fastcm", "scipy-sqrtm", 15.0, "Fréchet distance ≥15× the scipy sqrtm path"),
    (r"^frechet:metric:2048", "fastcm", "eigvals", 4.0, "Fréchet distance ≥4× the eigvals path"),
    (r"^fdloss:256x2048", "batch", "full", 25.0, "FD loss batch mode fwd+bwd ≥25× the full d×d route"),
    (r"^fdloss-queue:2048", "queue", "eigvalsh", 1 / 1.5, "FD loss queue step ≤1.5× one eigvalsh (ratio ≥0.67)"),
    (r"^op:attention:B\d+H\d+L(64|256|1024)D64:fwd$", "triton", "sdpa-flash", 1.0,
     "Triton attention fwd not slower than SDPA flash (GPU)"),
    (r"^pipeline:jvp-step:", "sct:jvp-reference", "plain", 1 / 1.6,
     "one-pass sCT step ≤1.6× a plain fwd+bwd step (reference ops; ratio ≥0.625)"),
    (r"^pipeline:jvp-step:", "meanflow:jvp-reference", "plain", 1 / 1.6,
     "one-pass MeanFlow step ≤1.6× a plain fwd+bwd step (reference ops; ratio ≥0.625)"),
    (r"^pipeline:jvp-step:", "sct:jvp-triton", "plain-triton", 1 / 1.5,
     "fused-JVP sCT step ≤1.5× a plain fwd+bwd step (GPU; ratio ≥0.67)"),
    (r"^pipeline:jvp-step:", "meanflow:jvp-triton", "plain-triton", 1 / 1.5,
     "fused-JVP MeanFlow step ≤1.5× a plain fwd+bwd step (GPU; ratio ≥0.67)"),
]
# The reference path each group's speedups are measured against, in order of preference.
BASELINES = ("eager", "full", "scipy-sqrtm", "eigvalsh", "plain")
COLUMNS = ["group", "name", "case", "dtype", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "speedup",
           "throughput", "peak_mb", "device", "torch", "triton", "commit"]


def _percentile(data, q):
    data = sorted(data)
    k = (len(data) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "-"


def _throughput(info, median_s):
    if "flops" in info:
        return f"{info['flops'] / median_s / 1e12:.3f} TFLOP/s"
    if "bytes" in info:
        return f"{info['bytes'] / median_s / 1e9:.2f} GB/s"
    if "items" in info:
        return f"{info['items'] / median_s:.1f} {info.get('items_unit', 'items')}/s"
    return ""


def rows_from_run(run: dict) -> list:
    commit, triton = _commit(), _triton_version()
    rows = []
    for b in run["benchmarks"]:
        info, stats = b.get("extra_info", {}), b["stats"]
        data = stats.get("data") or [stats["median"]]
        median = statistics.median(data)
        rows.append(dict(
            group=info.get("group", b.get("group") or b["name"]), name=info.get("op", info.get("pipeline", "")),
            case=info.get("case", ""), dtype=info.get("dtype", ""), mode=info.get("mode", ""),
            provider=info.get("provider", ""), median_ms=median * 1e3, p20_ms=_percentile(data, 0.2) * 1e3,
            p80_ms=_percentile(data, 0.8) * 1e3, speedup=None, throughput=_throughput(info, median),
            peak_mb=info.get("peak_mb", ""), device=info.get("device", ""), torch=info.get("torch", ""),
            triton=triton, commit=commit))
    for group in {r["group"] for r in rows}:
        times = {r["provider"]: r["median_ms"] for r in rows if r["group"] == group}
        base = next((times[p] for p in BASELINES if p in times), None)
        for r in rows:
            if r["group"] == group and base is not None:
                r["speedup"] = base / r["median_ms"]
    return rows


def check_goals(rows) -> list:
    results = []
    for pattern, fast, base, need, what in GOALS:
        for group in sorted({r["group"] for r in rows if re.search(pattern, r["group"])}):
            times = {r["provider"]: r["median_ms"] for r in rows if r["group"] == group}
            if fast in times and base in times:
                ratio = times[base] / times[fast]
                results.append((what, group, ratio, "met" if ratio >= need else "MISSED"))
    return results


def _fmt(v):
    if v is None:
        return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(rows, out_dir: Path, smoke: bool = False) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = rows[0]["device"] if rows else "unknown"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", device).strip("-") or "unknown"
    with open(out_dir / f"{slug}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: _fmt(r[k]) for k in COLUMNS} for r in rows)
    goals = check_goals(rows)
    lines = [f"# fastcm benchmarks: {device}", "",
             f"torch {rows[0]['torch'] if rows else '-'}, triton {rows[0]['triton'] if rows else '-'}, "
             f"commit {rows[0]['commit'] if rows else '-'}. Medians of repeated rounds, measured side by side in "
             "one run; speedup is against the group's reference path (eager ops, the full d×d route, or scipy sqrtm)." +
             (" SMOKE RUN: tiny sizes, not figures." if smoke else ""), "", "## Goals", "",
             "| goal | group | measured | status |", "|---|---|---|---|"]
    lines += [f"| {w} | {g} | {r:.2f}× | {s} |" for w, g, r, s in goals] or ["| (no goal groups in this run) | | | |"]
    lines += ["", "## All entries", "",
              "| group | provider | median ms | p20–p80 ms | speedup | throughput | peak MB |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['provider']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f}–{r['p80_ms']:.3f}"
                     f" | {_fmt(r['speedup'])}{'×' if r['speedup'] else ''} | {r['throughput']} | {r['peak_mb']} |")
    path = out_dir / f"{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="pytest-benchmark JSON (run with --benchmark-json)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="mark the report as a smoke run")
    args = parser.parse_args(argv)
    if not args.run.is_file():
        parser.error(f"run: no such file {args.run} (run pytest with --benchmark-json first)")
    try:
        run = json.loads(args.run.read_text())
        rows = rows_from_run(run)
    except (json.JSONDecodeError, KeyError) as e:
        parser.error(f"run: {args.run} is not a pytest-benchmark JSON file ({e})")
    path = write_report(rows, args.out, smoke=args.smoke)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
