"""Stage 1: improved consistency training (iCT, Song & Dhariwal 2023) of a ConsistencyModel on a dataset.

Each step: a batch x (and labels for a class-conditional net), the iCT loss of fastcm.cm.ICTLoss at the step's
curriculum N(k) (lognormal pair index, shared noise and dropout seed, stop-gradient target, lambda-weighted
Pseudo-Huber), mean over the batch, RAdam, EMA of the weights for evaluation.
"""
from typing import Optional, Sequence

import torch
from torch import nn

from fastcm.cm import ICTLoss
from fastcm.data import BatchLoader

from .config import ICTConfig
from .loop import Trainer, TrainResult
from .progress import CallbackLike


def train_ict(cfg: ICTConfig, dataset, model: nn.Module, *, out_dir=None, resume=False, restart: bool = False,
              device=None, callbacks: Optional[Sequence[CallbackLike]] = None, progress: bool = True) -> TrainResult:
    """Train ``model`` (a ConsistencyModel, or a fastcm U-Net wrapped with the default sigmas) with iCT.

    Args:
        cfg: the stage's ICTConfig (total_steps sets the N(k) curriculum).
        dataset: an ArrayDataset from fastcm.data (or any map-style dataset of (image in [-1, 1], label)).
        out_dir: run directory for config.json, metrics.jsonl, samples/ and checkpoints/; None writes nothing.
        resume: True continues the newest checkpoint in out_dir (a fresh start if there is none; CheckpointError
            if it is damaged: it is never skipped or overwritten); a path resumes that checkpoint; False refuses an
            out_dir that already holds a run.
        restart: start over in an out_dir that holds a run, after moving its files into out_dir/previous-<time>/.
        device: None picks cuda:LOCAL_RANK when available, else the CPU. Under torchrun the process group is
            initialised here (NCCL on CUDA, gloo on CPU) and cfg.batch_size is split across the ranks.
        callbacks: callables receiving every metrics record, or fastcm.train.Callback objects.
    Returns a TrainResult (model, ema, step, records, checkpoint, skipped_steps). SIGINT / SIGTERM save a checkpoint
    after the step in flight and raise TrainingInterrupted; see fastcm.train.loop for the other ways to stop.
    """
    if not isinstance(cfg, ICTConfig):
        raise TypeError(f"cfg must be an ICTConfig, got {type(cfg).__name__}")
    trainer = Trainer("ict", cfg, model, out_dir=out_dir, device=device, callbacks=callbacks, progress=progress)
    # Everything that can reject the inputs runs before start(), which writes the run directory.
    conditional = check_dataset(dataset, trainer.cm)
    info = trainer.info
    loader = BatchLoader(dataset, trainer.local_batch, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                         hflip=cfg.hflip, num_workers=cfg.num_workers)
    ict = ICTLoss(cfg.total_steps, cfg.s0, cfg.s1, cfg.P_mean, cfg.P_std, cfg.rho, cfg.huber_c)
    trainer.curriculum = lambda k: {"N": ict.num_scales(k), "s0": ict.s0, "s1": ict.s1, "K": ict.total_steps}
    trainer.start(resume, restart)
    batches = loader.iterate(trainer.step)

    def loss_fn(step: int):
        x, y = next(batches)
        x = x.to(trainer.device, non_blocking=True)
        labels = y.to(trainer.device, non_blocking=True) if conditional else None
        per_sample = ict(trainer.net, x, step, labels, generator=trainer.generator(step))
        return per_sample.mean(), {"N": ict.num_scales(step)}

    return trainer.run(loss_fn)


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
