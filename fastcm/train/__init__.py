"""Training pipelines: the iCT stage, the FD-loss fine-tune stage, checkpoints, torchrun DDP, torch.compile.

    from fastcm.data import load_digits
    from fastcm.models import build_unet
    from fastcm.train import ICTConfig, train_ict, load_model

    result = train_ict(ICTConfig(total_steps=4000, batch_size=64, lr=2e-4), load_digits("train"),
                       build_unet("digits"), out_dir="runs/digits-ict")
    model = load_model("runs/digits-ict/checkpoints/ckpt_00004000.safetensors")   # EMA weights
"""
from .checkpoint import (CheckpointError, CheckpointManager, load_checkpoint, read_checkpoint_meta,
                         save_checkpoint)
from .config import FDConfig, ICTConfig, TrainConfig
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .guard import NonFiniteError, NonFiniteGuard
from .ict import train_ict
from .loop import TrainResult, Trainer
from .progress import Callback
from .state import load_model, load_weights

__all__ = ["ICTConfig", "FDConfig", "TrainConfig", "train_ict", "TrainResult", "Trainer", "Callback",
           "load_model", "load_weights", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta",
           "CheckpointManager", "CheckpointError", "NonFiniteError", "NonFiniteGuard", "DistInfo",
           "init_distributed", "cleanup_distributed"]
