"""The compile gate: every Triton kernel compiled for sm_80 (A100) and sm_90 (H100/H200) without a GPU.

Generic over the ops registry (fastcm.ops.REGISTRY): for each U-Net preset and batch it takes the calls each op
gets (fastcm.perf.calls: a meta forward of the U-Net, plus the op's own ``aot_calls``), asks the op for its compile
scenarios (``OpSpec.aot_jobs``: thunks running the op's launchers on meta tensors), records the launches those make
(kernels/_aot.py), expands autotuned kernels into the configs their prune hook keeps, and compiles each as Triton's
JIT would for the target. Checks per compiled kernel: it compiles; its dynamic shared memory fits the target's
per-block limit; and what the op's job asks for (``Job.check``: the fp16/bf16/tf32 attention dots lower to
tensor-core MMA, shared memory within the prune hook's bound).

    python -m fastcm.perf.gate                    # full matrix -> benchmarks/results/gpu-compile.md
    python -m fastcm.perf.gate --subset --json F  # the representative subset tests/test_gpu_compile.py runs

Needs TRITON_INTERPRET unset (``main`` re-executes itself so) and no CUDA device.
"""
import argparse
import dataclasses
import importlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import torch

from fastcm.perf.calls import preset_calls

ARCHS = (80, 90)
PRESETS = ("cifar10-small", "cifar10", "imagenet64")
BATCHES = (64, 1)
SM_COUNTS = (108, 132)  # A100, H100 SXM
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # each op compiles those its kernels take
# The subset: every op's first call at each of these (preset, batch, dtypes), one SM count.
SUBSET = (("cifar10-small", 64, (torch.float16, torch.float32)), ("cifar10", 1, (torch.bfloat16,)),
          ("imagenet64", 1, (torch.float16,)))
SUBSET_SMS = (132,)
REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu-compile.md"


def _registry():
    from fastcm.ops import REGISTRY
    return {name: spec for name, spec in REGISTRY.items() if spec.aot_jobs is not None}


def all_jobs(presets=PRESETS, batches=BATCHES, dtypes=DTYPES, sm_counts=SM_COUNTS, first_only=False) -> Iterator:
    """Every op's jobs at every preset's calls, each distinct (op, label, dtype) once, labelled with the first
    preset that needs it."""
    seen = set()
    registry = _registry()
    for preset in presets:
        for batch in batches:
            calls = preset_calls(preset, batch, registry)
            for name, spec in registry.items():
                for call, _ in (_first_of_each_kind if first_only else list)(calls.get(name, [])):
                    for job in spec.aot_jobs(call, dtypes, sm_counts):
                        if (job.op, job.label, job.dtype) not in seen:
                            seen.add((job.op, job.label, job.dtype))
                            yield dataclasses.replace(job, label=f"{preset}: {job.label}")


def _first_of_each_kind(calls) -> list:
    """The first call of each kind: calls that differ in a flag or choice (a string or bool argument, an optional
    tensor present or not), whatever their shapes and sizes."""
    out, kinds = [], set()
    for call, times in calls:
        kind = tuple((k, v if isinstance(v, (str, bool)) else v is None) for k, v in sorted(call.items())
                     if isinstance(v, (str, bool)) or v is None or isinstance(v, torch.Tensor))
        if kind not in kinds:
            kinds.add(kind)
            out.append((call, times))
    return out


def subset_jobs() -> Iterator:
    """The default run of tests/test_gpu_compile.py: every op's first call of each kind at cifar10-small (batch 64, fp16 and
    fp32 under both matmul settings), cifar10 (batch 1, bf16) and imagenet64 (batch 1, fp16): every kernel on both
    targets, the attention at each head dim the presets use (64, 128, 256), GroupNorm fused and split."""
    for preset, batch, dtypes in SUBSET:
        yield from all_jobs((preset,), (batch,), dtypes, SUBSET_SMS, first_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Compile, check, report.

def _extremes(configs):
    """The smallest and the largest config (by tile area, then stages) of those the autotuner may keep."""
    size = lambda c: (c.kwargs.get("BLOCK_M", 1) * c.kwargs.get("BLOCK_N", 1), c.num_stages, c.num_warps)
    ordered = sorted(configs, key=size)
    return ordered[:1] + ordered[-1:] if len(ordered) > 1 else ordered


def _tensor_key(a):
    if isinstance(a, torch.Tensor):
        return ("T", a.dtype, tuple(a.shape), a.stride(), a.storage_offset())
    return a


def _module(job):
    return importlib.import_module(f"fastcm.kernels.{job.module}")


def compile_jobs(jobs, archs=ARCHS, every_config=True, workers: Optional[int] = None) -> List[dict]:
    """Rows (one per distinct compiled kernel, target and config) with resources and the check verdict.

    The launches are recorded first (cheap: meta tensors), then compiled in ``workers`` forked processes
    (default: FASTCM_GATE_WORKERS or the CPU count), since each compile is one single-threaded LLVM + ptxas run."""
    tasks = _tasks(jobs, archs, every_config)
    compiled = _compile_all(tasks, workers)
    return _dedupe([_row(job, arch, c) for (job, arch, _, _), c in zip(tasks, compiled)])


def _tasks(jobs, archs, every_config) -> list:
    """(job, arch, launch, config keywords) of every distinct launch of the jobs."""
    from fastcm.kernels import _aot
    tasks, done = [], set()
    for job in jobs:
        for arch in archs:
            with _aot.recording(_module(job), arch) as launches:
                job.run()
            for launch in launches:
                key = (arch, launch.name, tuple(map(_tensor_key, launch.args)), repr(sorted(launch.kwargs.items())))
                if key not in done:
                    done.add(key)
                    tasks += [(job, arch, launch, kw)
                              for kw in _aot.configs_of(launch, arch, None if every_config else _extremes)]
    return tasks


_TASKS: list = []  # the tasks a forked worker compiles, by index (inherited, never pickled)


def _compile_one(i: int):
    from fastcm.kernels import _aot
    _, arch, launch, kwargs = _TASKS[i]
    return _aot.compile_launch(launch, kwargs, arch)


def _compile_all(tasks, workers: Optional[int]) -> list:
    global _TASKS
    workers = workers or int(os.environ.get("FASTCM_GATE_WORKERS", 0)) or os.cpu_count() or 1
    _TASKS = tasks
    try:
        if workers <= 1 or len(tasks) < 2 or "fork" not in multiprocessing.get_all_start_methods():
            return [_compile_one(i) for i in range(len(tasks))]
        with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
            out = []
            for c in pool.imap(_compile_one, range(len(tasks)), chunksize=4):
                out.append(c)
                if len(out) % 200 == 0:
                    print(f"  {len(out)} of {len(tasks)} compiled", file=sys.stderr, flush=True)
            return out
    finally:
        _TASKS = []


def _row(job, arch: int, c) -> dict:
    from fastcm.kernels import _aot
    limit = _aot.SHARED_MEMORY_LIMIT[arch]
    problems = []
    if c.error:
        problems.append(c.error)
    elif c.shared > limit:
        problems.append(f"shared memory {c.shared} B > {limit} B")
    extra = job.check(c) if job.check is not None and not c.error else {}
    problems += extra.get("problems", [])
    return dict(kernel=c.kernel, arch=arch, bound=extra.get("bound"), dtype=str(job.dtype).replace("torch.", ""),
                op=job.op,
                label=job.label, module=job.module,
                config=c.config, shared=c.shared, registers=c.registers, spill_stores=c.spill_stores,
                spill_loads=c.spill_loads, mma=" ".join(sorted(set(map(_mma_name, c.mma)))),
                problems="; ".join(problems))


def _mma_name(ptx_op: str) -> str:
    """'mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32' -> 'mma.m16n8k16.f16' (wgmma alike)."""
    parts = ptx_op.split(".")
    shape = next(p for p in parts if p[:1] == "m" and "n" in p and "k" in p)
    operand = parts[-2] if parts[0] == "wgmma" else parts[-3]
    return f"{parts[0]}.{shape}.{operand}"


def _dedupe(rows):
    out, seen = [], {}
    for r in rows:
        key = (r["kernel"], r["arch"], r["dtype"], r["config"])
        if key in seen:
            seen[key]["shapes"] += 1
            continue
        seen[key] = dict(r, shapes=1)
        out.append(seen[key])
    return out


def write_markdown(rows: List[dict], path: Path, seconds: float) -> None:
    import triton
    bad = [r for r in rows if r["problems"]]
    lines = [
        "# Compile gate: every Triton kernel for sm_80 and sm_90 (no GPU)",
        "",
        f"Written by `make gpu-compile` (fastcm/perf/gate.py) with triton {triton.__version__}, torch "
        f"{torch.__version__}; {len(rows)} distinct (kernel, target, dtype, config) compiled in {seconds:.0f} s, "
        f"{len(bad)} failing a check. Launches recorded from the launchers at the presets' shapes "
        f"({', '.join(PRESETS)}; batch {' and '.join(map(str, BATCHES))}; GroupNorm plans for "
        f"{' and '.join(map(str, SM_COUNTS))} SMs, NCHW and channels_last), every config the attention "
        "autotuner's prune hook keeps. Shared memory: dynamic bytes per block (limits sm_80 166,912, sm_90 "
        "232,448). Registers per thread and spill bytes (stores + loads) from `ptxas -v`. MMA: tensor-core "
        "instructions in the PTX. `shapes`: how many recorded launches compiled to this row's config.",
        "",
        "| kernel | sm | dtype | config | regs | spill B | smem B | MMA | shapes | check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["config"])):
        spill = r["spill_stores"] + r["spill_loads"]
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {_short(r['config'])} | {r['registers']} | "
                     f"{spill} | {r['shared']} | {r['mma'] or '-'} | {r['shapes']} | {r['problems'] or 'ok'} |")
    path.write_text("\n".join(lines) + "\n")


def _short(config: str) -> str:
    drop = ("HAS_W=True", "HAS_B=True", "num_ctas=1", "maxnreg=None")
    return " ".join(p for p in config.split() if p not in drop)


def kernel_names(modules) -> List[str]:
    """``<module>.<kernel>`` of every launchable kernel of the given kernels modules."""
    from fastcm.kernels import _aot
    return sorted(f"{m}.{k}" for m in modules for k in _aot.kernels_of(importlib.import_module(f"fastcm.kernels.{m}")))


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") != "0":  # jit kernels, not interpreted ones: re-run without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "fastcm.perf.gate", *(sys.argv[1:] if argv is None
                                                                                 else argv)], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", action="store_true", help="the representative subset (the test's run)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown report (full run default: {REPORT})")
    args = parser.parse_args(argv)
    start = time.time()
    jobs = list(subset_jobs() if args.subset else all_jobs())
    rows = compile_jobs(jobs, every_config=not args.subset)
    seconds = time.time() - start
    if args.json:
        modules = sorted({j.module for j in jobs})
        args.json.write_text(json.dumps(dict(rows=rows, seconds=seconds, jobs=len(jobs),
                                             kernels=kernel_names(modules))))
    out = args.out or (None if args.subset else REPORT)
    if out:
        write_markdown(rows, out, seconds)
    bad = [r for r in rows if r["problems"]]
    for r in bad:
        print(f"FAIL {r['kernel']} sm_{r['arch']} {r['dtype']} {r['config']}: {r['problems']}", file=sys.stderr)
    print(f"{len(rows)} kernels x targets x configs compiled in {seconds:.0f} s; {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
