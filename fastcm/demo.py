"""The embedded digits demo (``make demo`` → ``fastcm demo``): the whole mission on a plain CPU in about 10 minutes.

1. iCT (Song & Dhariwal 2023) trains a class-conditional consistency model (``digits`` preset) on scikit-learn's
   digits (train split, 1,347 images);
2. one-step and two-step samples (σ = 80, then 0.821), ``per_class`` per class → .npz + PNG grids;
3. evaluation against the real *test* split: Fréchet distance in the 64-d feature space of a small digits CNN
   (trained once on the train split, cached) and in raw pixel space (a space no network defines), and the
   Classification Accuracy Score (a judge trained only on the samples) beside the same judge on the real train split;
4. a second stage fine-tunes with the FD loss (one-step samples → CNN features → FD to the train-split statistics)
   and the same evaluation runs again; the CAS protocol (real / synthetic / real + synthetic) runs on its samples;
5. report.json, report.md and training_curves.png go to ``out``; both stages evaluate FID while training
   (``eval_every``: digits features of the EMA model's one- and two-step samples against the test split, whose
   statistics are written to ``out/eval-reference-digits-test.npz``) and keep their best checkpoint.
``method`` ("ict" by default, "sct" or "meanflow") picks stage 1's method: sampling, evaluation and the FD stage then
use that method's one- and two-step samplers and one-step generator. :func:`run_compare` (``fastcm demo --compare``)
runs stage 1 .. 4 for all three methods at an equal wall-clock budget of stage 1 and writes one table.
The defaults follow measurements on this project's 2-core CPU for iCT (4,000 steps, batch 64,
RAdam 2e-4, no EMA); the FD stage runs 150 steps of batch 250 at Adam 5e-5, which measured here lowers the
held-out feature FD further than 300 steps at 2e-5, in half the time.
"""
import copy
import dataclasses
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastcm._checks import check_int
from fastcm.eval.demo_eval import DemoEvaluator as _Evaluator
from fastcm.train.threads import ThreadGuard, choose_threads, load_average

QUALITY = {"min_one_step_cas": 0.92, "min_fd_reduction": 0.20, "max_cas_drop": 0.01}
METHOD_LABELS = {"ict": "iCT", "sct": "sCT", "meanflow": "MeanFlow"}


@dataclass(frozen=True)
class DemoConfig:
    preset: str = "digits"        # U-Net preset (fastcm.models.PRESETS)
    seed: int = 0                 # training, sampling and judges
    ict_steps: int = 4000         # iCT steps (calibration: 4,000 at batch 64 ≈ 6.5 min)
    batch_size: int = 64
    lr: float = 2e-4              # RAdam
    ema_beta: float = 0.0         # evaluation EMA; 0 evaluates the trained weights (iCT's 0.99993 needs ~100k steps)
    fd_steps: int = 150           # FD-loss fine-tune steps; 0 skips stage 2 (the held-out FD flattens after ~150)
    fd_batch_size: int = 250      # 25 per class
    fd_lr: float = 5e-5           # Adam; 150 steps from one iCT model: 2e-5 → FD -22 %, 5e-5 → -29 %, 1e-4 → -17 %
    per_class: int = 200          # evaluation samples per class (and the .npz files)
    grid_per_class: int = 16      # samples per class in the PNG grids (one row per class)
    judge: str = "logreg"         # CAS judge of the stage metrics: "logreg" (pixels) or "cnn"
    cas_seeds: int = 3            # seeds of the real / synthetic / real+synthetic protocol; 0 skips it
    cas_judge: str = "cnn"        # judge of that protocol (a classifier trained from scratch, as in the paper)
    cas_epochs: int = 10          # its training epochs
    threads: Optional[int] = None  # torch CPU threads (None: auto, see choose_threads)
    progress: bool = True         # tqdm bars
    method: str = "ict"           # stage 1's method: "ict", "sct" or "meanflow" (fastcm.cm.METHODS)
    stage1_seconds: Optional[float] = None  # time budget of stage 1 (stops early); None = all ict_steps
    stage1_clock: str = "wall"    # its clock: "wall", or "cpu" = this process's CPU seconds / torch threads
    eval_every: int = 500         # FID while training of stage 1 (digits features, test split, 1/2-step); 0 = off
    fd_eval_every: Optional[int] = None  # the same for the FD stage; None = its log interval, 0 = off

    def __post_init__(self):
        for name in ("ict_steps", "batch_size", "fd_batch_size", "per_class", "grid_per_class", "cas_epochs"):
            check_int(name, getattr(self, name), 1)
        for name in ("fd_steps", "cas_seeds", "seed", "eval_every"):
            check_int(name, getattr(self, name), 0)
        for name in ("lr", "fd_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name, choices in (("judge", ("logreg", "cnn")), ("cas_judge", ("logreg", "cnn"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.method not in METHOD_LABELS:
            raise ValueError(f"method must be one of {tuple(METHOD_LABELS)}, got {self.method!r}")
        if self.stage1_seconds is not None and not (isinstance(self.stage1_seconds, (int, float))
                                                    and not isinstance(self.stage1_seconds, bool)
                                                    and 0 < self.stage1_seconds < float("inf")):
            raise ValueError(f"stage1_seconds must be None or a positive number, got {self.stage1_seconds!r}")
        if self.stage1_clock not in ("wall", "cpu"):
            raise ValueError(f"stage1_clock must be 'wall' or 'cpu', got {self.stage1_clock!r}")
        if self.fd_eval_every is not None:
            check_int("fd_eval_every", self.fd_eval_every, 0)
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if self.fd_steps and self.fd_batch_size % 10:
            raise ValueError(f"fd_batch_size must be a multiple of the 10 classes, got {self.fd_batch_size}")


class _Clock:
    """Wall-clock seconds of each named phase, printed as the demo goes."""

    def __init__(self, verbose: bool = True):
        self.t0, self.times, self.verbose = time.perf_counter(), {}, verbose

    def phase(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - start, 2)
        if self.verbose:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {name}: {self.times[name]:.1f}s", flush=True)
        return out

    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


def _labels(per_class: int, num_classes: int = 10):
    import torch

    return torch.arange(num_classes).repeat_interleave(per_class)


def _sample(model, y, steps: int, seed: int, chunk: int = 500):
    """The model's method's ``steps``-step samples of labels y; sample i uses seed + i (fastcm.cm.resolve_seeds), so
    the chunking does not change them (iCT: σ 80, then 0.821; sCT: t_max, then 1.1; MeanFlow: t = 1, 0.5, 0)."""
    import torch

    from fastcm.cm import get_method, method_of_model

    method = get_method(method_of_model(model))
    return torch.cat([method.sample(model, len(part), steps, part, seeds=seed + i)
                      for i, part in zip(range(0, len(y), chunk), y.split(chunk))])


def _draw(model, cfg: DemoConfig, steps: int, seed_offset: int = 1_000_000):
    """``per_class`` samples of each class, class-major, with fixed per-sample seeds (the same noise for every stage,
    so before/after comparisons are paired)."""
    y = _labels(cfg.per_class)
    return _sample(model, y, steps, seed_offset + cfg.seed * len(y)), y


def _save_samples(out: Path, name: str, x, y, cfg: DemoConfig) -> dict:
    from fastcm.data import save_grid
    from fastcm.eval.report import save_samples_npz

    k = min(cfg.grid_per_class, cfg.per_class)
    rows = x.reshape(10, cfg.per_class, *x.shape[1:])[:, :k].reshape(10 * k, *x.shape[1:])  # one row per class
    npz = save_samples_npz(out / f"{name}.npz", x, y)
    png = save_grid(rows, out / f"{name}.png", nrow=k, scale=4, overwrite=True)
    return {"npz": npz.name, "png": png.name}


def _environment(cfg: DemoConfig) -> dict:
    import torch

    import fastcm

    return {"fastcm": fastcm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": "cpu"}


def run_demo(cfg: DemoConfig = DemoConfig(), out: Optional[str] = None, overwrite: bool = False,
             cache: Optional[str] = None, verbose: bool = True) -> dict:
    """Run the demo and return its report (also written to ``out``; see the module docstring)."""
    import torch

    from fastcm.eval.report import prepare_out_dir

    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"cfg must be a DemoConfig, got {type(cfg).__name__}")
    _check_preset(cfg.preset)  # before any directory or training: the demo's later stages need labels
    out = prepare_out_dir(out, overwrite, prefix="demo")
    if overwrite:
        for stage in (cfg.method, "fd_finetune"):
            _clear_stage_run(out / stage)
    threads, why = choose_threads(cfg.threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # The U-Net's initial weights come from torch's global RNG: seed it (and give it back afterwards), so a run
        # is a function of cfg.seed (found: unseeded runs differed in one-step CAS by 2 points, feature FD by 5x).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return _run(cfg, out, cache, verbose, threads, why)
    finally:
        torch.set_num_threads(previous)


def _check_preset(name: str) -> None:
    """The demo trains on digits and evaluates per class (CAS, class-balanced samples): it needs a 10-class
    conditional preset of 1x8x8 images."""
    from fastcm.models import PRESETS

    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    c = PRESETS[name]
    if (c.in_channels, c.img_resolution, c.num_classes) != (1, 8, 10):
        kind = f"{c.num_classes}-class conditional" if c.num_classes else "unconditional"
        raise ValueError(f"--preset {name} makes {kind} {c.in_channels}x{c.img_resolution}x{c.img_resolution} "
                         "images, but the demo trains on digits and scores samples per class: it needs a "
                         "10-class 1x8x8 preset such as 'digits'")


def _setup(cfg: DemoConfig, cache, clock: "_Clock"):
    """(train, test, feature net, its info, evaluator, real-data metrics): what every method's run shares."""
    from fastcm.data import load_digits
    from fastcm.fid import digits_feature_network

    train, test = load_digits("train"), load_digits("test")
    net, net_info = clock.phase("feature network (cached)", digits_feature_network, cache)
    held, held_info = clock.phase("held-out judge network (cached)", digits_feature_network, cache, heldout=True)
    ev = clock.phase("reference statistics", _Evaluator, net, train, test, cfg.judge, cfg.seed, heldout=held)
    ev.heldout_info = held_info
    ev.cache = cache  # the trainers' FID-while-training evaluations use the same cached feature network
    real = clock.phase("real-data baseline", ev, ev.x_train, ev.y_train)
    return train, test, net, net_info, ev, real


def _pipeline(cfg: DemoConfig, out: Path, train, ev, clock: "_Clock", thread_events: list, verbose: bool) -> dict:
    """Stage 1 with cfg.method, one- and two-step samples and their metrics, the FD stage and its metrics."""
    label = METHOD_LABELS[cfg.method]
    ev.eval_stats = ev.save_test_stats(out) if cfg.eval_every or cfg.fd_eval_every != 0 else None
    cpu0 = time.process_time()
    s1 = clock.phase(f"stage 1: {label} training", _train_stage1, cfg, train, out, ev,
                     ThreadGuard(label, thread_events, verbose))
    model, s1_records, s1_ckpt = s1.ema.module.eval(), s1.records, s1.checkpoint
    s1_cpu = round(time.process_time() - cpu0, 2)
    results, files, samples = {}, {}, {}
    for name, steps in (("one_step", 1), ("two_step", 2)):
        x, y = clock.phase(f"sampling {name.replace('_', '-')}", _draw, model, cfg, steps)
        files[f"samples_{name}"] = _save_samples(out, f"samples_{name}", x, y, cfg)
        results[name] = clock.phase(f"evaluation {name.replace('_', '-')}", ev, x, y)
        samples[name] = (x, y)
    fd_records, fd_ckpt, fd = [], None, None
    if cfg.fd_steps:
        fd = clock.phase("stage 2: FD-loss fine-tune", _train_fd, cfg, model, ev, out,
                         ThreadGuard("FD fine-tune", thread_events, verbose))
        model, fd_records, fd_ckpt = fd.ema.module.eval(), fd.records, fd.checkpoint
        x, y = clock.phase("sampling fd-finetuned", _draw, model, cfg, 1)
        files["samples_fd_finetuned"] = _save_samples(out, "samples_fd_finetuned", x, y, cfg)
        results["fd_finetuned"] = clock.phase("evaluation fd-finetuned", ev, x, y)
        samples["fd_finetuned"] = (x, y)
    stages = {cfg.method: s1, "fd": fd}
    return {"results": results, "files": files, "samples": samples, "stage1_records": s1_records,
            "stage1_cpu_s": s1_cpu, "fd_records": fd_records,
            "checkpoints": {cfg.method: _rel(s1_ckpt, out), "fd_finetuned": _rel(fd_ckpt, out),
                            **{f"best_{k}": _rel(r.best_checkpoint, out) for k, r in stages.items()
                               if r is not None and r.best_checkpoint is not None}},
            "best": {k: r.best for k, r in stages.items() if r is not None and r.best is not None},
            "stage_seconds": {cfg.method: clock.times[f"stage 1: {label} training"],
                              "fd": clock.times.get("stage 2: FD-loss fine-tune")}}


def _run(cfg: DemoConfig, out: Path, cache, verbose: bool, threads: int, why: str) -> dict:
    from fastcm.eval.demo_report import FD_STAGE_SPACES, format_summary, quality_checks, render_markdown
    from fastcm.fid.digits_net import accuracy
    from fastcm.eval.report import plot_training_curves, write_json, write_text

    load_start = load_average()
    clock = _Clock(verbose)
    if verbose:
        print(f"fastcm demo ({METHOD_LABELS[cfg.method]}) → {out} ({threads} CPU thread{'s' if threads > 1 else ''}: "
              f"{why})", flush=True)
    train, test, net, net_info, ev, real = _setup(cfg, cache, clock)
    thread_events = []
    run = _pipeline(cfg, out, train, ev, clock, thread_events, verbose)
    results, files, samples = {"real_train_split": real, **run["results"]}, run["files"], run["samples"]
    protocol = _cas(clock, cfg, ev, samples) if cfg.cas_seeds else None
    clock.phase("training-curve plot", plot_training_curves, out / "training_curves.png", run["stage1_records"],
                run["fd_records"])
    report = {
        "config": dataclasses.asdict(cfg), "method": cfg.method, "seed": cfg.seed, "out": str(out),
        "environment": dict(_environment(cfg), torch_threads=threads),
        "data": {"dataset": "scikit-learn digits (8x8, 10 classes) scaled to [-1, 1]",
                 "split": "train_test_split(test_size=0.25, stratify=labels, random_state=0)",
                 "train_size": len(train), "test_size": len(test)},
        "feature_network": dict(net_info, test_accuracy=accuracy(net, ev.x_test, ev.y_test)),
        "heldout_network": dict(ev.heldout_info, test_accuracy=accuracy(ev.heldout.net, ev.x_test, ev.y_test)),
        "fd_stage": FD_STAGE_SPACES if cfg.fd_steps else None,
        "metrics": results, "cas_protocol": protocol, "files": dict(files, plot="training_curves.png"),
        "checkpoints": run["checkpoints"],
        "curves": {cfg.method: run["stage1_records"], "fd": run["fd_records"]},
        "best": run["best"], "stage_seconds": run["stage_seconds"],
        "evaluation": None if ev.eval_stats is None else {"features": "digits", "stats": ev.eval_stats.name,
                                                          "samples": len(test)},
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


def _cas(clock, cfg: DemoConfig, ev, samples: dict) -> dict:
    """The CAS protocol on the last stage's samples (FD-finetuned when there is a second stage)."""
    from fastcm.eval.cas import cas_protocol

    which = "fd_finetuned" if "fd_finetuned" in samples else "one_step"
    protocol = clock.phase("CAS protocol (real / synthetic / both)", cas_protocol, ev.x_train, ev.y_train,
                           *samples[which], ev.x_test, ev.y_test, judge=cfg.cas_judge,
                           seeds=range(cfg.cas_seeds), num_classes=10, cnn_epochs=cfg.cas_epochs)
    protocol["samples"] = which
    return protocol


def _clear_stage_run(path: Path) -> None:
    """With --overwrite: remove what an earlier demo's training stage wrote in ``path`` (its checkpoints, sample
    grids, config and metrics) and nothing else, so the stage can start afresh."""
    import shutil

    for name in ("checkpoints", "samples"):
        if (path / name).is_dir():
            shutil.rmtree(path / name)
    for name in ("config.json", "metrics.jsonl"):
        (path / name).unlink(missing_ok=True)


def _rel(path, out: Path):
    if path is None:
        return None
    path = Path(path)
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


def _train_stage1(cfg: DemoConfig, train, out: Path, ev: "_Evaluator", guard: ThreadGuard):
    """Stage 1 with cfg.method (iCT's calibrated settings for every method; sCT's tangent warm-up H = 1000,
    ICTConfig's default) into out/<method>/; stops early when cfg.stage1_seconds is spent (on the "cpu" clock:
    that many seconds per torch thread of this process's CPU time)."""
    import torch

    from fastcm.cm import METHODS, get_method
    from fastcm.models import build_unet
    from fastcm.train import ICTConfig, train_method

    icfg = ICTConfig(total_steps=cfg.ict_steps, batch_size=cfg.batch_size, lr=cfg.lr, ema_beta=cfg.ema_beta,
                     seed=cfg.seed, log_every=max(1, min(10, cfg.ict_steps // 20)), sample_every=0,
                     num_samples=100, save_every=0, keep_last=1, method=cfg.method,
                     **_eval_fields(cfg.eval_every, ev))
    method = get_method(cfg.method, **icfg.method_hyperparameters())
    model = method.make_model(build_unet(cfg.preset, **METHODS[cfg.method].unet_overrides))
    seconds = cfg.stage1_seconds
    if seconds is not None and cfg.stage1_clock == "cpu":
        seconds = seconds * torch.get_num_threads()
    return train_method(icfg, train, model, out_dir=out / cfg.method, callbacks=[guard], progress=cfg.progress,
                        max_seconds=seconds, budget_clock=cfg.stage1_clock)


def _eval_fields(every: int, ev: "_Evaluator") -> dict:
    """FID while training (fastcm.train.evaluate) against the test split's digits features, every ``every`` steps:
    K = its 450 images, the one- and two-step samplers, fixed seeds."""
    if not every:
        return {}
    return {"eval_every": every, "eval_stats": str(ev.eval_stats), "eval_cache": None if ev.cache is None else
            str(ev.cache)}


def _train_fd(cfg: DemoConfig, model, ev: "_Evaluator", out: Path, guard: ThreadGuard):
    """Stage 2 as calibrated: exact FD of each batch's features to the train-split statistics (batch mode, B = 250
    > d = 64 so the batch covariance has full rank), normalised by its detached value + 0.01, Adam.

    Batch mode rather than the queue, by measurement: the queue now takes the singular digits reference (5 dead
    units), but from one 1,500-step iCT model (held-out feature FD 172.4) 150 steps gave 14.6 in batch mode against
    31.8 with a 1,250-feature queue and 95.9 with a 5,000-feature queue (CAS 0.940 / 0.949 / 0.913): the queue's
    stale features from earlier generator states make the held-out FD oscillate (measured on this project's CPU)."""
    from fastcm.train import FDConfig, finetune_fd

    log_every = max(1, min(10, cfg.fd_steps // 10))
    # The curve worth plotting is the FID to the *test* split (eval_every), not the loss: the normalised FD of the
    # training batch against the *train* split is ≈ 1 by construction.
    every = log_every if cfg.fd_eval_every is None else cfg.fd_eval_every
    fcfg = FDConfig(total_steps=cfg.fd_steps, batch_size=cfg.fd_batch_size, lr=cfg.fd_lr, ema_beta=cfg.ema_beta,
                    seed=cfg.seed, fd_mode="batch", fd_normalize=True, balanced_labels=True, log_every=log_every,
                    sample_every=0, num_samples=100, save_every=0, keep_last=1, **_eval_fields(every, ev))
    model = copy.deepcopy(model).requires_grad_(True)  # stage 1's EMA copy is frozen; stage 1's model stays intact
    return finetune_fd(fcfg, model, ev.features, ev.train_feat, out_dir=out / "fd_finetune", callbacks=[guard],
                       progress=cfg.progress)
