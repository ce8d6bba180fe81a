"""Peak CPU memory of one training step: plain fwd+bwd, sCT / MeanFlow in one pass, and in two passes.

    .venv/bin/python benchmarks/jvp_memory.py [--preset cifar10-small] [--batch 8] [--out FILE.md]

Writes benchmarks/results/jvp-memory.md by default. Each (method, mode) runs in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=65536``, so that every tensor buffer is its own mmap and is returned to the OS when freed:
the resident set then follows the live tensor bytes, and the kernel's high-water mark (VmHWM) is the peak. Reported,
above the resident set just before the step (after a warm-up step; no optimizer): the peak of the forward and of
the whole step, and what is still resident after the forward, before the backward (the saved activations). Reference
ops, fp32, 1 thread.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = (("plain", "plain"), ("sct", "one_pass"), ("sct", "two_pass"), ("meanflow", "one_pass"),
         ("meanflow", "two_pass"))


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now; VmHWM: resident high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _measure(preset: str, batch: int, method: str, mode: str) -> dict:
    """One step in this process (called in the subprocess)."""
    import gc

    import torch

    from fastcm.cm import METHODS, get_method
    from fastcm.models import build_unet

    torch.set_num_threads(1)
    name = "sct" if method == "plain" else method
    kw = {"jvp_mode": mode} if method != "plain" else {}
    m = get_method(name, **({"warmup_steps": 0} if name == "sct" else {}), **kw)
    torch.manual_seed(0)
    model = m.make_model(build_unet(preset, impl="torch", **METHODS[name].unet_overrides)).train()
    x = torch.rand(batch, *model.unet.input_shape) * 2 - 1
    gen = torch.Generator().manual_seed(0)

    def forward():
        if method == "plain":
            t = torch.rand(batch, generator=gen)
            return model(x, t, output="F").square().flatten(1).mean(1).mean()
        return m.loss(model, x, None, 20_000, gen).mean()

    forward().backward()  # warm-up: lazy imports and one-time buffers are not the step's memory
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    loss = forward()
    retained, fwd_peak = _status("VmRSS") - before, _status("VmHWM") - before
    loss.backward()
    return dict(method=method, mode=mode, peak=_status("VmHWM") - before, fwd_peak=fwd_peak, retained=retained)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cifar10-small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "jvp-memory.md"))
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)  # the subprocess
    a = ap.parse_args(argv)
    if a.batch < 1:
        ap.error(f"--batch must be a positive int, got {a.batch}")
    if a.one:
        print(json.dumps(_measure(a.preset, a.batch, *a.one)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rows = []
    for method, mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--preset", a.preset, "--batch", str(a.batch), "--one",
                              method, mode], env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plain = rows[0]
    lines = [f"# Peak memory of one training step, {a.preset} batch {a.batch}, CPU (reference ops, fp32)", "",
             "Written by `benchmarks/jvp_memory.py`: each row a fresh process; bytes above the resident set before "
             "the step (VmHWM with every buffer mmap'd, so resident = live tensors).", "",
             "| step | peak | vs plain | peak in the forward | resident after forward | vs plain |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        label = "plain fwd+bwd" if r["method"] == "plain" else f"{r['method']} {r['mode'].replace('_', '-')}"
        lines.append(f"| {label} | {r['peak'] / 2**20:.0f} MiB | {r['peak'] / plain['peak']:.2f}x | "
                     f"{r['fwd_peak'] / 2**20:.0f} MiB | {r['retained'] / 2**20:.0f} MiB | "
                     f"{r['retained'] / plain['retained']:.2f}x |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
