"""The demo's public pipeline, shared by ``fastcm demo`` (fastcm.demo.run) and ``--compare`` (fastcm.demo.compare):

    with demo_threads(cfg.threads) as (threads, why):    # torch threads and a forked RNG for the run
        data = setup(cfg, cache, clock)                  # digits, feature networks, evaluator, real-data metrics
        clear_stage_runs(out, cfg.method)                # (with --overwrite) an earlier run's training stages
        run = run_pipeline(cfg, out, data.train, data.evaluator, clock, thread_events, verbose)

:func:`run_pipeline` is stage 1 with ``cfg.method`` (cfg.stage1_steps steps, or until cfg.stage1_seconds are spent),
its one- and two-step samples and their metrics, then the FD-loss stage (150 steps of batch 250 at Adam 5e-5,
which measured here lowers the held-out feature FD further than 300 steps at 2e-5, in half the time) and its metrics.
"""
import contextlib
import copy
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

from fastcm.eval.demo_eval import DemoEvaluator
from fastcm.train.threads import ThreadGuard, choose_threads

from .config import METHOD_LABELS, DemoConfig


class Clock:
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


@contextlib.contextmanager
def demo_threads(requested):
    """Run a block with choose_threads(requested) torch threads (yields (threads, why)) and torch's global RNG
    forked, so that seeding the U-Net's initial weights inside leaves the caller's RNG state as it was."""
    import torch

    threads, why = choose_threads(requested)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield threads, why
    finally:
        torch.set_num_threads(previous)


def environment() -> dict:
    """Versions, machine and torch threads of this process, for the reports."""
    import torch

    import fastcm

    return {"fastcm": fastcm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": "cpu"}


class DemoSetup(NamedTuple):
    """What every method's run shares: the digits splits, the feature network, the evaluator, real-data metrics."""
    train: object
    test: object
    net: object
    net_info: dict
    evaluator: DemoEvaluator
    real: dict


def setup(cfg: DemoConfig, cache, clock: Clock) -> DemoSetup:
    """Load digits, the (cached) feature and held-out judge networks, the evaluator and the real-data baseline."""
    from fastcm.data import load_digits
    from fastcm.fid import digits_feature_network

    train, test = load_digits("train"), load_digits("test")
    net, net_info = clock.phase("feature network (cached)", digits_feature_network, cache)
    held, held_info = clock.phase("held-out judge network (cached)", digits_feature_network, cache, heldout=True)
    ev = clock.phase("reference statistics", DemoEvaluator, net, train, test, cfg.judge, cfg.seed, heldout=held)
    ev.heldout_info = held_info
    ev.cache = cache  # the trainers' FID-while-training evaluations use the same cached feature network
    real = clock.phase("real-data baseline", ev, ev.x_train, ev.y_train)
    return DemoSetup(train, test, net, net_info, ev, real)


def clear_stage_runs(out: Path, method: str) -> None:
    """With --overwrite: remove what an earlier demo's training stages (``method``'s stage 1 and the FD stage) wrote
    under ``out`` (their checkpoints, sample grids, config and metrics) and nothing else, so they start afresh."""
    import shutil

    for stage in (method, "fd_finetune"):
        for name in ("checkpoints", "samples"):
            if (out / stage / name).is_dir():
                shutil.rmtree(out / stage / name)
        for name in ("config.json", "metrics.jsonl"):
            (out / stage / name).unlink(missing_ok=True)


def run_pipeline(cfg: DemoConfig, out: Path, train, ev: DemoEvaluator, clock: Clock, thread_events: list,
                 verbose: bool) -> dict:
    """Stage 1 with cfg.method, one- and two-step samples and their metrics, the FD stage and its metrics; returns
    results, files, samples, curves, checkpoints (relative to ``out``), best evaluations and stage seconds."""
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


def _draw(model, cfg: DemoConfig, steps: int, seed_offset: int = 1_000_000, chunk: int = 500):
    """``per_class`` ``steps``-step samples of each class with the model's method's sampler, class-major, sample i
    seeded seed_offset + cfg.seed * N + i (fastcm.cm.resolve_seeds): the same noise for every stage, so before/after
    comparisons are paired, and the chunking does not change them (iCT: σ 80, then 0.821; sCT: t_max, then 1.1;
    MeanFlow: t = 1, 0.5, 0)."""
    import torch

    from fastcm.cm import get_method, method_of_model

    y = torch.arange(10).repeat_interleave(cfg.per_class)
    seed = seed_offset + cfg.seed * len(y)
    method = get_method(method_of_model(model))
    x = torch.cat([method.sample(model, len(part), steps, part, seeds=seed + i)
                   for i, part in zip(range(0, len(y), chunk), y.split(chunk))])
    return x, y


def _save_samples(out: Path, name: str, x, y, cfg: DemoConfig) -> dict:
    from fastcm.data import save_grid
    from fastcm.eval.report import save_samples_npz

    k = min(cfg.grid_per_class, cfg.per_class)
    rows = x.reshape(10, cfg.per_class, *x.shape[1:])[:, :k].reshape(10 * k, *x.shape[1:])  # one row per class
    npz = save_samples_npz(out / f"{name}.npz", x, y)
    png = save_grid(rows, out / f"{name}.png", nrow=k, scale=4, overwrite=True)
    return {"npz": npz.name, "png": png.name}


def _rel(path, out: Path):
    if path is None:
        return None
    path = Path(path)
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


def _train_stage1(cfg: DemoConfig, train, out: Path, ev: DemoEvaluator, guard: ThreadGuard):
    """Stage 1 with cfg.method for cfg.stage1_steps (iCT's calibrated settings for every method; sCT's tangent
    warm-up H = 1000, MethodConfig's default) into out/<method>/; stops early when cfg.stage1_seconds is spent (on
    the "cpu" clock: that many seconds per torch thread of this process's CPU time)."""
    import torch

    from fastcm.cm import METHODS, get_method
    from fastcm.models import build_unet
    from fastcm.train import MethodConfig, train_method

    steps = cfg.stage1_steps
    mcfg = MethodConfig(total_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, ema_beta=cfg.ema_beta,
                        seed=cfg.seed, log_every=max(1, min(10, steps // 20)), sample_every=0, num_samples=100,
                        save_every=0, keep_last=1, method=cfg.method, **_eval_fields(cfg.eval_every, ev))
    method = get_method(cfg.method, **mcfg.method_hyperparameters())
    model = method.make_model(build_unet(cfg.preset, **METHODS[cfg.method].unet_overrides))
    seconds = cfg.stage1_seconds
    if seconds is not None and cfg.stage1_clock == "cpu":
        seconds = seconds * torch.get_num_threads()
    return train_method(mcfg, train, model, out_dir=out / cfg.method, callbacks=[guard], progress=cfg.progress,
                        max_seconds=seconds, budget_clock=cfg.stage1_clock)


def _eval_fields(every: int, ev: DemoEvaluator) -> dict:
    """FID while training (fastcm.train.evaluate) against the test split's digits features, every ``every`` steps:
    K = its 450 images, the one- and two-step samplers, fixed seeds."""
    if not every:
        return {}
    return {"eval_every": every, "eval_stats": str(ev.eval_stats), "eval_cache": None if ev.cache is None else
            str(ev.cache)}


def _train_fd(cfg: DemoConfig, model, ev: DemoEvaluator, out: Path, guard: ThreadGuard):
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
