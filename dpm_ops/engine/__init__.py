"""Training and evaluation engines, configs, checkpoints and DDP helpers (see :mod:`.trainer`)."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, available_configs, load_config
from .schedules import LRSchedule, poly_lr, warmup_cosine_lr
from .trainer import Trainer, evaluate_with_config, train

__all__ = [
    "CheckpointError", "ConfigError", "LRSchedule", "Trainer", "available_configs", "evaluate_with_config",
    "load_checkpoint", "load_config", "poly_lr", "save_checkpoint", "train", "warmup_cosine_lr",
]
