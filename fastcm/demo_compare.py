"""``fastcm demo --compare`` (``make compare``): iCT, sCT and MeanFlow trained at an equal time budget on digits,
then the demo's sampling, evaluation and FD stage for each, into one report table (compare.md / compare.json).

It reuses the demo's pipeline (fastcm.demo): the same data, feature network, evaluator and stages.
"""
import dataclasses
from pathlib import Path
from typing import Optional

from fastcm.demo import (METHOD_LABELS, DemoConfig, _check_preset, _clear_stage_run, _Clock, _environment, _pipeline,
                         _setup)
from fastcm.train.threads import choose_threads, load_average

COMPARE_METHODS = ("ict", "sct", "meanflow")
# Stage-1 budget per method, in CPU seconds per torch thread (``stage1_clock="cpu"``): on an idle machine the same as
# wall-clock seconds, and on a shared one a budget other processes' load does not shrink (measured here: a JVP
# method run beside other jobs got 125 steps in 80 wall seconds against 300+ alone). 240 s lets iCT run about its
# 4,000 demo steps (0.063 s/step on one thread; sCT and MeanFlow 0.115 s/step); 3 x (240 s + ~60 s) < 30 min idle.
COMPARE_SECONDS = 240.0


def run_compare(cfg: DemoConfig = DemoConfig(), out: Optional[str] = None, overwrite: bool = False,
                cache: Optional[str] = None, verbose: bool = True, methods=COMPARE_METHODS) -> dict:
    """Stage 1 of every method in ``methods`` at an equal time budget (cfg.stage1_seconds, default
    COMPARE_SECONDS, on cfg.stage1_clock; each also stops at cfg.ict_steps), then the same sampling, evaluation and
    FD stage for each, into out/<method>/; writes compare.json and compare.md (one table) to ``out`` and returns
    the report. ``fastcm demo --compare`` uses the "cpu" clock (see COMPARE_SECONDS).

    Equal time, not equal steps: a sCT / MeanFlow step (a network JVP, a trainable pass and its backward) costs
    about twice an iCT step. The CAS protocol (real / synthetic / both) is not run here (cfg.cas_seeds is ignored).
    """
    import torch

    from fastcm.eval.report import prepare_out_dir

    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"cfg must be a DemoConfig, got {type(cfg).__name__}")
    if not methods or any(m not in METHOD_LABELS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names from {tuple(METHOD_LABELS)}, got {methods!r}")
    _check_preset(cfg.preset)
    budget = float(cfg.stage1_seconds or COMPARE_SECONDS)
    out = prepare_out_dir(out, overwrite, prefix="compare")
    threads, why = choose_threads(cfg.threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _compare(cfg, methods, budget, out, overwrite, cache, verbose, threads, why)
    finally:
        torch.set_num_threads(previous)


def _compare(cfg, methods, budget: float, out: Path, overwrite: bool, cache, verbose: bool, threads: int,
             why: str) -> dict:
    import torch

    from fastcm.eval.demo_report import render_compare
    from fastcm.eval.report import write_json, write_text

    load_start, clock = load_average(), _Clock(verbose)
    if verbose:
        print(f"fastcm demo --compare {', '.join(methods)} → {out} (stage 1: {budget:.0f} s each; {threads} CPU "
              f"thread{'s' if threads > 1 else ''}: {why})", flush=True)
    train, test, net, net_info, ev, real = _setup(cfg, cache, clock)
    runs, timings, thread_events = {}, {"set-up": clock.total()}, []
    for method in methods:
        mcfg = dataclasses.replace(cfg, method=method, stage1_seconds=budget)  # cfg.stage1_clock: the caller's
        mout = out / method
        mout.mkdir(exist_ok=True)
        if overwrite:
            for stage in (method, "fd_finetune"):
                _clear_stage_run(mout / stage)
        torch.manual_seed(cfg.seed)  # the same seed for every method's initial weights
        mclock = _Clock(verbose)
        run = _pipeline(mcfg, mout, train, ev, mclock, thread_events, verbose)
        s1 = run["stage1_records"][-1] if run["stage1_records"] else {}
        seconds = mclock.times[f"stage 1: {METHOD_LABELS[method]} training"]
        runs[method] = {"metrics": run["results"], "stage1_steps": int(s1.get("step", 0)), "stage1_seconds": seconds,
                        "stage1_cpu_seconds": run["stage1_cpu_s"],
                        "stage1_img_per_s": cfg.batch_size * int(s1.get("step", 0)) / max(seconds, 1e-9),
                        "out": method, "files": run["files"], "checkpoints": run["checkpoints"],
                        "curves": {method: run["stage1_records"], "fd": run["fd_records"]},
                        "timings_s": dict(mclock.times, total=mclock.total())}
        timings[method] = mclock.total()
    one = {m: r["metrics"]["one_step"] for m, r in runs.items()}
    report = {
        "config": dataclasses.asdict(cfg), "methods": list(methods), "budget_s": budget,
        "budget_clock": cfg.stage1_clock, "out": str(out),
        "environment": dict(_environment(cfg), torch_threads=threads, threads_reason=why,
                            load_average_start=load_start, load_average_end=load_average(), thread_events=thread_events),
        "feature_network": net_info, "real_train_split": real, "runs": runs,
        "best": {"one_step_cas": METHOD_LABELS[max(one, key=lambda m: one[m]["cas"])],
                 "one_step_fd_features": METHOD_LABELS[min(one, key=lambda m: one[m]["fd_features"])]},
        "timings_s": dict(timings, total=clock.total()),
    }
    write_json(out / "compare.json", report)
    write_text(out / "compare.md", render_compare(report))
    if verbose:
        print("\n" + render_compare(report), flush=True)
    return report
