"""``fastcm demo --compare`` (``make compare``): iCT, sCT and MeanFlow trained at an equal time budget on digits,
then the demo's sampling, evaluation and FD stage for each, into one report table (compare.md / compare.json).

It runs the demo's public pipeline (fastcm.demo.pipeline): the same data, feature network, evaluator and stages.
"""
import dataclasses
from pathlib import Path
from typing import Optional

from fastcm.train.threads import load_average

from .config import ICT_STEPS, METHOD_LABELS, DemoConfig, check_preset
from .pipeline import Clock, clear_stage_runs, demo_threads, environment, run_pipeline, setup

COMPARE_METHODS = ("ict", "sct", "meanflow")
# Stage-1 budget per method, in CPU seconds per torch thread (``stage1_clock="cpu"``): on an idle machine the same as
# wall-clock seconds, and on a shared one a budget other processes' load does not shrink (measured here: a JVP
# method run beside other jobs got 125 steps in 80 wall seconds against 300+ alone). 240 s lets iCT run about its
# 4,000 demo steps (0.063 s/step on one thread; sCT and MeanFlow fastcm.demo.config.STEP_COST times that);
# 3 x (240 s + ~60 s) < 30 min idle.
COMPARE_SECONDS = 240.0


def run_compare(cfg: DemoConfig = DemoConfig(), out: Optional[str] = None, overwrite: bool = False,
                cache: Optional[str] = None, verbose: bool = True, methods=COMPARE_METHODS) -> dict:
    """Stage 1 of every method in ``methods`` at an equal time budget (cfg.stage1_seconds, default
    COMPARE_SECONDS, on cfg.stage1_clock; each also stops at cfg.ict_steps, default iCT's 4,000 for every method),
    then the same sampling, evaluation and FD stage for each, into out/<method>/; writes compare.json and
    compare.md (one table) to ``out`` and returns the report. ``fastcm demo --compare`` uses the "cpu" clock (see
    COMPARE_SECONDS).

    Equal time, not equal steps: a sCT / MeanFlow step (one forward on dual tensors and its backward) costs more
    than an iCT step (fastcm.demo.config.STEP_COST). The CAS protocol (real / synthetic / both) is not run here
    (cfg.cas_seeds is ignored).
    """
    from fastcm.eval.report import prepare_out_dir

    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"cfg must be a DemoConfig, got {type(cfg).__name__}")
    if not methods or any(m not in METHOD_LABELS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names from {tuple(METHOD_LABELS)}, got {methods!r}")
    check_preset(cfg.preset)
    budget = float(cfg.stage1_seconds or COMPARE_SECONDS)
    # The same step cap for every method (the budget, not the cap, is what is equal): iCT's demo steps by default.
    cfg = dataclasses.replace(cfg, ict_steps=cfg.ict_steps or ICT_STEPS)
    out = prepare_out_dir(out, overwrite, prefix="compare")
    with demo_threads(cfg.threads) as (threads, why):
        return _compare(cfg, methods, budget, out, overwrite, cache, verbose, threads, why)


def _compare(cfg, methods, budget: float, out: Path, overwrite: bool, cache, verbose: bool, threads: int,
             why: str) -> dict:
    import torch

    from fastcm.eval.demo_report import render_compare
    from fastcm.eval.report import write_json, write_text

    load_start, clock = load_average(), Clock(verbose)
    if verbose:
        print(f"fastcm demo --compare {', '.join(methods)} → {out} (stage 1: {budget:.0f} s each; {threads} CPU "
              f"thread{'s' if threads > 1 else ''}: {why})", flush=True)
    data = setup(cfg, cache, clock)
    runs, timings, thread_events = {}, {"set-up": clock.total()}, []
    for method in methods:
        mcfg = dataclasses.replace(cfg, method=method, stage1_seconds=budget)  # cfg.stage1_clock: the caller's
        mout = out / method
        mout.mkdir(exist_ok=True)
        if overwrite:
            clear_stage_runs(mout, method)
        torch.manual_seed(cfg.seed)  # the same seed for every method's initial weights
        mclock = Clock(verbose)
        run = run_pipeline(mcfg, mout, data.train, data.evaluator, mclock, thread_events, verbose)
        runs[method] = _method_row(cfg, method, run, mclock)
        timings[method] = mclock.total()
    one = {m: r["metrics"]["one_step"] for m, r in runs.items()}
    report = {
        "config": dataclasses.asdict(cfg), "methods": list(methods), "budget_s": budget,
        "budget_clock": cfg.stage1_clock, "out": str(out),
        "environment": dict(environment(), torch_threads=threads, threads_reason=why,
                            load_average_start=load_start, load_average_end=load_average(), thread_events=thread_events),
        "feature_network": data.net_info, "real_train_split": data.real, "runs": runs,
        "best": {"one_step_cas": METHOD_LABELS[max(one, key=lambda m: one[m]["cas"])],
                 "one_step_fd_features": METHOD_LABELS[min(one, key=lambda m: one[m]["fd_features"])]},
        "timings_s": dict(timings, total=clock.total()),
    }
    write_json(out / "compare.json", report)
    write_text(out / "compare.md", render_compare(report))
    if verbose:
        print("\n" + render_compare(report), flush=True)
    return report


def _method_row(cfg: DemoConfig, method: str, run: dict, clock: Clock) -> dict:
    """One method's entry of compare.json: its metrics, stage-1 steps and time, files and curves."""
    s1 = run["stage1_records"][-1] if run["stage1_records"] else {}
    steps, seconds = int(s1.get("step", 0)), clock.times[f"stage 1: {METHOD_LABELS[method]} training"]
    return {"metrics": run["results"], "stage1_steps": steps, "stage1_seconds": seconds,
            "stage1_cpu_seconds": run["stage1_cpu_s"], "stage1_img_per_s": cfg.batch_size * steps / max(seconds, 1e-9),
            "out": method, "files": run["files"], "checkpoints": run["checkpoints"],
            "curves": {method: run["stage1_records"], "fd": run["fd_records"]},
            "timings_s": dict(clock.times, total=clock.total())}
