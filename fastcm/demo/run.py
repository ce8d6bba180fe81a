"""``fastcm demo``: one run of the pipeline (fastcm.demo.pipeline) with the CAS protocol, the training-curve plot and
report.json / report.md / the printed summary."""
import dataclasses
from pathlib import Path
from typing import Optional

from fastcm.train.threads import load_average

from .config import METHOD_LABELS, QUALITY, DemoConfig, check_preset
from .pipeline import Clock, clear_stage_runs, demo_threads, environment, run_pipeline, setup


def run_demo(cfg: DemoConfig = DemoConfig(), out: Optional[str] = None, overwrite: bool = False,
             cache: Optional[str] = None, verbose: bool = True) -> dict:
    """Run the demo and return its report (also written to ``out``; see the fastcm.demo docstring)."""
    import torch

    from fastcm.eval.report import prepare_out_dir

    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"cfg must be a DemoConfig, got {type(cfg).__name__}")
    check_preset(cfg.preset)  # before any directory or training: the demo's later stages need labels
    out = prepare_out_dir(out, overwrite, prefix="demo")
    if overwrite:
        clear_stage_runs(out, cfg.method)
    with demo_threads(cfg.threads) as (threads, why):
        # The U-Net's initial weights come from torch's global RNG: seed it (demo_threads gives it back), so a run
        # is a function of cfg.seed (found: unseeded runs differed in one-step CAS by 2 points, feature FD by 5x).
        torch.manual_seed(cfg.seed)
        return _run(cfg, out, cache, verbose, threads, why)


def _run(cfg: DemoConfig, out: Path, cache, verbose: bool, threads: int, why: str) -> dict:
    from fastcm.eval.demo_report import FD_STAGE_SPACES, format_summary, quality_checks, render_markdown
    from fastcm.eval.report import plot_training_curves, write_json, write_text
    from fastcm.fid.digits_net import accuracy

    load_start = load_average()
    clock = Clock(verbose)
    if verbose:
        print(f"fastcm demo ({METHOD_LABELS[cfg.method]}, {cfg.stage1_steps} steps) → {out} ({threads} CPU "
              f"thread{'s' if threads > 1 else ''}: {why})", flush=True)
    data = setup(cfg, cache, clock)
    ev, thread_events = data.evaluator, []
    run = run_pipeline(cfg, out, data.train, ev, clock, thread_events, verbose)
    results, files, samples = {"real_train_split": data.real, **run["results"]}, run["files"], run["samples"]
    protocol = _cas(clock, cfg, ev, samples) if cfg.cas_seeds else None
    clock.phase("training-curve plot", plot_training_curves, out / "training_curves.png", run["stage1_records"],
                run["fd_records"])
    report = {
        "config": dataclasses.asdict(cfg), "method": cfg.method, "stage1_steps": cfg.stage1_steps, "seed": cfg.seed,
        "out": str(out), "environment": dict(environment(), torch_threads=threads),
        "data": {"dataset": "scikit-learn digits (8x8, 10 classes) scaled to [-1, 1]",
                 "split": "train_test_split(test_size=0.25, stratify=labels, random_state=0)",
                 "train_size": len(data.train), "test_size": len(data.test)},
        "feature_network": dict(data.net_info, test_accuracy=accuracy(data.net, ev.x_test, ev.y_test)),
        "heldout_network": dict(ev.heldout_info, test_accuracy=accuracy(ev.heldout.net, ev.x_test, ev.y_test)),
        "fd_stage": FD_STAGE_SPACES if cfg.fd_steps else None,
        "metrics": results, "cas_protocol": protocol, "files": dict(files, plot="training_curves.png"),
        "checkpoints": run["checkpoints"],
        "curves": {cfg.method: run["stage1_records"], "fd": run["fd_records"]},
        "best": run["best"], "stage_seconds": run["stage_seconds"],
        "evaluation": None if ev.eval_stats is None else {"features": "digits", "stats": ev.eval_stats.name,
                                                          "samples": len(data.test)},
    }
    report["quality"] = quality_checks(report, QUALITY)
    report["timings_s"] = dict(clock.times, total=clock.total())
    # Other processes on the machine change the timings a lot (see choose_threads): record the load.
    report["environment"].update(load_average_start=load_start, load_average_end=load_average(), threads_reason=why,
                                 thread_events=thread_events)
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
    if verbose:
        print(format_summary(report), flush=True)
    return report


def _cas(clock: Clock, cfg: DemoConfig, ev, samples: dict) -> dict:
    """The CAS protocol on the last stage's samples (FD-finetuned when there is a second stage)."""
    from fastcm.eval.cas import cas_protocol

    which = "fd_finetuned" if "fd_finetuned" in samples else "one_step"
    protocol = clock.phase("CAS protocol (real / synthetic / both)", cas_protocol, ev.x_train, ev.y_train,
                           *samples[which], ev.x_test, ev.y_test, judge=cfg.cas_judge,
                           seeds=range(cfg.cas_seeds), num_classes=10, cnn_epochs=cfg.cas_epochs)
    protocol["samples"] = which
    return protocol
