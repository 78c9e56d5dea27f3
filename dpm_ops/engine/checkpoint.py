"""Checkpoints: written atomically, tagged with the model name and config, checked on load.

A checkpoint is one ``torch.save`` dict::

    format        "dpm_ops.checkpoint/1"
    model_name    "dpm" | "vit_baseline" | "maskreid" | "maskreid_resnet50"
    model_args    {"num_classes": K, "num_cameras": C, "options": {...}}  (enough to rebuild it)
    config        the full training config
    model         the model's state dict (unwrapped from DDP)
    training      optimizers, schedules, scaler, RNG states, sampler, progress (absent in final.pt)

:func:`save_checkpoint` writes to a temporary file in the destination folder, flushes and fsyncs it,
then ``os.replace``s it over the destination (and fsyncs the folder): a crash at any point leaves
either the previous file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT = "dpm_ops.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, not ours, or belongs to another model."""


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem allows fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    if state.get("format") != FORMAT or "model_name" not in state:
        raise ValueError("save_checkpoint: state must come from make_checkpoint (format + model_name)")
    return atomic_write(path, lambda handle: torch.save(state, handle))


def make_checkpoint(model_name: str, model_args: dict, config: dict, model_state: dict,
                    training: Optional[dict] = None, **extra: Any) -> dict:
    state = {"format": FORMAT, "model_name": model_name, "model_args": model_args, "config": config,
             "model": model_state}
    if training is not None:
        state["training"] = training
    state.update(extra)
    return state


def load_checkpoint(path: str | os.PathLike, *, model_name: Optional[str] = None,
                    map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; with ``model_name``, refuse another model's."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # our own files hold numpy / python RNG states, so full unpickling is needed (trusted input)
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError) as error:
        raise CheckpointError(f"unreadable checkpoint {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a dpm_ops training checkpoint (no '{FORMAT}' tag); "
            "pretrained backbone weights go in model.pretrained instead"
        )
    if model_name is not None and state["model_name"] != model_name:
        raise CheckpointError(
            f"checkpoint {path} holds a {state['model_name']!r} model, not {model_name!r} "
            "(use the config it was trained with)"
        )
    return state


def capture_rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
