"""The demo's STEP_COST (fastcm.demo.config): CPU time of one sCT / MeanFlow training step over one iCT step.

A step is what the demo's stage 1 runs: the method's loss at the demo's settings (MethodConfig's defaults, digits
preset, batch 64), its backward and RAdam. Methods are interleaved round by round (a shared machine loads them
alike); each round times ``--steps`` steps on the process's CPU clock; the figure is the median over ``--rounds``.

    python benchmarks/step_cost.py [--rounds 7] [--steps 3] [--threads 1]
"""
import argparse
import statistics
import time

import torch

from fastcm.cm import METHODS, get_method
from fastcm.models import build_unet
from fastcm.train import MethodConfig


def _step_fn(method_name: str, batch: int):
    cfg = MethodConfig(total_steps=4000, batch_size=batch, method=method_name)
    method = get_method(method_name, **cfg.method_hyperparameters())
    torch.manual_seed(0)
    unet = build_unet("digits", **METHODS[method_name].unet_overrides)
    model = method.make_model(unet).train()
    opt = torch.optim.RAdam(model.parameters(), lr=cfg.lr)
    x = torch.rand(batch, *unet.input_shape) * 2 - 1
    labels = torch.randint(0, unet.num_classes, (batch,))
    gen = torch.Generator().manual_seed(0)
    state = {"step": 0}

    def step():
        opt.zero_grad(set_to_none=True)
        method.loss(model, x, labels, state["step"], gen).mean().backward()
        opt.step()
        state["step"] += 1
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = {m: _step_fn(m, a.batch) for m in METHODS}
    for s in steps.values():  # warm-up (allocator, first-call dispatch)
        s()
    times = {m: [] for m in METHODS}
    for _ in range(a.rounds):
        for m, s in steps.items():
            t0 = time.process_time()
            for _ in range(a.steps):
                s()
            times[m].append((time.process_time() - t0) / a.steps)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"digits, batch {a.batch}, {a.threads} thread(s), medians of {a.rounds} interleaved rounds of {a.steps} "
          f"steps (CPU s/step):")
    for m, t in med.items():
        print(f"  {m:9s} {t:.4f} s  {t / med['ict']:.2f}x iCT  (range {min(times[m]):.4f}-{max(times[m]):.4f})")


if __name__ == "__main__":
    main()
