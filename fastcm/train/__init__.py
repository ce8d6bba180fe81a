"""Training pipelines: the iCT stage, the FD-loss fine-tune stage, checkpoints, torchrun DDP, torch.compile."""
from .checkpoint import (CheckpointError, CheckpointManager, load_checkpoint, read_checkpoint_meta,
                         save_checkpoint)
from .config import FDConfig, ICTConfig, TrainConfig
from .guard import NonFiniteError, NonFiniteGuard
