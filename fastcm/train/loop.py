"""The training loop both stages share: optimizer, EMA, autocast, guards, DDP, compile, logging, checkpoints.

A stage supplies ``loss_fn(step) -> (loss, extras)`` (a scalar to minimise and a dict of numbers/0-d tensors to
log) and calls :meth:`Trainer.run`. One step, in order: loss and backward (autocast), gradient norm and clipping,
the guard (a non-finite loss or gradient skips the update), optimizer and EMA updates, the divergence check of the
weights, then logging, sample grids and checkpoints. Every random draw of a step comes from generators re-seeded
from (seed, step, rank), so training k steps equals training j < k steps, saving, resuming and training k - j more.

Stopping early, always with the last checkpoint intact:
- ``max_nonfinite`` (K) non-finite steps in a row raise :class:`NonFiniteError`; K steps in a row whose weight
  RMS exceeds ``max_weight_rms`` raise :class:`DivergenceError` (nothing is saved from a diverged run).
- SIGINT / SIGTERM: the step in flight finishes, a checkpoint is written, and :class:`TrainingInterrupted` is raised
  (its ``exit_code`` is 130 / 143, what a shell reports for those signals). A second signal ends the process at
  once with the signal's default action; checkpoint writes are atomic, so nothing on disk is left half-written.

Around the loop: build.py makes the model, optimizer and autocast dtype; guards.py holds the errors, the signal
handler and the NaN/divergence guard; progress.py the log interval and metrics; checkpoint.py what a checkpoint
holds and whether a run may resume from it; evaluate.py the FID evaluations during training.
"""
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from fastcm._checks import check_bool
from fastcm._io import atomic_write
from fastcm.cm import get_method, method_of_model
from fastcm.data import data_fingerprint, derive_seed, save_grid

from .build import as_consistency_model, autocast_dtype, make_optimizer, sampling_method  # noqa: F401
from .checkpoint import (check_resumable, check_same_data, model_meta, optimizer_from_flat, optimizer_to_flat,
                         restore_rng, rng_tensors, split_state, take)
from .checkpoint_schema import check_optimizer_tensors, check_training_meta
from .checkpoint_file import CheckpointManager, load_checkpoint, set_aside_run
from .config import TrainConfig
from .distributed import all_reduce_sum, any_rank, broadcast_str, init_distributed, wrap_ddp
from .ema import EMA
from .guards import (DivergenceError, NonFiniteError, NonFiniteGuard, StopSignals, TrainingInterrupted,  # noqa: F401
                     all_finite, grad_norm, weight_rms)
from .progress import LogInterval, RunLogger
from .evaluate import BEST_NAME, adopt_best_file, build_evaluator, evaluator_options, write_best


@dataclass
class TrainResult:
    """What a stage returns. ``model`` holds the trained weights, ``ema.module`` the evaluation weights."""

    model: nn.Module                                     # ConsistencyModel | TrigFlowModel | MeanFlowModel
    ema: EMA
    step: int
    records: List[dict] = field(default_factory=list)  # metrics records (rank 0)
    checkpoint: Optional[Path] = None                    # the last checkpoint written (rank 0)
    skipped_steps: int = 0                               # steps thrown away by the NaN/inf guard
    best: Optional[dict] = None                          # the best evaluation {"step", "metric", "value"} (eval_every)
    best_checkpoint: Optional[Path] = None               # checkpoints/best.safetensors once written (rank 0)


class Trainer:
    """Set-up and loop of one stage (see module docstring).

    Build it, register stage state that must survive a resume in ``trainer.extra`` (name -> object with
    ``state_dict()`` / ``load_state_dict()``), call ``start(resume)``, then ``run(loss_fn)``.
    """

    def __init__(self, stage: str, cfg: TrainConfig, model: nn.Module, *, out_dir=None, device=None,
                 callbacks=None, progress: bool = True):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.stage, self.cfg, self.progress, self.callbacks = stage, cfg, progress, callbacks
        self.info = info = init_distributed(device)
        if cfg.batch_size % info.world_size:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {info.world_size} ranks")
        self.local_batch = cfg.batch_size // info.world_size
        self.device = info.device
        # train() and requires_grad_: a frozen copy (e.g. an EMA module or load_model's output) is trained too.
        self.cm = as_consistency_model(model).to(self.device).train().requires_grad_(True)
        self.method = method_of_model(self.cm)  # recorded in checkpoints (meta["method"]); picks the sampler
        self.net = wrap_ddp(self.cm, info)  # broadcasts rank 0's weights, so the EMA below starts identical
        self.ema = EMA(self.cm, cfg.ema_beta)
        if cfg.compile:
            # The model call of the training step (precond + U-Net) and of the one-step sampler, without graph
            # breaks. Module.compile keeps parameter names, so checkpoints and the EMA are unaffected. sCT and
            # MeanFlow: their one-pass step (forward-AD duals) runs eagerly, only the sampler is compiled
            # (fastcm.cm.jvp: compiled code drops custom jvp rules, pytorch#192985, and dual inputs' tangents).
            self.cm.compile(fullgraph=True, backend=cfg.compile_backend)
            self.ema.module.compile(fullgraph=True, backend=cfg.compile_backend)
        self.opt = make_optimizer(cfg, self.cm.parameters())
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.guard = NonFiniteGuard(cfg.max_nonfinite, cfg.max_weight_rms)
        self.extra: Dict[str, object] = {}
        self.curriculum: Optional[Callable[[int], dict]] = None  # step -> JSON description saved in checkpoints
        self.step, self.last_checkpoint, self.started = 0, None, False
        self.data: Optional[dict] = None  # the training set's fingerprint (start(data=...)), saved in checkpoints
        self.allow_data_change = False
        self.max_seconds: Optional[float] = None  # time budget of run(): stop (and save) once it is spent
        self.budget_clock: Callable[[], float] = time.monotonic  # its clock (time.process_time: CPU seconds)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.ckpt = None if self.out_dir is None else CheckpointManager(self.out_dir / "checkpoints", cfg.keep_last)
        # FID while training: built before start() writes anything, so a bad eval_stats file stops here
        self.evaluator = None if not cfg.eval_every else build_evaluator(
            cfg.eval_stats, get_method(self.method), **evaluator_options(cfg), info=info, device=self.device,
            input_shape=self.cm.input_shape)
        self.best_checkpoint: Optional[Path] = None

    # -- set-up ---------------------------------------------------------------------------------------------------

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        """A generator on the training device seeded from (seed, step, rank, stream)."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(derive_seed(self.cfg.seed, step, self.info.rank, stream))

    def start(self, resume=False, restart: bool = False, data=None, allow_data_change: bool = False) -> "Trainer":
        """Prepare out_dir and, with ``resume``, load the checkpoint (True: the newest one in out_dir, or a fresh
        start if there is none; a path: that file). False refuses an out_dir that already holds a run, unless
        ``restart``: then that run's files are moved into ``out_dir/previous-<time>/`` and training starts at 0.
        A damaged newest checkpoint is never skipped, replaced or deleted: resuming from it raises CheckpointError.
        ``data`` (the training set) is fingerprinted into config.json and every checkpoint; a resume on data with
        another fingerprint is refused unless ``allow_data_change``."""
        if self.started:
            raise RuntimeError("start() was already called")
        self.started, self.allow_data_change = True, check_bool("allow_data_change", allow_data_change)
        self.data = None if data is None else data_fingerprint(data)
        if not isinstance(resume, (bool, str, os.PathLike)) and resume is not None:
            raise TypeError(f"resume must be a bool or a checkpoint path, got {type(resume).__name__}")
        if check_bool("restart", restart) and resume not in (False, None):
            raise ValueError(f"restart excludes resume, got restart=True, resume={resume!r}")
        if isinstance(resume, (str, os.PathLike)):
            path = Path(resume)
            found = (path, *load_checkpoint(path))
        elif self.out_dir is not None:
            found = self._find_resume(bool(resume), restart)
        elif resume is True or restart:
            raise ValueError(f"{'resume' if resume else 'restart'}=True needs out_dir"
                             + (" (or pass resume=<checkpoint path>)" if resume else ""))
        else:
            found = None
        if found is not None:
            self._load(*found)
        if self.evaluator is not None and self.ckpt is not None:
            self.best_checkpoint = adopt_best_file(self.evaluator, self.ckpt.directory / BEST_NAME)
        self._write_config()
        return self

    def _write_config(self) -> None:
        """config.json (rank 0): the stage, config, model and, with evaluations, their spec and the best so far."""
        if self.out_dir is None or not self.info.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        doc = {"stage": self.stage, "config": self.cfg.to_dict(), "model": model_meta(self.cm),
               "world_size": self.info.world_size, "data": self.data}
        if self.evaluator is not None:
            doc.update(self.evaluator.config_entries(self.best_checkpoint, self.out_dir))
        text = json.dumps(doc, indent=2) + "\n"
        atomic_write(self.out_dir / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _find_resume(self, resume: bool, restart: bool):
        """Rank 0 decides (it alone writes the run directory) and tells the others: "" fresh start, "\\0" refuse,
        else the checkpoint to resume (on a file system every rank can read)."""
        decision, found = "", None
        if self.info.is_main:
            self.ckpt.remove_stale_temporaries()  # left by a process killed mid-write
            started = self.ckpt.checkpoints() or any((self.out_dir / n).exists()
                                                     for n in ("metrics.jsonl", "config.json"))
            if restart:
                set_aside_run(self.out_dir)
            else:
                found = self.ckpt.load_latest() if resume else None  # CheckpointError when the newest is damaged
                decision = str(found[0]) if found else ("\0" if started and not resume else "")
        decision = broadcast_str(decision, self.info)
        if decision == "\0":
            raise FileExistsError(f"{self.out_dir} already holds a run; pass resume=True (--resume) to continue it, "
                                  "restart=True (--restart) to move it aside and start over, or choose another "
                                  "out_dir (nothing is overwritten)")
        if decision and found is None:
            found = (Path(decision), *load_checkpoint(decision))
        return found

    def _load(self, path: Path, tensors: Dict[str, Tensor], meta: dict) -> None:
        check_training_meta(path, meta)  # types and ranges of every field read below
        check_optimizer_tensors(path, tensors)
        check_resumable(path, meta, self.stage, self.cfg, self.cm)
        check_same_data(path, meta.get("data"), self.data, self.allow_data_change)
        self.cm.load_state_dict(take(tensors, "model/"))
        self.ema.load_state_dict(take(tensors, "ema/"))
        self.opt.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.guard.load_state_dict(meta["guard"])
        for name, obj in self.extra.items():
            obj.load_state_dict({**meta["extra"][name], **take(tensors, f"extra/{name}/")})
        restore_rng(tensors)
        if self.evaluator is not None:
            self.evaluator.load_state_dict(meta.get("eval"), source=str(path))
        self.step = int(meta["step"])
        self.last_checkpoint = path

    def checkpoint_state(self):
        """(tensors, meta) of the current training state, as written to a checkpoint."""
        tensors = {**{f"model/{k}": v for k, v in self.cm.state_dict().items()},
                   **{f"ema/{k}": v for k, v in self.ema.state_dict().items()}, **rng_tensors()}
        opt_tensors, opt_doc = optimizer_to_flat(self.opt.state_dict())
        tensors.update(opt_tensors)
        extra_doc = {}
        for name, obj in self.extra.items():
            t, extra_doc[name] = split_state(obj.state_dict(), f"extra/{name}/")
            tensors.update(t)
        meta = {"stage": self.stage, "method": self.method, "step": self.step, "config": self.cfg.to_dict(),
                "model": model_meta(self.cm), "data": self.data,
                "optimizer": opt_doc, "guard": self.guard.state_dict(), "extra": extra_doc,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "curriculum": self.curriculum(self.step) if self.curriculum is not None else None,
                "rng": {"seed": self.cfg.seed, "per_step": "generators seeded by blake2b(seed, step, rank, stream)",
                        "global": "rng/cpu (rank 0)"},
                "world_size": self.info.world_size,
                "eval": self.evaluator.state_dict() if self.evaluator is not None else None}
        return tensors, meta

    # -- loop -----------------------------------------------------------------------------------------------------

    def run(self, loss_fn: Callable[[int], tuple]) -> TrainResult:
        """Train from ``self.step`` to cfg.total_steps. ``loss_fn(step)`` returns (loss to back-propagate, extras):
        extras are logged (0-d tensors averaged over the log interval and the ranks, numbers as last seen); an
        extras["loss"] replaces the logged loss (e.g. when the back-propagated value is rescaled for DDP)."""
        if not self.started:
            self.start(False)
        cfg = self.cfg
        log = RunLogger(self.out_dir, self.step, cfg.total_steps, self.info.is_main, self.progress,
                        self.callbacks, desc=self.stage)
        interval = LogInterval()
        self._saved_at, self._save_clock = self.step, time.monotonic()
        t_run, self._eval_budget = self.budget_clock(), 0.0
        if self.evaluator is not None and self.step == 0:  # the curve's starting point (fresh runs only)
            self._evaluate(log, interval)
        try:
            with StopSignals() as signals:
                while self.step < cfg.total_steps:
                    stop = self._train_step(loss_fn, interval, signals)  # agreed by all ranks mid-step
                    stop = stop if self.info.distributed else signals.received  # alone: also one that came later
                    self.step += 1
                    log.tick()
                    spent = self._out_of_time(t_run)
                    try:
                        self._after_step(log, interval, stop, spent)
                    except OSError as e:  # a full disk while stopping: the signal's exit status, and why
                        if not stop:
                            raise
                        why = e.strerror or str(e)
                        raise TrainingInterrupted(stop, self.step, self.last_checkpoint, save_error=why if
                                                  e.filename is None else f"{why}: {e.filename}") from e
                    if spent and not stop:
                        break
                    if stop and self.step < cfg.total_steps:
                        raise TrainingInterrupted(stop, self.step, self.last_checkpoint,
                                                  saved_elsewhere=self.ckpt is not None and not self.info.is_main)
        finally:
            log.close()
        result = TrainResult(self.cm, self.ema, self.step, log.records, self.last_checkpoint, self.guard.skipped,
                             self.evaluator.best if self.evaluator is not None else None, self.best_checkpoint)
        log.event("on_end", result)
        return result

    def _out_of_time(self, t_run: float) -> bool:
        """Whether ``max_seconds`` of run() have passed on ``budget_clock`` (agreed by every rank)."""
        if self.max_seconds is None:
            return False
        spent = self.budget_clock() - t_run - self._eval_budget  # evaluations do not count against the budget
        return any_rank([spent >= self.max_seconds], self.info)[0]

    def _after_step(self, log: RunLogger, interval: "LogInterval", stop: int, final: bool = False) -> None:
        """Log, sample and save after a step; an interrupted step logs and saves whatever the schedule says; a
        ``final`` step (the time budget is spent) is treated like the last one."""
        cfg, step = self.cfg, self.step
        done = step == cfg.total_steps or final
        if step % cfg.log_every == 0 or done or stop:
            log.log(self._record(interval))
        if done or (cfg.sample_every and step % cfg.sample_every == 0):
            self._samples(log)
        if self.evaluator is not None and (done or step % cfg.eval_every == 0):
            self._evaluate(log, interval)
        due_by_time = cfg.save_minutes and time.monotonic() - self._save_clock >= 60.0 * cfg.save_minutes
        if done or stop or (cfg.save_every and step % cfg.save_every == 0) or (due_by_time and self.info.is_main):
            self._save(log)

    def _train_step(self, loss_fn, interval: "LogInterval", signals: "StopSignals") -> int:
        """One optimizer step; returns the signal number every rank agrees to stop on after it (0 = go on)."""
        step = self.step
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss, extras = loss_fn(step)
        loss = loss.float()
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        norm = grad_norm(self.cm.parameters(), self.cfg.grad_clip)
        # Every rank must agree (its loss is local; gradients are already averaged by DDP), and stop together.
        bad, *stops = any_rank([not (bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))),
                                signals.received == signal.SIGINT, signals.received == signal.SIGTERM], self.info)
        finite = not bad
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.opt)
            else:
                self.opt.step()
            self.ema.update(self.cm)
        # Weights that ran away stay so on skipped steps too; identical on every rank (DDP keeps replicas equal).
        self.guard.check_weights(weight_rms(self.cm.parameters()), step)
        self.guard.update(finite, step)
        if self.scaler is not None:
            self.scaler.update()
        # Averages over the log interval count finite steps only (a skipped step contributes zeros).
        out = {"loss": loss.detach(), "grad_norm": norm.detach(), **extras}
        interval.add({k: (v if finite else torch.zeros(())) if isinstance(v, Tensor) else v for k, v in out.items()},
                     finite)
        return signal.SIGINT if stops[0] else signal.SIGTERM if stops[1] else 0

    def _record(self, interval: "LogInterval") -> dict:
        rec = {"stage": self.stage, "step": self.step,
               **interval.means(lambda vec: all_reduce_sum(vec.to(self.device), self.info).cpu())}
        now = time.perf_counter()
        rec.update(lr=self.opt.param_groups[0]["lr"],
                   img_per_s=self.cfg.batch_size * interval.count / max(now - interval.t_start, 1e-9),
                   skipped=self.guard.skipped, time=round(now - interval.t_run, 3))
        interval.reset(now)
        return rec

    @torch.no_grad()
    def _samples(self, log: RunLogger) -> None:
        if not self.info.is_main or (self.out_dir is None and not log.callbacks):
            return
        n, classes = self.cfg.num_samples, self.cm.num_classes
        labels = torch.arange(n) % classes if classes else None  # one column per class
        # One call for the whole grid: a fixed shape, so a compiled sampler never recompiles for a remainder.
        images = get_method(self.method).sample(self.ema.module, n, 1, labels, seeds=self.cfg.seed)
        if self.out_dir is not None:
            nrow = classes if classes and n % classes == 0 and classes <= 32 else None
            save_grid(images, self.out_dir / "samples" / f"step_{self.step:08d}.png", nrow=nrow, overwrite=True)
        log.event("on_sample", self.step, images)

    def _evaluate(self, log: RunLogger, interval: "LogInterval") -> None:
        """FID of the EMA model now (every rank takes part); rank 0 logs it and keeps checkpoints/best.safetensors.
        A failed evaluation is one metrics record with ``eval_error`` and one line on stderr; training goes on. Its
        time is left out of the next record's img_per_s and of the ``max_seconds`` budget."""
        start = self.budget_clock()
        record = {"stage": self.stage, **self.evaluator.evaluate(self.ema.module, self.step)}
        self._eval_budget += self.budget_clock() - start
        interval.t_start += record["eval_seconds"]
        log.log(record)
        if "eval_error" in record:
            log.warn(f"evaluation at step {self.step} failed, training goes on: {record['eval_error']}")
        elif self.evaluator.update_best(record) and self.ckpt is not None and self.info.is_main:
            self.best_checkpoint = write_best(self.ckpt.directory, *self.checkpoint_state(), self.evaluator.best)
            self._write_config()

    def _save(self, log: RunLogger) -> None:
        if self.ckpt is None or self._saved_at == self.step:
            return
        # Identical on every rank (DDP keeps replicas equal), so all ranks stop together if this fails.
        if not all_finite(list(self.cm.parameters()) + list(self.ema.module.parameters())):
            raise NonFiniteError(f"weights are not finite at step {self.step}; refusing to save a checkpoint")
        if self.guard.diverged:  # fewer than K steps so far, but a diverged run is never saved
            raise DivergenceError(f"training diverged: the weight RMS is above max_weight_rms="
                                  f"{self.cfg.max_weight_rms:g} at step {self.step}; refusing to save a checkpoint. "
                                  "Lower the learning rate (or enable grad_clip)")
        self._saved_at, self._save_clock = self.step, time.monotonic()
        if self.info.is_main:
            tensors, meta = self.checkpoint_state()
            try:
                self.last_checkpoint = self.ckpt.save(self.step, tensors, meta)
            except OSError as e:  # ENOSPC, EACCES, EROFS … (fastcm._io.write_error): the older files are intact
                last = "no earlier checkpoint" if self.last_checkpoint is None else f"{self.last_checkpoint} is intact"
                what = f"the checkpoint of step {self.step} was not written; {last}"
                if e.errno is None:  # a message without an errno: OSError(None, ...) would print "[Errno None]"
                    raise OSError(f"{e} ({what})") from e
                raise OSError(e.errno, f"{e.strerror} ({what})", e.filename) from e
            log.event("on_checkpoint", self.step, self.last_checkpoint)
