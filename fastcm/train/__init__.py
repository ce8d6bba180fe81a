"""Training pipelines: the consistency-training stage (iCT, sCT or MeanFlow: ``train_method(MethodConfig(method=...),
...)``; ``train_ict`` and ``ICTConfig`` are the same under their first names), the FD-loss fine-tune stage, EMA,
checkpoints, torchrun DDP, torch.compile.

    from fastcm.data import load_digits
    from fastcm.models import build_unet
    from fastcm.train import FDConfig, MethodConfig, finetune_fd, load_model, reference_stats, train_method

    result = train_method(MethodConfig(total_steps=4000, batch_size=64, lr=2e-4), load_digits("train"),
                          build_unet("digits"), out_dir="runs/digits-ict")
    model = load_model(result.checkpoint)                       # the EMA weights of the last checkpoint
    ref = reference_stats(feature_net, load_digits("train"))     # fp64 feature statistics of the real data
    tuned = finetune_fd(FDConfig(), model, feature_net, ref, out_dir="runs/digits-fd")
"""
from .checkpoint import load_model, load_weights
from .checkpoint_file import CheckpointError, CheckpointManager, load_checkpoint, read_checkpoint_meta, save_checkpoint
from .config import FDConfig, ICTConfig, MethodConfig, TrainConfig
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .ema import EMA
from .fd import finetune_fd, reference_stats
from .ict import train_ict, train_method
from .guards import DivergenceError, NonFiniteError, NonFiniteGuard, TrainingInterrupted
from .loop import Trainer, TrainResult
from .progress import Callback

__all__ = ["MethodConfig", "ICTConfig", "FDConfig", "TrainConfig", "train_ict", "train_method", "finetune_fd", "reference_stats", "EMA",
           "TrainResult", "Trainer", "Callback", "load_model", "load_weights", "save_checkpoint", "load_checkpoint",
           "read_checkpoint_meta", "CheckpointManager", "CheckpointError", "NonFiniteError", "DivergenceError",
           "TrainingInterrupted", "NonFiniteGuard", "DistInfo", "init_distributed", "cleanup_distributed"]
