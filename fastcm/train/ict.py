"""Stage 1: consistency training of a model on a dataset with ``cfg.method`` (fastcm.cm.methods).

iCT (default; Song & Dhariwal 2023): each step, a batch x (and labels for a class-conditional net), the iCT loss of
fastcm.cm.ICTLoss at the step's curriculum N(k) (lognormal pair index, shared noise and dropout seed, stop-gradient
target, lambda-weighted Pseudo-Huber), mean over the batch, RAdam, EMA of the weights for evaluation.
sCT (Lu & Song 2025) and MeanFlow (Geng et al. 2025): the same loop with the method's per-sample loss (one network
JVP without graph + one trainable pass + backward, about 2x an iCT step's time). Under DDP the loss gets the DDP
module: the JVP unwraps it (torch.func.jvp of a DDP module fails) and the trainable pass goes through DDP, whose
backward averages the gradients across ranks.
"""
import time
from typing import Optional, Sequence

import torch
from torch import nn

from fastcm._checks import is_real
from fastcm.cm import METHODS, get_method, method_of_model
from fastcm.cm.hyperparameters import check_unet
from fastcm.data import BatchLoader

from .config import MethodConfig
from .loop import Trainer, TrainResult
from .progress import CallbackLike


def train_method(cfg: MethodConfig, dataset, model: nn.Module, *, out_dir=None, resume=False, restart: bool = False,
              device=None, callbacks: Optional[Sequence[CallbackLike]] = None, progress: bool = True,
              max_seconds: Optional[float] = None, budget_clock: str = "wall",
              allow_data_change: bool = False) -> TrainResult:
    """Train ``model`` with ``cfg.method``: a ConsistencyModel (iCT), TrigFlowModel (sCT) or MeanFlowModel, or a
    bare fastcm U-Net (wrapped by ``get_method(cfg.method).make_model``; it must have been built with the method's
    ``unet_overrides``). ``train_ict`` is the same function under its first name.

    Args:
        cfg: the stage's MethodConfig (total_steps sets the iCT curriculum N(k); ``method`` and the method's
            hyper-parameters, see MethodConfig).
        dataset: an ArrayDataset from fastcm.data (or any map-style dataset of (image in [-1, 1], label)).
        out_dir: run directory for config.json, metrics.jsonl, samples/ and checkpoints/; None writes nothing.
        resume: True continues the newest checkpoint in out_dir (a fresh start if there is none; CheckpointError
            if it is damaged: it is never skipped or overwritten); a path resumes that checkpoint; False refuses an
            out_dir that already holds a run.
        restart: start over in an out_dir that holds a run, after moving its files into out_dir/previous-<time>/.
        allow_data_change: resume although ``dataset`` differs from the checkpoint's (its fingerprint: spec, size,
            shape, classes, a hash of 64 items); refused by default.
        device: None picks cuda:LOCAL_RANK when available, else the CPU. Under torchrun the process group is
            initialised here (NCCL on CUDA, gloo on CPU) and cfg.batch_size is split across the ranks.
        callbacks: callables receiving every metrics record, or fastcm.train.Callback objects.
        max_seconds: a wall-clock budget: training stops after the step that spends it (logging, sampling and
            saving as after the last step) with result.step <= cfg.total_steps; None = train all the steps.
            The schedules still follow cfg.total_steps (iCT's N(k) stops wherever the budget ends it).
        budget_clock: "wall" (time.monotonic) or "cpu" (time.process_time: this process's CPU seconds, all its
            threads; on a shared machine a budget that other processes' load does not shrink).
    Returns a TrainResult (model, ema, step, records, checkpoint, skipped_steps). SIGINT / SIGTERM save a checkpoint
    after the step in flight and raise TrainingInterrupted; see fastcm.train.loop for the other ways to stop.
    """
    if not isinstance(cfg, MethodConfig):
        raise TypeError(f"cfg must be a MethodConfig (ICTConfig), got {type(cfg).__name__}")
    assert tuple(METHODS) == ("ict", "sct", "meanflow"), "MethodConfig.method's choices must follow fastcm.cm.METHODS"
    method = get_method(cfg.method, **cfg.method_hyperparameters())
    model = _method_model(method, model)
    trainer = Trainer(cfg.method, cfg, model, out_dir=out_dir, device=device, callbacks=callbacks,
                      progress=progress)
    # Everything that can reject the inputs runs before start(), which writes the run directory.
    conditional = check_dataset(dataset, trainer.cm)
    info = trainer.info
    loader = BatchLoader(dataset, trainer.local_batch, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                         hflip=cfg.hflip, num_workers=cfg.num_workers)
    if max_seconds is not None and not (is_real(max_seconds) and max_seconds > 0):
        raise ValueError(f"max_seconds must be None or a positive number of seconds, got {max_seconds!r}")
    if budget_clock not in BUDGET_CLOCKS:
        raise ValueError(f"budget_clock must be one of {tuple(BUDGET_CLOCKS)}, got {budget_clock!r}")
    trainer.max_seconds, trainer.budget_clock = max_seconds, BUDGET_CLOCKS[budget_clock]
    trainer.curriculum = _curriculum(method, cfg)
    trainer.start(resume, restart, data=dataset, allow_data_change=allow_data_change)
    batches = loader.iterate(trainer.step)

    def loss_fn(step: int):
        x, y = next(batches)
        x = x.to(trainer.device, non_blocking=True)
        labels = y.to(trainer.device, non_blocking=True) if conditional else None
        per_sample = method.loss(trainer.net, x, labels, step, trainer.generator(step))
        schedule = trainer.curriculum(step)
        return per_sample.mean(), {k: schedule[k] for k in ("N", "tangent_warmup") if k in schedule}

    return trainer.run(loss_fn)


train_ict = train_method  # the first name, kept for existing code
BUDGET_CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


def _method_model(method, model: nn.Module) -> nn.Module:
    """The method's model: ``model`` itself when it is one, else ``method.make_model(model)`` around a U-Net."""
    try:
        name = method_of_model(model)
    except TypeError:
        if not isinstance(model, nn.Module) or not hasattr(model, "input_shape"):
            raise TypeError(f"model must be a fastcm ConsistencyModel, TrigFlowModel, MeanFlowModel or U-Net, got "
                            f"{type(model).__name__}") from None
        check_unet(method.name, method.unet_overrides, model)  # e.g. sCT on a U-Net that embeds 1000 t
        return method.make_model(model)
    if name != method.name:
        raise ValueError(f"cfg.method is {method.name!r} but the model is a {type(model).__name__} "
                         f"(a {name!r} model); build it with get_method({method.name!r}).make_model(unet)")
    check_unet(method.name, method.unet_overrides, model)
    return model


def _curriculum(method, cfg: MethodConfig):
    """step -> the JSON description of the method's schedule at that step (logged and saved in checkpoints)."""
    if method.name == "ict":
        ict = method.loss_fn
        return lambda k: {"N": ict.num_scales(k), "s0": ict.s0, "s1": ict.s1, "K": ict.total_steps}
    if method.name == "sct":
        H = cfg.tangent_warmup
        return lambda k: {"tangent_warmup": 1.0 if H == 0 else min(1.0, k / H), "H": H}
    return lambda k: {"ratio": cfg.mf_ratio}


def check_dataset(dataset, cm) -> bool:
    """Validate that ``dataset`` fits the model; return whether labels are used (class-conditional model)."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"dataset must be a map-style dataset (e.g. fastcm.data.ArrayDataset), "
                        f"got {type(dataset).__name__}")
    shape = getattr(dataset, "image_shape", None)
    if shape is None:
        shape = tuple(torch.as_tensor(dataset[0][0]).shape)
    if tuple(shape) != tuple(cm.input_shape):
        raise ValueError(f"dataset images have shape {tuple(shape)} but the model expects {tuple(cm.input_shape)}")
    classes = cm.num_classes
    if not classes:
        return False
    data_classes = getattr(dataset, "num_classes", None)
    if data_classes is None:
        raise ValueError(f"the model is class-conditional ({classes} classes) but the dataset has no labels")
    if data_classes > classes:
        raise ValueError(f"the dataset has {data_classes} classes but the model only {classes}")
    return True
