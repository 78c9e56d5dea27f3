"""Checkpoints: written atomically, tagged with the model name and config, checked on load.

A checkpoint is one ``torch.save`` dict::

    format        "dpm_ops.checkpoint/1"
    model_name    a name in engine.recipes.RECIPES ("dpm", "vit_baseline", "maskreid", "maskreid_resnet50")
    model_args    {"num_classes": K, "num_cameras": C, "options": {...}}  (enough to rebuild it)
    config        the full training config
    model         the model's state dict (unwrapped from DDP)
    training      optimizers, schedules, scaler, RNG states, sampler, progress (absent in final.pt)

:func:`save_checkpoint` writes to a temporary file in the destination folder, flushes and fsyncs it,
then ``os.replace``s it over the destination (and fsyncs the folder): a crash at any point leaves
either the previous file or the new one, never a half-written one. Reading one checks the CRC-32 that
torch.save writes for every record (torch.load does not): a file damaged since it was written is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import shutil
import signal
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dpm_ops.models.weights import WeightsError, read_torch_file
from dpm_ops.ops._checks import first_line, quote

from .pictures import PICTURES

FORMAT = "dpm_ops.checkpoint/1"
TEMPORARY_SUFFIX = ".tmp"  # atomic_write's temporaries: .<name>.<random>.tmp next to <name>


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, not ours, or belongs to another model (or does not fit
    it); or a run folder cannot be written."""


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem allows fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_name(path: Path) -> Path:
    # the name cut to 200 characters: 18 more made a valid long name (up to 255) too long for the file system
    return path.with_name(f".{path.name[:200]}.{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}")


@contextlib.contextmanager
def naming(path: str | os.PathLike, *aliases: str | os.PathLike):
    """An OSError of the block that names no file, or one of ``aliases`` (a hidden temporary), names ``path``: a
    full disk's was "[Errno 28] No space left on device", no file. Another file's stays its own."""
    try:
        yield
    except OSError as error:
        names = {str(path), *map(str, aliases)}
        if error.errno is not None and (error.filename is None or str(error.filename) in names):
            error.filename = str(path)
            if error.filename2 is not None and str(error.filename2) in names:  # os.replace(tmp, path): "path -> path"
                del error.filename2
        raise


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then move it into place.

    One permission policy for every file a run writes (checkpoints, metrics.json, logs): the
    umask's, as a plain ``open`` gives. A checkpoint holds nothing more private than the metrics
    and logs next to it, and a run folder is usually shared; whoever wants it private sets a
    umask (077) or the folder's permissions, and then every file follows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    with naming(path, tmp):
        # "x": never another's file (outside the try: a name in use is not ours to remove); the umask's mode
        handle = open(tmp, "xb")
        try:
            try:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException:
                with contextlib.suppress(OSError):  # closing flushes the rest again: its error replaced the first
                    handle.close()
                raise
            handle.close()
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that :func:`atomic_write` left in ``folder`` when the process was
    killed mid-write (a full checkpoint each). Call it only where no other writer is active: at
    the start of a run, which owns its folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*.*{TEMPORARY_SUFFIX}") if p.is_file()]  # .<name>.<random>.tmp
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def make_output_folder(path: str | os.PathLike, name: str) -> Path:
    """Create the folder ``path`` (or accept an existing one) before any work starts; ``name`` is
    the argument that gave it (``--output``, ``output_dir``), named in the error."""
    path = Path(os.path.expanduser(str(path)))
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{name} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"{name} {path}: cannot create the folder ({error.strerror or error})") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise CheckpointError(f"{name} {path}: the folder is not writable")
    return path


def run_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints of the training run ``folder`` holds (its checkpoints/*.pt), sorted; [] if none."""
    return sorted((Path(folder) / "checkpoints").glob("*.pt"))


def check_not_a_run_folder(path: Path, name: str) -> None:
    """An evaluation's output folder must be neither a training run's (its metrics.json and pictures
    would replace the run's) nor in use by one (a run starting there holds its lock before writing any
    checkpoint); a CheckpointError naming ``name`` otherwise."""
    held = run_checkpoints(path)
    if held:
        raise CheckpointError(
            f"{name} {path} holds a training run ({held[0].relative_to(path)}): its metrics.json and pictures "
            "would be replaced; choose another folder (by default <run>/eval)"
        )
    lock = path / RunFolder.LOCK
    if RunFolder.held_here(lock):
        raise CheckpointError(f"{name} {path} is in use by a training run; choose another folder")
    if lock.is_file():
        with open(lock) as handle:
            try:
                fcntl.lockf(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:  # a training run holds it
                raise CheckpointError(f"{name} {path} is in use by a training run; choose another folder") from None


SET_FOLDER_PREFIX = "test_"  # an evaluation on several test sets writes each one's results in test_<set>/


def tested_set_folders(out_dir: Path) -> list[Path]:
    """The test sets' folders an evaluation wrote in ``out_dir`` (those holding a metrics.json: not a user's own)."""
    return sorted(found.parent for found in out_dir.glob(f"{SET_FOLDER_PREFIX}*/metrics.json"))


class RunFolder:
    """A training run's hold on its output folder, taken before any work starts: an exclusive lock
    on ``.run.lock`` (a second run into the same folder is refused while the first lives), and a
    folder that already holds a run's checkpoints is refused unless the run resumes it or was asked
    to overwrite it: a rerun that forgot ``--resume`` overwrote the earlier checkpoints and logs.
    The lock is a POSIX record lock (lockf): it belongs to this process alone, so the data loader's
    forked workers do not keep it after a killed run, and it dies with the process. A process's own
    record locks never conflict, so the folders its runs hold are also kept in ``_held`` (a second
    Trainer on the same folder in one process was not refused)."""

    LOCK = ".run.lock"
    _held: set = set()  # (device, inode) of the folders this process's runs hold

    def __init__(self, path: Path, resume: bool, overwrite: bool):
        self.path = path
        in_use = CheckpointError(
            f"{path} is in use by another training run (it holds {path / self.LOCK}): "
            "wait for it to end, or choose another --output"
        )
        if self.held_here(path / self.LOCK):  # checked before opening: closing any handle drops the lock
            raise in_use
        self._lock = open(path / self.LOCK, "a+")
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: another process holds it
            self._lock.close()
            raise in_use from None
        status = os.fstat(self._lock.fileno())
        identity = (status.st_dev, status.st_ino)
        self._held.add(identity)
        # given up by release(), or when this object is collected (a Trainer built, never run, then dropped)
        self._forget = weakref.finalize(self, self._held.discard, identity)
        checkpoints = path / "checkpoints"
        if checkpoints.exists() and not checkpoints.is_dir():  # found after the first epoch, otherwise
            self.release()
            raise CheckpointError(f"{checkpoints} is not a folder: the run writes its checkpoints there")
        self.earlier = [] if resume else run_checkpoints(path)
        if self.earlier and not overwrite:
            self.release()
            raise CheckpointError(
                f"{path} already holds a run ({self.earlier[0].relative_to(path)}): pass --resume to continue "
                "it, --overwrite to start over (its checkpoints and results are removed), or choose another --output"
            )

    @classmethod
    def held_here(cls, lock: Path) -> bool:
        """Whether a run of this process holds the lock file ``lock``: then no other handle of it may be opened
        and closed here (POSIX drops a process's record locks on a file when it closes any handle of it). A
        dropped run that only a reference cycle keeps is collected first."""
        try:
            status = os.stat(lock)
        except OSError:
            return False
        if (status.st_dev, status.st_ino) in cls._held:
            gc.collect()
        return (status.st_dev, status.st_ino) in cls._held

    # what a run writes besides its checkpoints and logs (rewritten from the start): its results
    RESULTS = ("metrics.json", "loss_curves.png", *PICTURES)
    EVALUATION = "eval"  # `dpm-reid eval`'s folder for the run's checkpoints: metrics.json and PICTURES

    def remove_earlier_run(self) -> list[Path]:
        """With overwrite: the earlier run's checkpoints and results (periodic evaluations, metrics, pictures, those of
        each test set, and the files `dpm-reid eval` of its checkpoints wrote in <run>/eval), removed once the new run has set up (a
        run that fails on bad input leaves them), so none passes for the new run's. Other files stay."""
        if not self.earlier:
            return []
        evaluation = self.path / self.EVALUATION
        results = [self.path / name for name in self.RESULTS] + sorted(self.path.glob("eval_epoch_[0-9]*"))
        results += [evaluation / name for name in ("metrics.json", *PICTURES)]
        results += [*tested_set_folders(self.path), *tested_set_folders(evaluation)]
        removed = [*self.earlier, *(path for path in results if path.exists())]
        for path in removed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # kept where it holds anything else
            evaluation.rmdir()
        self.earlier = []
        return removed

    def check_held(self) -> None:
        """A CheckpointError when the folder's lock file is no longer the one this run locked: the folder was
        removed (or replaced) during the run, whose writes recreated it silently while its logs went to deleted
        files, and a second run could start in it."""
        if self._lock.closed:  # released: the folder is no longer this run's
            return
        with contextlib.suppress(OSError):
            status, held = os.stat(self.path / self.LOCK), os.fstat(self._lock.fileno())
            if (status.st_dev, status.st_ino) == (held.st_dev, held.st_ino):
                return
        raise CheckpointError(f"{self.path} was removed or replaced during the run: it stops rather than write there")

    def release(self) -> None:
        self._forget()
        self._lock.close()  # closing releases the lock; the empty file stays (removing it would race)


@contextlib.contextmanager
def _interrupts_deferred():
    """A Ctrl-C (SIGINT) during the block is raised after it: inside torch.save's writer it came out as
    torch's "unexpected pos" error, reported as a failed write (exit 2, not an interrupt). Main thread only
    (where Python runs signal handlers); an ignored SIGINT stays ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, received[0])
        elif received:  # SIG_DFL: the default action, now
            signal.raise_signal(signal.SIGINT)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model_name" not in state:
        raise ValueError("save_checkpoint: state must come from make_checkpoint (format + model_name)")
    if not isinstance(path, (str, os.PathLike)) or not str(path) or Path(path).is_dir():
        raise ValueError(f"save_checkpoint: path must be a file path, got {quote(path)}")
    try:
        with _interrupts_deferred():
            return atomic_write(path, lambda handle: torch.save(state, handle))
    except RuntimeError as error:  # torch's writer reports a failed write (a full disk) as "unexpected pos ..."
        free = shutil.disk_usage(Path(path).parent).free / 2**20
        raise OSError(
            errno.EIO,
            f"writing the checkpoint failed ({free:.0f} MiB free on its file system; torch: {first_line(error)})",
            str(path),
        ) from error


def make_checkpoint(
    model_name: str, model_args: dict, config: dict, model_state: dict, training: Optional[dict] = None, **extra: Any
) -> dict:
    state = {
        "format": FORMAT,
        "model_name": model_name,
        "model_args": model_args,
        "config": config,
        "model": model_state,
    }
    if training is not None:
        state["training"] = training
    state.update(extra)
    return state


def load_checkpoint(path: str | os.PathLike, *, model_name: Optional[str] = None, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; with ``model_name``, refuse another model's."""
    state = read_checkpoint_file(path, map_location)
    if not is_training_checkpoint(state, path):
        raise CheckpointError(
            f"{path} is not a dpm_ops training checkpoint (no '{FORMAT}' tag); "
            "pretrained backbone weights go in model.pretrained instead"
        )
    return checked_checkpoint(path, state, model_name)


# What unpickling np.random.get_state()'s uint32 array calls (its reconstructor, class and dtype): no other code.
_NUMPY_ARRAY_GLOBALS = [np.ndarray.__reduce__(np.zeros(0))[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """What the torch file ``path`` holds; CheckpointError when it is missing or not a torch file."""
    if not (map_location is None or isinstance(map_location, (str, torch.device, dict)) or callable(map_location)):
        raise CheckpointError(  # torch.load's TypeError was reported as an unreadable file
            f"map_location must be a device name, a torch.device, a dict or a function (torch.load's), got "
            f"{type(map_location).__name__}"
        )
    if isinstance(map_location, (str, torch.device)):  # a bad one was reported as an unreadable file
        try:
            device = torch.device(map_location)
        except RuntimeError:
            raise CheckpointError(
                f"map_location must name a device (cpu, cuda, cuda:N), got {map_location!r}"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"map_location {map_location!r}: CUDA is not available here; use cpu")
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        # a run folder or its checkpoints/ folder is an easy slip: name the files it holds
        found = sorted(path.glob("*.pt")) or sorted(path.glob("checkpoints/*.pt"))
        hint = f" (it holds {', '.join(str(file) for file in found)})" if found else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a file{hint}")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is not a regular file" if path.exists() else f"checkpoint not found: {path}"
        )
    try:
        # torch's restricted unpickler (no code runs from the file: --weights takes files from anywhere), which
        # also has to rebuild the numpy array of np.random.get_state() that training checkpoints hold
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return read_torch_file(path, weights_only=True, map_location=map_location)
    except WeightsError as error:
        raise CheckpointError(f"unreadable checkpoint: {error}") from error


def is_training_checkpoint(contents: Any, path: str | os.PathLike) -> bool:
    """Whether a file's ``contents`` are a checkpoint written by :func:`save_checkpoint`. Another
    version's tag is a CheckpointError naming ``path`` (it was read as a bare state dict and refused as one)."""
    tag = contents.get("format") if isinstance(contents, dict) else None
    if isinstance(tag, str) and tag.startswith(FORMAT.split("/")[0] + "/") and tag != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is of format {quote(tag)}, which this dpm_ops does not read (it reads "
            f"{FORMAT!r}); use the dpm_ops version that wrote it"
        )
    return tag == FORMAT


def checked_checkpoint(path: str | os.PathLike, state: dict, model_name: Optional[str] = None) -> dict:
    """``state`` (a training checkpoint read from ``path``) once it holds what rebuilding its model
    needs; with ``model_name``, another model's is refused."""
    _check_structure(path, state)
    if model_name is not None and state["model_name"] != model_name:
        raise CheckpointError(
            f"checkpoint {path} holds a {state['model_name']!r} model, not {model_name!r} "
            "(use the config it was trained with)"
        )
    return state


def _check_structure(path: str | os.PathLike, state: dict) -> None:
    """What rebuilding the model needs: its name, its arguments and a state dict of tensors."""
    args = state.get("model_args")
    problem = None
    if not isinstance(state.get("model_name"), str):
        problem = "no model_name"
    elif not isinstance(args, dict):
        problem = "no model_args (the model's num_classes, num_cameras and options)"
    elif not (
        isinstance(args.get("num_classes"), int)
        and isinstance(args.get("num_cameras"), int)
        and isinstance(args.get("options"), dict)
    ):
        problem = f"model_args must hold int num_classes, int num_cameras and an options mapping, got {args!r}"
    elif not isinstance(state.get("model"), dict) or not all(
        isinstance(value, torch.Tensor) for value in state["model"].values()
    ):
        problem = "no model state dict (a mapping of tensors)"
    if problem is not None:
        raise CheckpointError(f"checkpoint {path}: {problem}")


def _listed(names: list, limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_model_state(
    model: torch.nn.Module, state_dict: dict, path: str | os.PathLike, built_from: str = "its model_args"
) -> None:
    """``model.load_state_dict(state_dict)`` after checking that every tensor fits: a
    CheckpointError naming ``path``, what the model was ``built_from`` and what differs (missing,
    unexpected, reshaped tensors) instead of torch's multi-line RuntimeError."""
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    given = {key: state_dict[key] for key in own if key in state_dict}
    not_tensors = [key for key, value in given.items() if not isinstance(value, torch.Tensor) or value.is_meta]
    tensors = {key: value for key, value in given.items() if key not in not_tensors}
    reshaped = [
        f"{key} {tuple(value.shape)} vs the model's {tuple(own[key].shape)}"
        for key, value in tensors.items()
        if value.shape != own[key].shape
    ]
    # load_state_dict would cast an integer, bool or complex tensor into a float parameter without a word
    retyped = [
        f"{key} {value.dtype} vs the model's {own[key].dtype}"
        for key, value in tensors.items()
        if own[key].is_floating_point() and not value.is_floating_point()
    ]
    non_finite = [
        key for key, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    problems = [
        f"{label}: {_listed(names)}"
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("not a tensor with data", not_tensors),
            ("shape differs", reshaped),
            ("dtype differs", retyped),
            ("NaN or inf values", non_finite),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit the {type(model).__name__} of {built_from} ({'; '.join(problems)})"
        )
    model.load_state_dict(state_dict)


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
