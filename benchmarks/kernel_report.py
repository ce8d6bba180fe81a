"""The kernel-work report (`make kernel-report`): what each op's Triton route moves and computes at the U-Net
presets' shapes, against the op's declared minimum, with H100 SXM / H200 floor times and the eager PyTorch
reference's traffic side by side. Writes benchmarks/results/kernel-work.md and .csv.

Every op call one forward of a preset's U-Net makes (fastcm.perf.calls), plus each op's extra calls (the loss on
the image batch), runs on CPU under the interpreter probe at batch 1; the figures for a batch of ``--batch``
(default 64) are those counts times the batch (every counted launch scales linearly in the batch:
tests/test_kernel_work.py checks it). The sqrtm rows are the covariance sizes at their own batch.

    python benchmarks/kernel_report.py [--presets cifar10-small,...] [--dtypes fp16,bf16,fp32] [--batch 64]
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on the CPU
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fastcm.ops import REGISTRY  # noqa: E402
from fastcm.perf import work  # noqa: E402
from fastcm.perf.calls import preset_calls  # noqa: E402

PRESETS = ("cifar10-small", "cifar10", "imagenet64")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SQRTM_SIZES = ((8, 64), (1, 256))  # the FID's 2048 x 2048 takes the interpreter too long; FLOPs scale as n^3
OUT = ROOT / "benchmarks" / "results"
CAVEATS = (
    "Counted bytes are *requested* global traffic (every active lane of every load and store), an upper bound on "
    "HBM traffic: L2 (50 MB on an H100) absorbs re-reads such as the K/V tiles every query block of a head loads.",
    "A floor time is max(bytes / HBM bandwidth, FLOPs / peak): a bound, not a prediction.",
    "No GPU timed any of this: the counts come from the Triton interpreter on CPU.",
)


def _label(call: dict) -> str:
    parts = []
    for k, v in call.items():
        if isinstance(v, torch.Tensor):
            parts.append(f"{k}={'x'.join(map(str, v.shape))}" + ("cl" if v.dim() == 4 and v.stride(1) == 1
                                                                   and v.shape[1] > 1 else ""))
        elif v is not None and k not in ("eps", "c"):
            parts.append(f"{k}={v}")
    return " ".join(parts)


def measure(name: str, call: dict, dtype_name: str):
    """{direction: (minimum, Triton count, eager count)} for one call in one dtype (directions the op has)."""
    spec = REGISTRY[name]
    out = {}
    for direction in work.DIRECTIONS:
        kwargs = work.materialize(name, call, DTYPES[dtype_name])
        try:
            minimum = spec.min_work(direction, **kwargs)
        except ValueError:
            continue
        tri = work.triton_count(spec, kwargs, direction)
        eager = work.eager_count(spec, work.materialize(name, call, DTYPES[dtype_name]), direction)
        out[direction] = (minimum, tri, eager)
    return out


def collect(presets, dtypes, batch, ops=None):
    """CSV rows, one per (preset, op, call, dtype, direction), counts scaled to ``batch`` (sqrtm: as called);
    ``ops``: only these ops (None: all)."""
    rows = []
    jobs = [(p, name, call, n, batch) for p in presets
            for name, calls in preset_calls(p, 1).items() if name != "sqrtm" for call, n in calls]
    jobs += [("fid / covariance pooling", "sqrtm", {"a": torch.empty(G, n, n, device="meta")}, 1, 1)
             for G, n in SQRTM_SIZES]
    jobs = [j for j in jobs if ops is None or j[1] in ops]
    for preset, name, call, times, scale in jobs:
        for dt in dtypes:
            if name == "sqrtm" and dt != "fp32":
                continue  # sqrtm's kernels take fp32 and fp64
            for direction, (m, tri, eager) in measure(name, call, dt).items():
                kernels = ";".join(f"{k}:{v.loaded * scale}/{(v.stored + v.atomic) * scale}/{v.dot_flops * scale}"
                                   for k, v in tri.kernels.items())
                rows.append(dict(preset=preset, op=name, call=_label(call), times=times, batch=scale, dtype=dt,
                                 direction=direction, launches=tri.launches, loaded=tri.loaded * scale,
                                 stored=tri.stored * scale, dot_flops=tri.dot_flops * scale,
                                 # fp16/bf16 calls run their dots on tensor cores (the interpreter upcasts bf16)
                                 half_flops=tri.dot_flops * scale if dt in ("fp16", "bf16") else 0,
                                 min_bytes=m.bytes * scale, min_flops=m.flops * scale,
                                 glue_bytes=tri.glue_bytes * scale, glue_flops=tri.glue_flops * scale,
                                 eager_bytes=eager.glue_bytes * scale, eager_flops=eager.glue_flops * scale,
                                 kernels=kernels))
        print(f"  {preset} {name} {_label(call)}", file=sys.stderr, flush=True)
    return rows


def _floor(nbytes, half, flops, gpu, fp32_extra=0):
    return work.floor_seconds(nbytes, {"fp16": half, "fp32": flops - half}, gpu, fp32_extra)


def _sum(rows, keys):
    return {k: sum(r[k] * r["times"] for r in rows) for k in keys}


def write_markdown(rows, path: Path, seconds: float, batch: int, updated=None) -> None:
    keys = ("launches", "loaded", "stored", "dot_flops", "half_flops", "min_bytes", "min_flops", "glue_bytes",
            "eager_bytes", "eager_flops")
    groups = {}
    for r in rows:
        groups.setdefault((r["preset"], r["op"], r["direction"], r["dtype"]), []).append(r)
    lines = [
        "# Kernel work: bytes and FLOPs of every Triton route against its minimum (no GPU)",
        "",
        f"Written by `make kernel-report` (benchmarks/kernel_report.py) "
        + (f"in {seconds:.0f} s" if not updated else
           f"(the rows of {', '.join(updated)} re-run with --update in {seconds:.0f} s, the rest from the full run)")
        + f" on CPU, torch "
        f"{torch.__version__}. Each op's Triton route ran under the interpreter probe (kernels/_probe.py) at every "
        f"distinct call one forward of the preset's U-Net makes (and the loss on its image batch), at batch 1; the "
        f"figures are for a batch of {batch}, the batch-1 counts times {batch} (every launch scales linearly in the "
        "batch, tests/test_kernel_work.py checks it), summed over the op's calls in one U-Net pass (each call "
        "times how often the forward makes it). sqrtm: the covariance sizes as called.",
        "",
        "Minimum: the op's own declaration (`min_work` beside its reference in fastcm/ops/<op>.py: each input read "
        "once, each output written once; attention FLOPs 4 B H Lq Lk D forward, 8 backward, 12 forward with "
        "tangent). Ratio: counted / minimum (bytes; FLOPs where the op has matmuls). AI: counted FLOPs per counted "
        "byte. With glue: (counted + glue bytes) / minimum, what the route moves end to end. Floors: max(bytes / bandwidth, FLOPs / peak) on an H100 SXM (3.35 TB/s; 989 TFLOP/s fp16/bf16 "
        "tensor cores; fp32 dots at torch's default IEEE precision on the 67 TFLOP/s FMA units) and an H200 "
        "(4.8 TB/s, same compute). Glue: bytes of the torch ops the Triton route runs around its kernels. Eager: "
        "the op's PyTorch reference, every aten op's inputs + outputs (`TorchDispatchMode`) and its FLOPs "
        "(`torch.utils.flop_counter`; the reference computes in fp32, so its floor uses the fp32 peak).",
        "",
        "Caveats:",
        *[f"- {c}" for c in CAVEATS],
        "",
        "| preset | op | direction | dtype | launches | loaded MB | stored MB | GFLOP | bytes ratio | with glue | "
        "FLOP ratio | "
        "AI | H100 floor µs | H200 floor µs | glue MB | eager MB | eager GFLOP | eager H100 floor µs | "
        "eager / fused bytes |",
        "|" + "---|" * 19,
    ]
    for (preset, op, direction, dt), rs in groups.items():
        s = _sum(rs, keys)
        nbytes = s["loaded"] + s["stored"]
        h100, h200 = (_floor(nbytes, s["half_flops"], s["dot_flops"], g) * 1e6 for g in ("H100 SXM", "H200"))
        eager_floor = work.floor_seconds(s["eager_bytes"], {}, "H100 SXM", s["eager_flops"]) * 1e6
        flop_ratio = f"{s['dot_flops'] / s['min_flops']:.2f}" if s["min_flops"] else "-"
        ai = f"{s['dot_flops'] / nbytes:.1f}" if s["dot_flops"] else "0"
        lines.append(
            f"| {preset} | {op} | {direction} | {dt} | {s['launches']} | {s['loaded'] / 1e6:.2f} | "
            f"{s['stored'] / 1e6:.2f} | {s['dot_flops'] / 1e9:.2f} | {nbytes / s['min_bytes']:.2f} | "
            f"{(nbytes + s['glue_bytes']) / s['min_bytes']:.2f} | {flop_ratio} | "
            f"{ai} | {h100:.1f} | {h200:.1f} | {s['glue_bytes'] / 1e6:.2f} | {s['eager_bytes'] / 1e6:.2f} | "
            f"{s['eager_flops'] / 1e9:.2f} | {eager_floor:.1f} | {s['eager_bytes'] / nbytes:.2f} |")
    lines += ["", "Per call and per kernel (loaded / stored bytes / FLOPs): kernel-work.csv."]
    path.write_text("\n".join(lines) + "\n")


def _read_rows(path: Path) -> list:
    """The rows of an earlier report's CSV, numbers as ints."""
    with open(path, newline="") as f:
        return [{k: int(v) if v.lstrip("-").isdigit() else v for k, v in r.items()} for r in csv.DictReader(f)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT / "kernel-work.md")
    parser.add_argument("--ops", default=None, help="only these ops (comma-separated REGISTRY names)")
    parser.add_argument("--update", action="store_true",
                        help="with --ops: replace those ops' rows in the existing .csv and rewrite the report")
    args = parser.parse_args(argv)
    ops = None if args.ops is None else args.ops.split(",")
    for op in ops or ():
        if op not in REGISTRY:
            parser.error(f"--ops: unknown op {op!r} (expected one of {', '.join(REGISTRY)})")
    if args.update and ops is None:
        parser.error("--update needs --ops (the ops whose rows are re-run)")
    torch.set_num_threads(1)
    start = time.time()
    rows = collect(args.presets.split(","), args.dtypes.split(","), args.batch, ops)
    seconds = time.time() - start
    if args.update:
        rows = [r for r in _read_rows(args.out.with_suffix(".csv")) if r["op"] not in ops] + rows
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows, args.out, seconds, args.batch, ops if args.update else None)
    print(f"{len(rows)} rows in {seconds:.0f} s -> {args.out} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
