"""Training and evaluation engines, configs, checkpoints and DDP helpers; the layers are drawn in
docs/architecture.md. What differs between models lives in :mod:`.recipes`."""

from .builders import (
    checkpoint_model,
    evaluate_checkpoint,
    evaluate_with_config,
    init_run_device,
    resolve_amp,
    resolve_device,
)
from .checkpoint import CheckpointError, load_checkpoint, make_output_folder, save_checkpoint
from .config import ConfigError, available_configs, check_config, load_config
from .recipes import RECIPES, Recipe, get_recipe
from .schedules import LRSchedule, poly_lr, warmup_cosine_lr
from .hooks import Hook, TrainingDiverged
from .trainer import Trainer, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Hook",
    "LRSchedule",
    "RECIPES",
    "Recipe",
    "Trainer",
    "TrainingDiverged",
    "available_configs",
    "check_config",
    "checkpoint_model",
    "evaluate_checkpoint",
    "evaluate_with_config",
    "get_recipe",
    "init_run_device",
    "load_checkpoint",
    "load_config",
    "make_output_folder",
    "poly_lr",
    "resolve_amp",
    "resolve_device",
    "save_checkpoint",
    "train",
    "warmup_cosine_lr",
]
