"""The compile gate: every Triton kernel compiled for sm_80 (A100) and sm_90 (H100/H200) without a GPU.

Each op has one small function yielding jobs: a label, a dtype, the kernels module and a thunk that calls the
module's launchers on ``meta`` tensors at a U-Net preset's shapes. kernels/_aot.py records the launches the
launchers make (block sizes, num_warps, plans), expands autotuned kernels into the configs their prune hook keeps,
and compiles each as Triton's JIT would for the target. Checks per compiled kernel: it compiles; its dynamic shared
memory fits the target's per-block limit; the fp16/bf16 attention dots lower to tensor-core MMA.

    python benchmarks/gpu_compile.py                  # full matrix -> benchmarks/results/gpu-compile.md
    python benchmarks/gpu_compile.py --subset --json F  # the representative subset tests/test_gpu_compile.py runs

Runs with TRITON_INTERPRET unset (it re-executes itself so). Needs no CUDA device.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List

if os.environ.get("TRITON_INTERPRET", "0") != "0":  # jit kernels, not interpreted ones: re-run without the flag
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastcm.kernels import _aot, attention, group_norm, pseudo_huber, sqrtm  # noqa: E402
from fastcm.models import build_unet, unet  # noqa: E402

ARCHS = (80, 90)
PRESETS = ("cifar10-small", "cifar10", "imagenet64")
BATCHES = (64, 1)
SM_COUNTS = (108, 132)  # A100, H100 SXM
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REPORT = ROOT / "benchmarks" / "results" / "gpu-compile.md"
MODULES = (attention, group_norm, pseudo_huber, sqrtm)


@dataclasses.dataclass
class Job:
    op: str
    label: str            # preset / shape / plan
    dtype: torch.dtype
    module: object        # the kernels module whose launchers run() calls
    run: Callable[[], None]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def preset_shapes(preset: str, batch: int) -> dict:
    """Distinct GroupNorm calls (x shape, groups, scale/shift, act) and attention calls (qkv shape, heads) of one
    forward of the preset's U-Net, found by running it on meta tensors."""
    with torch.device("meta"):
        net = build_unet(preset, impl="torch").eval()
    gn, attn = set(), set()

    def pre(mod, args, kwargs):
        scale = args[1] if len(args) > 1 else kwargs.get("scale")
        gn.add((tuple(args[0].shape), mod.num_groups, scale is not None, mod.act == "silu"))

    def qkv_attention(qkv, num_heads, impl):  # records the call; meta tensors have no autocast state to query
        attn.add((tuple(qkv.shape), num_heads))
        return qkv[:, : qkv.shape[1] // 3]

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in net.modules()
             if type(m).__name__ == "GroupNorm"]
    saved, unet.qkv_attention = unet.qkv_attention, qkv_attention
    try:
        c, r = net.input_shape[0], net.input_shape[1]
        labels = torch.zeros(batch, dtype=torch.int64, device="meta") if net.num_classes else None
        net(_meta(batch, c, r, r), _meta(batch), labels)
    finally:
        unet.qkv_attention = saved
        for h in hooks:
            h.remove()
    return dict(group_norm=sorted(gn), attention=sorted(attn))


def _with_sms(sms: int, fn: Callable) -> Callable:
    """fn with the GroupNorm planner seeing ``sms`` streaming multiprocessors (two programs per SM)."""
    def run():
        saved = group_norm._target_programs
        group_norm._target_programs = lambda device: 2 * sms
        try:
            fn()
        finally:
            group_norm._target_programs = saved
    return run


def _fp32_precision(precision):
    """Decorator: run under torch's fp32 matmul setting ``precision`` ("ieee" / "tf32"; None leaves it alone),
    which the attention launcher follows for fp32 inputs."""
    def wrap(fn):
        def run():
            if precision is None:
                return fn()
            matmul = torch.backends.cuda.matmul
            saved, matmul.fp32_precision = matmul.fp32_precision, precision
            try:
                fn()
            finally:
                matmul.fp32_precision = saved
        return run
    return wrap


# ---------------------------------------------------------------------------------------------------------------
# One function per op: the launches its launchers make at the presets' shapes.

def attention_jobs(shapes: dict, dtypes=DTYPES) -> Iterator[Job]:
    """Forward, backward and forward-with-tangent through the packed-qkv views the U-Net passes (qkv_attention's
    layout)."""
    from fastcm.ops.attention import _out_view, _qkv_views
    for (N, C3, Hs, Ws), heads in shapes["attention"]:
        for dtype, precision in [(d, p) for d in dtypes for p in (("ieee", "tf32") if d == torch.float32 else
                                                                   (None,))]:
            @_fp32_precision(precision)
            def run(N=N, C3=C3, Hs=Hs, Ws=Ws, heads=heads, dtype=dtype):
                qkv = _meta(N, C3, Hs, Ws, dtype=dtype)
                out = _meta(N, C3 // 3, Hs, Ws, dtype=dtype)
                q, k, v = _qkv_views(qkv, heads)
                lse = attention.attention_fwd(q, k, v, _out_view(out, heads), 0.125)
                dq, dk, dv = _qkv_views(torch.empty_like(qkv), heads)
                o = _out_view(out, heads)
                attention.attention_bwd(o, q, k, v, o, lse, dq, dk, dv, 0.125)
                tq, tk, tv = _qkv_views(torch.empty_like(qkv), heads)  # forward + tangent (sCM's JVP pass)
                attention.attention_fwd_jvp(q, k, v, tq, tk, tv, o, _out_view(torch.empty_like(out), heads), 0.125)
            yield Job("attention", f"qkv {N}x{C3}x{Hs}x{Ws} heads={heads} D={C3 // 3 // heads}"
                      + (f" fp32 matmuls {precision}" if precision else ""), dtype, attention, run)


def group_norm_jobs(shapes: dict, dtypes=DTYPES, sm_counts=SM_COUNTS) -> Iterator[Job]:
    """Forward, backward and forward-with-tangent, NCHW and channels_last, with the plan (fused / split) for each SM
    count."""
    for (N, C, H, W), G, has_mod, silu in shapes["group_norm"]:
        for dtype in dtypes:
            for layout in ("nchw", "nhwc"):
                for sms in sm_counts:
                    def run(N=N, C=C, H=H, W=W, G=G, has_mod=has_mod, silu=silu, dtype=dtype, layout=layout):
                        x = _meta(N, C, H, W, dtype=dtype)
                        if layout == "nhwc":
                            x = x.contiguous(memory_format=torch.channels_last)
                        w, b = _meta(C, dtype=dtype), _meta(C, dtype=dtype)
                        mod = _meta(N, C, dtype=dtype) if has_mod else None
                        y, mean, rstd = group_norm.group_norm_fwd(x, G, w, b, 1e-5, mod, mod, silu)
                        group_norm.group_norm_bwd(torch.empty_like(y), x, mean, rstd, w, b, mod, mod, silu)
                        if group_norm.jvp_fits(x, G):  # the one-pass tangent (sCT / MeanFlow's JVP), all tangents
                            group_norm.group_norm_jvp(x, torch.empty_like(x), G, w, b, 1e-5, mod, mod, w, b, mod,
                                                      mod, silu, True)
                    yield Job("group_norm", f"{layout} {N}x{C}x{H}x{W} G={G} mod={int(has_mod)} silu={int(silu)} "
                              f"sms={sms}", dtype, group_norm, _with_sms(sms, run))


def pseudo_huber_jobs(shapes: dict, dtypes=DTYPES) -> Iterator[Job]:
    """Per-sample and per-element loss with its gradient, at the preset's image batch."""
    N, C, R = shapes["image"]
    for dtype in dtypes:
        for per_sample in (True, False):
            def run(dtype=dtype, per_sample=per_sample):
                x = _meta(N, C, R, R, dtype=dtype)
                pseudo_huber.pseudo_huber_fwd(x, x, 0.03, per_sample, True)
                pseudo_huber.pseudo_huber_fwd(x, x, 0.03, per_sample, False)
            yield Job("pseudo_huber", f"{N}x{C}x{R}x{R} per={'sample' if per_sample else 'element'}", dtype,
                      pseudo_huber, run)


def sqrtm_jobs(sizes=((8, 64), (1, 512), (1, 2048)), dtypes=(torch.float32, torch.float64)) -> Iterator[Job]:
    """Newton-Schulz square roots: covariance-pooling batches and the FID feature covariance (2048); fp32 under
    both of torch's matmul settings (IEEE FMA and TF32 tiles, see kernels.sqrtm.sqrtm_plan)."""
    for G, n in sizes:
        for dtype, precision in [(d, p) for d in dtypes for p in (("ieee", "tf32") if d == torch.float32 else
                                                                   (None,))]:
            @_fp32_precision(precision)
            def run(G=G, n=n, dtype=dtype):
                sqrtm.sqrtm_fwd(_meta(G, n, n, dtype=dtype), 2)
            yield Job("sqrtm", f"{G}x{n}x{n}" + (f" fp32 matmuls {precision}" if precision else ""), dtype, sqrtm,
                      run)


OPS = ("attention", "group_norm", "pseudo_huber", "sqrtm")


def all_jobs(ops=OPS, presets=PRESETS, batches=BATCHES) -> Iterator[Job]:
    """The full matrix: every op at every preset's shapes (sqrtm at its own sizes), each distinct job once."""
    per_preset = dict(attention=attention_jobs, group_norm=group_norm_jobs, pseudo_huber=pseudo_huber_jobs)
    seen = set()
    for preset in presets:
        for batch in batches:
            shapes = dict(preset_shapes(preset, batch), image=(batch, *_input_shape(preset)))
            for op in ops:
                for job in per_preset[op](shapes) if op in per_preset else ():
                    if (job.op, job.label, job.dtype) not in seen:
                        seen.add((job.op, job.label, job.dtype))
                        yield dataclasses.replace(job, label=f"{preset}: {job.label}")
    if "sqrtm" in ops:
        yield from sqrtm_jobs()


def _input_shape(preset: str):
    from fastcm.models import PRESETS as P
    cfg = P[preset]
    return cfg.in_channels, cfg.img_resolution


def subset_jobs() -> Iterator[Job]:
    """The default run of tests/test_gpu_compile.py: every kernel on both targets, each dtype at one shape, the
    attention at each head dim the presets use (64, 128, 256), GroupNorm fused and split."""
    for preset, batch, dtypes in (("cifar10-small", 64, DTYPES), ("cifar10", 1, HALF), ("imagenet64", 1, HALF)):
        shapes = preset_shapes(preset, batch)
        shapes["attention"] = shapes["attention"][:1]
        yield from (dataclasses.replace(j, label=f"{preset}: {j.label}") for j in attention_jobs(shapes, dtypes))
    shapes = dict(group_norm=[((64, 128, 16, 16), 32, True, True), ((1, 192, 64, 64), 32, False, True)])
    yield from group_norm_jobs(shapes, (torch.float16, torch.float32), (132,))
    yield from pseudo_huber_jobs(dict(image=(64, 3, 32)), (torch.bfloat16, torch.float32))
    yield from sqrtm_jobs(sizes=((8, 64),), dtypes=(torch.float32,))


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


def compile_jobs(jobs, archs=ARCHS, every_config=True) -> List[dict]:
    """Rows (one per distinct compiled kernel, target and config) with resources and the check verdict."""
    rows, done = [], {}
    for job in jobs:
        for arch in archs:
            with _aot.recording(job.module, arch) as launches:
                job.run()
            for launch in launches:
                key = (arch, launch.name, tuple(map(_tensor_key, launch.args)), repr(sorted(launch.kwargs.items())))
                if key in done:
                    continue
                done[key] = True
                for kwargs in _aot.configs_of(launch, arch, None if every_config else _extremes):
                    rows.append(_row(job, arch, _aot.compile_launch(launch, kwargs, arch)))
                    if len(rows) % 200 == 0:
                        print(f"  {len(rows)} compiled ({job.label})", file=sys.stderr, flush=True)
    return _dedupe(rows)


def _row(job: Job, arch: int, c: "_aot.Compiled") -> dict:
    limit = _aot.SHARED_MEMORY_LIMIT[arch]
    problems = []
    if c.error:
        problems.append(c.error)
    elif c.shared > limit:
        problems.append(f"shared memory {c.shared} B > {limit} B")
    tensor_cores = job.dtype in HALF or c.kwargs.get("PRECISION") == "tf32"
    needs_mma = job.op == "attention" and tensor_cores and "_preprocess_" not in c.kernel
    if not c.error and needs_mma and not c.mma:
        problems.append("fp16/bf16/tf32 dots did not lower to MMA")
    bound = _attention_bound(c)
    if bound is not None and c.shared > bound:
        problems.append(f"shared memory {c.shared} B above the prune hook's bound {bound} B")
    return dict(kernel=c.kernel, arch=arch, bound=bound, dtype=str(job.dtype).replace("torch.", ""), op=job.op,
                label=job.label,
                config=c.config, shared=c.shared, registers=c.registers, spill_stores=c.spill_stores,
                spill_loads=c.spill_loads, mma=" ".join(sorted(set(map(_mma_name, c.mma)))),
                problems="; ".join(problems))


def _attention_bound(c: "_aot.Compiled"):
    """kernels.attention.shared_bytes for an attention kernel's config (what its prune hook assumed), else None."""
    kind = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq",
            "_attn_fwd_jvp_kernel": "jvp"}.get(c.kernel)
    if kind is None:
        return None
    import triton
    kw = c.kwargs
    config = triton.Config({"BLOCK_M": kw["BLOCK_M"], "BLOCK_N": kw["BLOCK_N"]}, num_stages=kw["num_stages"])
    return attention.shared_bytes(kind, config, kw["BLOCK_D"], max(2, kw["DOT"].primitive_bitwidth // 8))


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
    bad = [r for r in rows if r["problems"]]
    lines = [
        "# Compile gate: every Triton kernel for sm_80 and sm_90 (no GPU)",
        "",
        f"Written by `make gpu-compile` (benchmarks/gpu_compile.py) with triton {_triton_version()}, torch "
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


def _triton_version():
    import triton
    return triton.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", action="store_true", help="the representative subset (the test's run)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of the full matrix's ops")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown report (full run default: {REPORT})")
    args = parser.parse_args(argv)
    start = time.time()
    jobs = subset_jobs() if args.subset else all_jobs(tuple(args.ops.split(",")))
    rows = compile_jobs(jobs, every_config=not args.subset)
    seconds = time.time() - start
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, seconds=seconds, kernels=_all_kernels())))
    out = args.out or (None if args.subset else REPORT)
    if out:
        write_markdown(rows, out, seconds)
    bad = [r for r in rows if r["problems"]]
    for r in bad:
        print(f"FAIL {r['kernel']} sm_{r['arch']} {r['dtype']} {r['config']}: {r['problems']}", file=sys.stderr)
    print(f"{len(rows)} kernels x targets x configs compiled in {seconds:.0f} s; {len(bad)} failing")
    return 1 if bad else 0


def _all_kernels():
    return sorted(f"{m.__name__.rsplit('.', 1)[-1]}.{k}" for m in MODULES for k in _aot.kernels_of(m))


if __name__ == "__main__":
    sys.exit(main())
