"""`make gpu-check`: what a user with one NVIDIA GPU runs first. Under 10 minutes; writes
benchmarks/results/gpu-check-<device>.md.

1. the compile gate (benchmarks/gpu_compile.py --subset: every kernel for sm_80 and sm_90, no GPU needed);
2. the tests marked ``gpu`` (determinism, tensor-core dtypes, CUDA fallbacks);
3. every op of fastcm.ops.REGISTRY, impl="triton" vs its reference in fp64, forward and gradients, at each
   registered case (the presets' shapes) in fp16, bf16 and fp32;
4. one iCT training step of the cifar10-small preset with impl="triton" vs impl="torch" (loss and gradients);
5. a benchmark subset (attention and GroupNorm at the presets' shapes, Triton vs SDPA / eager), 3 minutes at most.

Without CUDA it runs step 1 only and says so in one line (exit status: the gate's).
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: benchmarks/, tests/

import torch

RESULTS = ROOT / "benchmarks" / "results"
# Largest relative error max|out - ref| / max|ref| (and the same per gradient) accepted per dtype: fp16/bf16 round
# the dot operands and outputs (bf16 has 8 mantissa bits); fp32 runs IEEE dots unless torch allows TF32.
REL_TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 2e-3}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return env


def run_gate() -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_compile.py"), "--subset"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()  # the summary; failures and progress go to stderr
    failures = [line for line in proc.stderr.splitlines() if line.startswith("FAIL")]
    return dict(name="compile gate (sm_80, sm_90)", ok=proc.returncode == 0, seconds=time.time() - start,
                detail="; ".join((lines[-1:] or [proc.stderr.strip()[-300:]]) + failures[:3]))


def run_gpu_tests(timeout: int = 240) -> dict:
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(name="tests marked gpu", ok=False, seconds=time.time() - start,
                    detail=f"did not finish in {timeout} s")
    lines = proc.stdout.strip().splitlines()
    return dict(name="tests marked gpu", ok=proc.returncode == 0, seconds=time.time() - start,
                detail=lines[-1] if lines else proc.stderr[-300:], log=lines)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _outputs_and_grads(fn, kwargs, grad_seed=0):
    """fn(**kwargs) and the gradients of its floating inputs for a fixed random output gradient."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in kwargs.items()
              if torch.is_tensor(v) and v.is_floating_point()}
    out = fn(**{**kwargs, **leaves})
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.device, out.dtype))
    return out, {k: v.grad for k, v in leaves.items()}


def check_op(name: str, spec, case: str, dtype, device: str) -> dict:
    """impl="triton" vs the reference evaluated in fp64 on the same rounded inputs."""
    kwargs = spec.make_inputs(case, device=device, dtype=dtype, requires_grad=False)
    out, grads = _outputs_and_grads(lambda **kw: spec.op(**kw, impl="triton"), kwargs)
    ref64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    exp, exp_grads = _outputs_and_grads(spec.ref, ref64)
    errors = {"out": _rel(out, exp), **{f"d{k}": _rel(grads[k], exp_grads[k]) for k in grads}}
    worst = max(errors, key=errors.get)
    ok = out.dtype == dtype and all(e <= REL_TOL[dtype] for e in errors.values())
    return dict(name=f"{name} {case} {str(dtype)[6:]}", ok=ok, detail=f"max rel err {errors[worst]:.2e} ({worst})")


def check_ops(device: str = "cuda", cases=None, dtypes=DTYPES) -> list:
    from fastcm.ops import REGISTRY

    rows = []
    for name, spec in REGISTRY.items():
        if "triton" not in spec.impls:  # no kernel to check (the Frechet distance: LAPACK / torch routes)
            continue
        for case in cases or spec.make_inputs.cases:
            for dtype in dtypes:
                start = time.time()
                try:
                    row = check_op(name, spec, case, dtype, device)
                except Exception as e:  # noqa: BLE001 - a failing op is a row of the report, not the end of it
                    row = dict(name=f"{name} {case} {str(dtype)[6:]}", ok=False,
                               detail=f"{type(e).__name__}: {e}"[:200])
                rows.append(dict(row, seconds=time.time() - start))
    return rows


def check_training_step(device: str = "cuda", preset: str = "cifar10-small", batch: int = 8) -> dict:
    """One iCT loss + backward of the preset with every op on Triton vs every op on the reference (fp32, same
    weights, same noise, same dropout masks): loss and gradients must agree."""
    from fastcm.cm.loss import ICTLoss
    from fastcm.cm.precond import ConsistencyModel
    from fastcm.models import build_unet

    start = time.time()
    torch.manual_seed(0)
    nets = {impl: ConsistencyModel(build_unet(preset, impl=impl)).to(device) for impl in ("triton", "torch")}
    nets["triton"].load_state_dict(nets["torch"].state_dict())
    shape = nets["torch"].unet.input_shape
    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(1)).mul(2).sub(1).to(device)
    losses, grads = {}, {}
    for impl, cm in nets.items():
        gen = torch.Generator(device=device).manual_seed(2)
        loss = ICTLoss(total_steps=1000, impl=impl)(cm, x, step=500, generator=gen).mean()
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = {n: p.grad for n, p in cm.named_parameters() if p.grad is not None}
    loss_err = abs(losses["triton"] - losses["torch"]) / max(abs(losses["torch"]), 1e-30)
    grad_err = max(float((grads["triton"][n] - g).norm() / g.norm().clamp_min(1e-30))
                   for n, g in grads["torch"].items() if g.norm() > 0)
    ok = loss_err <= 1e-3 and grad_err <= 2e-2 and set(grads["triton"]) == set(grads["torch"])
    return dict(name=f"{preset} iCT step, triton vs torch", ok=ok, seconds=time.time() - start,
                detail=f"loss {losses['triton']:.6g} vs {losses['torch']:.6g} (rel {loss_err:.1e}); "
                       f"worst parameter gradient rel err {grad_err:.1e}")


def run_benchmarks(timeout: int = 180) -> dict:
    """The attention (batch 16 and the cifar10 head) and GroupNorm suites, Triton vs SDPA-flash / eager only (the
    report's speedup column); its report lands in benchmarks/results/<device>.md as `make bench` writes it."""
    start = time.time()
    out = ROOT / ".benchmarks" / "gpu-check.json"
    out.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "benchmarks/bench_attention.py", "benchmarks/bench_group_norm.py", "-q",
           "-o", "addopts=", "-p", "no:cacheprovider", "--benchmark-enable", f"--benchmark-json={out}",
           "-k", "(triton or eager or sdpa-flash) and not B2H4"]  # attention at batch 16 and the 256-wide head
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
        ok, tail = proc.returncode == 0, proc.stdout.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:  # pytest-benchmark writes its JSON at the end: nothing to report
        ok, tail = False, [f"did not finish in {timeout} s (no timings)"]
    report = ""
    if out.exists():
        rep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], cwd=ROOT,
                             env=_env(), capture_output=True, text=True)
        report = rep.stdout.strip().splitlines()[-1] if rep.stdout.strip() else ""
    return dict(name="benchmark subset (attention, GroupNorm)", ok=ok, seconds=time.time() - start,
                detail="; ".join([*tail, report]).strip("; "))


def write_report(rows: list, device: str, path: Path) -> None:
    lines = [f"# gpu-check on {device}", "",
             f"`make gpu-check` (benchmarks/gpu_check.py), torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Relative errors are max|triton - ref| / "
             f"max|ref| against the fp64 reference on the same rounded inputs; limits "
             + ", ".join(f"{str(k)[6:]} {v:g}" for k, v in REL_TOL.items()) + ".", "",
             "| check | result | seconds | detail |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {'ok' if r['ok'] else 'FAIL'} | {r.get('seconds', 0):.1f} | {r['detail']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one-command GPU check")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.time()
    gate = run_gate()
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here; ran the compile gate only ({gate['detail']})")
        return 0 if gate["ok"] else 1
    device = torch.cuda.get_device_name()
    rows = [gate, run_gpu_tests()]
    rows += check_ops("cuda")
    rows.append(_guard(check_training_step, "cifar10-small iCT step, triton vs torch"))
    rows.append(run_benchmarks())
    path = args.out_dir / f"gpu-check-{device.replace(' ', '-')}.md"
    write_report(rows, device, path)
    failed = [r for r in rows if not r["ok"]]
    print(f"gpu-check on {device}: {len(rows) - len(failed)}/{len(rows)} checks ok in {time.time() - start:.0f} s; "
          f"report {path}")
    for r in failed:
        print(f"FAIL {r['name']}: {r['detail']}")
    return 1 if failed else 0


def _guard(fn, name):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return dict(name=name, ok=False, detail=f"{type(e).__name__}: {e}"[:300])


if __name__ == "__main__":
    sys.exit(main())
