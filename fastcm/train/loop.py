"""The training loop both stages share: optimizer, EMA, autocast, NaN guard, DDP, compile, logging, checkpoints.

A stage supplies ``loss_fn(step) -> (loss, extras)`` (a scalar to minimise and a dict of numbers/0-d tensors to
log) and calls :meth:`Trainer.run`. Every random draw of a step comes from generators re-seeded from
(seed, step, rank), so training k steps equals training j < k steps, saving, resuming and training k - j more.
"""
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from fastcm.cm import EMA, ConsistencyModel, sample
from fastcm.data import derive_seed, save_grid

from .checkpoint import CheckpointManager, load_checkpoint, optimizer_from_flat, optimizer_to_flat
from .config import TrainConfig
from .distributed import all_reduce_sum, all_true, broadcast_str, init_distributed, wrap_ddp
from .guard import NonFiniteError, NonFiniteGuard, all_finite, grad_norm
from .progress import RunLogger
from .state import check_resumable, model_meta, restore_rng, rng_tensors, split_state, take


@dataclass
class TrainResult:
    """What a stage returns. ``model`` holds the trained weights, ``ema.module`` the evaluation weights."""

    model: ConsistencyModel
    ema: EMA
    step: int
    records: List[dict] = field(default_factory=list)  # metrics records (rank 0)
    checkpoint: Optional[Path] = None                    # the last checkpoint written (rank 0)
    skipped_steps: int = 0                               # steps thrown away by the NaN/inf guard


def as_consistency_model(model: nn.Module) -> ConsistencyModel:
    """A ConsistencyModel as given, or one with the default sigmas around a bare U-Net."""
    if isinstance(model, ConsistencyModel):
        return model
    if isinstance(model, nn.Module) and hasattr(model, "input_shape"):
        return ConsistencyModel(model)
    raise TypeError(f"model must be a fastcm ConsistencyModel or U-Net, got {type(model).__name__}")


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
        self.net = wrap_ddp(self.cm, info)  # broadcasts rank 0's weights, so the EMA below starts identical
        self.ema = EMA(self.cm, cfg.ema_beta)
        if cfg.compile:
            # The model call of the training step (precond + U-Net) and of the one-step sampler, without graph
            # breaks. Module.compile keeps parameter names, so checkpoints and the EMA are unaffected.
            self.cm.compile(fullgraph=True, backend=cfg.compile_backend)
            self.ema.module.compile(fullgraph=True, backend=cfg.compile_backend)
        self.opt = _make_optimizer(cfg, self.cm.parameters())
        self.amp_dtype = _autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.guard = NonFiniteGuard(cfg.max_nonfinite)
        self.extra: Dict[str, object] = {}
        self.curriculum: Optional[Callable[[int], dict]] = None  # step -> JSON description saved in checkpoints
        self.step, self.last_checkpoint, self.started = 0, None, False
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.ckpt = None if self.out_dir is None else CheckpointManager(self.out_dir / "checkpoints", cfg.keep_last)

    # -- set-up ---------------------------------------------------------------------------------------------------

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        """A generator on the training device seeded from (seed, step, rank, stream)."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(derive_seed(self.cfg.seed, step, self.info.rank, stream))

    def start(self, resume=False) -> "Trainer":
        """Prepare out_dir and, with ``resume``, load the checkpoint (True: newest intact one in out_dir, or a
        fresh start if there is none; a path: that file). False refuses an out_dir that already holds a run."""
        if self.started:
            raise RuntimeError("start() was already called")
        self.started = True
        found = None
        if resume not in (False, None) and not isinstance(resume, (bool, str, os.PathLike)):
            raise TypeError(f"resume must be a bool or a checkpoint path, got {type(resume).__name__}")
        if isinstance(resume, (str, os.PathLike)):
            path = Path(resume)
            found = (path, *load_checkpoint(path))
        elif self.out_dir is not None:
            # Rank 0 decides (it alone writes the run directory) and tells the others: "" fresh start,
            # "\0" refuse, else the checkpoint to resume (on a file system every rank can read).
            decision = ""
            if self.info.is_main:
                started = self.ckpt.checkpoints() or any((self.out_dir / n).exists()
                                                         for n in ("metrics.jsonl", "config.json"))
                found = self.ckpt.load_latest() if resume else None  # newest intact checkpoint, verified
                decision = str(found[0]) if found else ("\0" if started and not resume else "")
            decision = broadcast_str(decision, self.info)
            if decision == "\0":
                raise FileExistsError(f"{self.out_dir} already holds a run; pass resume=True to continue it or "
                                      "choose another out_dir (nothing is overwritten)")
            if decision and found is None:
                found = (Path(decision), *load_checkpoint(decision))
        elif resume is True:
            raise ValueError("resume=True needs out_dir (or pass resume=<checkpoint path>)")
        if found is not None:
            self._load(*found)
        if self.out_dir is not None and self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            doc = {"stage": self.stage, "config": self.cfg.to_dict(), "model": model_meta(self.cm),
                   "world_size": self.info.world_size}
            tmp = self.out_dir / f".config.json.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, self.out_dir / "config.json")
        return self

    def _load(self, path: Path, tensors: Dict[str, Tensor], meta: dict) -> None:
        check_resumable(path, meta, self.stage, self.cfg, self.cm)
        self.cm.load_state_dict(take(tensors, "model/"))
        self.ema.load_state_dict(take(tensors, "ema/"))
        self.opt.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.guard.load_state_dict(meta["guard"])
        for name, obj in self.extra.items():
            obj.load_state_dict({**meta["extra"][name], **take(tensors, f"extra/{name}/")})
        restore_rng(tensors)
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
        meta = {"stage": self.stage, "step": self.step, "config": self.cfg.to_dict(), "model": model_meta(self.cm),
                "optimizer": opt_doc, "guard": self.guard.state_dict(), "extra": extra_doc,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "curriculum": self.curriculum(self.step) if self.curriculum is not None else None,
                "rng": {"seed": self.cfg.seed, "per_step": "generators seeded by blake2b(seed, step, rank, stream)",
                        "global": "rng/cpu (rank 0)"},
                "world_size": self.info.world_size}
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
        sums: Dict[str, Tensor] = {}
        last: Dict[str, float] = {}
        count, t_log, t0 = 0, time.perf_counter(), time.perf_counter()
        try:
            while self.step < cfg.total_steps:
                extras = self._train_step(loss_fn)
                for k, v in extras.items():  # tensors are averaged over the interval, numbers keep the last value
                    if isinstance(v, Tensor):
                        sums[k] = sums.get(k, 0.0) + v.detach().double()
                    else:
                        last[k] = v
                count += 1
                self.step += 1
                log.tick()
                done = self.step == cfg.total_steps
                if self.step % cfg.log_every == 0 or done:
                    now = time.perf_counter()
                    log.log(self._record(sums, last, count, now - t_log, now - t0))
                    sums, count, t_log = {}, 0, now
                if done or (cfg.sample_every and self.step % cfg.sample_every == 0):
                    self._samples(log)
                if done or (cfg.save_every and self.step % cfg.save_every == 0):
                    self._save(log)
        finally:
            log.close()
        result = TrainResult(self.cm, self.ema, self.step, log.records, self.last_checkpoint, self.guard.skipped)
        log.event("on_end", result)
        return result

    def _train_step(self, loss_fn) -> dict:
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
        # Every rank must agree (its loss is local; gradients are already averaged by DDP).
        finite = all_true(bool(torch.isfinite(loss)) and bool(torch.isfinite(norm)), self.info)
        if self.guard.update(finite, step):
            if self.scaler is not None:
                self.scaler.step(self.opt)
            else:
                self.opt.step()
            self.ema.update(self.cm)
        if self.scaler is not None:
            self.scaler.update()
        # Averages over the log interval count finite steps only (a skipped step contributes zeros).
        out = {"loss": loss.detach(), "grad_norm": norm.detach(), **extras}
        out = {k: (v if finite else torch.zeros(())) if isinstance(v, Tensor) else v for k, v in out.items()}
        out["finite_steps"] = torch.ones(()) if finite else torch.zeros(())
        return out

    def _record(self, sums: Dict, last: Dict, count: int, dt: float, elapsed: float) -> dict:
        keys = sorted(sums)
        vec = torch.stack([sums[k].reshape(()).double().cpu() for k in keys])
        vec = all_reduce_sum(vec.to(self.device), self.info).cpu()  # sums over steps and ranks
        total = dict(zip(keys, vec.tolist()))
        good = total.pop("finite_steps")
        rec = {"stage": self.stage, "step": self.step}
        rec.update({k: (v / good if good else float("nan")) for k, v in total.items()})
        rec.update(last)
        rec.update(lr=self.opt.param_groups[0]["lr"], img_per_s=self.cfg.batch_size * count / max(dt, 1e-9),
                   skipped=self.guard.skipped, time=round(elapsed, 3))
        return rec

    @torch.no_grad()
    def _samples(self, log: RunLogger) -> None:
        if not self.info.is_main or (self.out_dir is None and not log.callbacks):
            return
        n, classes = self.cfg.num_samples, self.cm.num_classes
        labels = torch.arange(n) % classes if classes else None  # one column per class
        # One call for the whole grid: a fixed shape, so a compiled sampler never recompiles for a remainder.
        images = sample(self.ema.module, n, labels, sigmas=(self.cm.sigma_max,), seeds=self.cfg.seed)
        if self.out_dir is not None:
            nrow = classes if classes and n % classes == 0 and classes <= 32 else None
            save_grid(images, self.out_dir / "samples" / f"step_{self.step:08d}.png", nrow=nrow, overwrite=True)
        log.event("on_sample", self.step, images)

    def _save(self, log: RunLogger) -> None:
        if self.ckpt is None:
            return
        # Identical on every rank (DDP keeps replicas equal), so all ranks stop together if this fails.
        if not all_finite(list(self.cm.parameters()) + list(self.ema.module.parameters())):
            raise NonFiniteError(f"weights are not finite at step {self.step}; refusing to save a checkpoint")
        if self.info.is_main:
            tensors, meta = self.checkpoint_state()
            self.last_checkpoint = self.ckpt.save(self.step, tensors, meta)
            log.event("on_checkpoint", self.step, self.last_checkpoint)


def _make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """None for fp32; bf16/fp16 autocast on CUDA ("auto": bf16 where supported); CPU trains in fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda":
        raise ValueError(f"precision={precision!r} needs a CUDA device; use 'fp32' (or 'auto') on {device.type}")
    return torch.bfloat16 if precision == "bf16" else torch.float16
