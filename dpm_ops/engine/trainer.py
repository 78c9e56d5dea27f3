"""Training engine: a model-agnostic loop over the stages of a model's recipe (:mod:`.recipes`),
with hooks (:mod:`.hooks`) for logging, checkpoints, periodic evaluation and the stop.

    from dpm_ops.engine import load_config, train
    result = train(load_config("synthetic_dpm", ["solver.epochs=2"]), "runs/demo")
    print(result["metrics"]["all"]["rank1"])

Outputs in the run folder (rank 0 only): ``train.log`` and ``train_log.jsonl`` (:mod:`.run_log`),
``config.yaml``, ``checkpoints/last.pt`` (every ``train.checkpoint_every_iters`` iterations and at
each epoch end), ``checkpoints/epoch_NNN.pt`` (every ``train.checkpoint_period`` epochs),
``checkpoints/final.pt`` (weights only), ``metrics.json`` and the evaluation pictures (tested on several sets:
``metrics.json`` holds each one's by name, each in ``test_<set>/`` with its pictures, and so do the metrics returned).

Resuming (``resume=True``) restores the model, optimizers, schedules, scaler, the python / numpy /
torch (/ CUDA) RNG states of every rank and the sampler position, so a killed run continues with
exactly the batches, augmentations and drop-path draws the uninterrupted run would have used.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dpm_ops.data import ImageDataset, build_dataloader
from dpm_ops.models import WeightsError, load_pretrained
from dpm_ops.ops._checks import check_flag, quote

from . import distributed
from .builders import (
    build_model_from_args,
    build_sampler,
    check_model_fits_data,
    check_model_options,
    check_sync_bn,
    evaluate_with_config,
    init_run_device,
    model_arguments,
    resolve_amp,
)
from .splits import load_splits, prepare_synthetic
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    make_checkpoint,
    make_output_folder,
    RunFolder,
    remove_stale_temporaries,
    restore_rng_state,
    run_checkpoints,
    save_checkpoint,
)
from .config import ConfigError, check_config, dump_config, saved_choice
from .config_checks import sampler_kinds_used, unread_keys
from .hooks import CheckpointHook, Hook, LogHook, PeriodicEvalHook, Position, StopHook, TrainingDiverged
from .preemption import PreemptionHook
from .recipes import StepContext, get_recipe
from .run_log import RunLog

# config keys that may differ between a killed run and its resumption
RESUME_FREE_KEYS = {
    ("train", "stop_after_iters"),
    ("train", "progress"),
    ("train", "device"),
    ("train", "compile"),
    ("dataset", "test_name"),
    ("dataset", "test_root"),
    ("dataset", "test_camids"),
}  # the test sets and their cameras: evaluation only
RESUME_FREE_SECTIONS = {"eval", "dataloader"}


class Trainer:
    def __init__(
        self,
        config: dict,
        output_dir: str | os.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        log_stream=None,
        hooks: Sequence[Hook] = (),
    ):
        self.config = config = check_config(config)
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
            raise CheckpointError(f"output_dir must be a folder path, got {output_dir!r}")
        hooks = list(hooks) if isinstance(hooks, (list, tuple)) else hooks
        if not isinstance(hooks, list) or not all(isinstance(hook, Hook) for hook in hooks):
            raise ValueError(f"hooks must be a list of Hook instances (dpm_ops.engine.hooks.Hook), got {hooks!r}")
        if not (isinstance(resume, (bool, np.bool_)) or (isinstance(resume, str) and resume == "auto")):
            raise ValueError(f"resume must be True, False or 'auto', got {quote(resume)}")
        check_flag(None, "overwrite", overwrite)
        if resume and overwrite:  # the CLI's flags exclude each other; here resume silently won
            raise ValueError("resume and overwrite exclude each other: continue the run, or start it over")
        binary = isinstance(log_stream, (io.RawIOBase, io.BufferedIOBase))  # failed at the first line logged
        if log_stream is not None and (binary or not callable(getattr(log_stream, "write", None))):
            raise ValueError(
                f"log_stream must be a text stream (sys.stdout, open(path, 'w')), got {type(log_stream).__name__}"
            )
        self.output_dir = Path(output_dir)
        self.model_name = config["model"]["name"]
        self.recipe = get_recipe(self.model_name)
        self.device, self.dist = init_run_device(config)
        if resume == "auto":  # a scheduler's requeued job: rank 0's folder decides, for every rank
            resume = distributed.all_gather_object((self.checkpoint_dir / "last.pt").is_file())[0]
        self.resume = resume
        check_sync_bn(config, self.device, self.dist)
        self.run_folder = None
        if self.dist.is_main:  # only rank 0 writes files
            make_output_folder(self.output_dir, "output_dir")
            self.run_folder = RunFolder(self.output_dir, resume, overwrite)
        self.amp_dtype = resolve_amp(config["solver"]["amp"], self.device)
        self.run_log = RunLog(self.output_dir, log_stream if log_stream is not None else sys.stdout, self.dist.is_main)
        self.progress = config["train"]["progress"] and self.dist.is_main
        # ``hooks`` run after the step is logged, before it may be checkpointed
        self.preemption = PreemptionHook()
        self.hooks: list[Hook] = [LogHook(), *hooks, CheckpointHook(), self.preemption, PeriodicEvalHook(), StopHook()]
        self.global_step = 0
        self.saved_step: Optional[int] = None  # the step of the last checkpoint written
        self._finished_epoch: Optional[tuple[int, int]] = None  # (stage, epoch) a resumed checkpoint ended
        self.stop_reason: Optional[str] = None
        self.bar = None

    def log(self, message: str) -> None:
        self.run_log.message(message)

    # -- setup ------------------------------------------------------------------------------

    def _seed(self) -> None:
        seed = self.config["train"]["seed"] + self.dist.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.config["train"]["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        else:  # the official DPM training script's (deterministic cuDNN algorithms, the fastest of them)
            torch.backends.cudnn.deterministic = torch.backends.cudnn.benchmark = True

    def _build_model(self) -> None:
        config = self.config
        self.model_args = model_arguments(config, self.splits)
        check_model_fits_data(self.model_args, config, self.splits, f"model {self.model_name}")
        self.model = build_model_from_args(self.model_name, self.model_args)
        if config["model"]["pretrained"]:
            path = os.path.expanduser(config["model"]["pretrained"])
            try:
                report = load_pretrained(self.model, path, partial=config["model"]["pretrained_partial"])
            except WeightsError as error:
                raise CheckpointError(f"config key model.pretrained: {error}") from error
            heads = f"; left out: {', '.join(report.dropped)}" if report.dropped else ""  # e.g. another set's classes
            self.log(f"pretrained {path}: layout {report.layout}, {len(report.loaded)} tensors loaded{heads}")
        self.model.to(self.device)
        self.model.train()

    def _build_data(self) -> None:
        config, recipe = self.config, self.recipe
        pids = [r.pid for r in self.splits.train]
        mask_paths = self.splits.mask_paths if recipe.uses_masks else None
        self.dataset = ImageDataset(self.splits.train, recipe.train_transform(config), mask_paths)
        self.samplers = {
            kind: build_sampler(kind, config, pids, self.dist.rank, self.dist.world_size, self.splits.source_labels)
            for kind in sampler_kinds_used(config)
        }
        self.loaders = {
            k: build_dataloader(
                self.dataset,
                batch_sampler=s,
                num_workers=config["dataloader"]["num_workers"],
                seed=config["train"]["seed"],
                pin_memory=config["dataloader"]["pin_memory"],
            )
            for k, s in self.samplers.items()
        }

    def setup(self) -> None:
        self._seed()
        check_model_options(self.config)
        prepare_synthetic(self.config, progress=self.progress)
        self.splits = load_splits(self.config)
        self._build_model()
        self._build_data()
        self.stages = self.recipe.build_stages(self.model, self.config, {k: len(s) for k, s in self.samplers.items()})
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        unused = self.recipe.find_unused_parameters(self.model_args)
        self.ddp_model = distributed.data_parallel(self.model, self.device, self.config["train"]["sync_bn"], unused)
        mode = self.config["train"]["compile"]
        # checkpoints and evaluation keep using self.model: its state dict, eval mode uncompiled
        step_model = self.ddp_model if mode == "off" else torch.compile(self.ddp_model, mode=mode)
        self.step_context = StepContext(step_model, self.device, self.amp_dtype, self.scaler)

    # -- checkpoints ------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _training_state(self, at: Position, epoch_done: bool) -> dict:
        sampler = self.samplers[at.stage.sampler_kind]
        return {
            "progress": {
                "stage": at.stage_index,
                "stage_name": at.stage.name,
                "epoch": at.epoch,
                "consumed": at.consumed,
                "epoch_done": epoch_done,
                "global_step": self.global_step,
            },
            "optimizers": {
                f"{i}/{n}": o.state_dict() for i, s in enumerate(self.stages) for n, o in s.optimizers.items()
            },
            "schedules": {
                f"{i}/{n}": sch.state_dict() for i, s in enumerate(self.stages) for n, sch in s.schedules.items()
            },
            "scaler": self.scaler.state_dict(),
            "sampler": sampler.state_dict(consumed_batches=at.consumed),
            "world_size": self.dist.world_size,
        }

    def diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged at step {self.global_step}: {what}; the checkpoints written before it are kept "
            "(a lower solver.base_lr may train)"
        )

    def weights_finite(self) -> bool:
        """One sync over every floating parameter and buffer (BatchNorm statistics diverge too)."""
        tensors = [t for t in itertools.chain(self.model.parameters(), self.model.buffers()) if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def save(self, at: Position, epoch_done: bool, extra_names=()) -> None:
        # Never over a good last.pt with NaN weights; every rank holds the same weights, so all stop here.
        if not self.weights_finite():
            raise self.diverged("the weights hold NaN or inf")
        # every rank's RNG state (a collective call: all ranks get here together)
        rng = distributed.all_gather_object(capture_rng_state())
        self.saved_step = self.global_step  # every rank (rank 0 writes, or fails the run)
        if not self.dist.is_main:
            return
        self.run_folder.check_held()
        training = self._training_state(at, epoch_done)
        training["rng"] = rng
        state = make_checkpoint(
            self.model_name, self.model_args, self.recorded_config, self.model.state_dict(), training
        )
        for name in extra_names:  # before last.pt: a kill between them runs the epoch, and writes them, again
            save_checkpoint(self.checkpoint_dir / name, state)
        save_checkpoint(self.checkpoint_dir / "last.pt", state)

    def _check_resume_config(self, saved: dict) -> None:
        unread = unread_keys(self.config)
        for section, values in self.config.items():
            if section in RESUME_FREE_SECTIONS:
                continue
            for key, value in values.items():
                if (section, key) in RESUME_FREE_KEYS or f"{section}.{key}" in unread:
                    continue  # a key the run does not read: earlier checkpoints stored any value there
                if section == "input" and value is None:
                    continue  # a key the recipe does not use (earlier checkpoints stored a default)
                old = saved_choice(saved, section, key)  # a key newer than the checkpoint: what runs did before it
                if old != value:
                    raise CheckpointError(
                        f"--resume: config key {section}.{key} is {value!r} but the checkpoint was trained with "
                        f"{old!r} (the run's own settings: --config {self.output_dir / 'config.yaml'} --output {self.output_dir})"
                    )

    def load_for_resume(self) -> dict:
        path = self.checkpoint_dir / "last.pt"
        if not path.is_file():
            found = "is not a file" if path.exists() else "does not exist"
            raise CheckpointError(f"--resume: no checkpoint to resume from: {path} {found}")
        try:
            state = load_checkpoint(path, model_name=self.model_name)
        except CheckpointError as error:
            earlier = [file.name for file in run_checkpoints(self.output_dir) if file.name != path.name]
            if not earlier or not isinstance(error.__cause__, WeightsError):  # an unreadable file, not another model's
                raise
            raise CheckpointError(
                f"{error}; to resume from an earlier checkpoint, copy one of {', '.join(earlier)} (in {path.parent}) "
                "over last.pt"
            ) from error
        self._check_resume_config(state["config"])
        training = state.get("training")
        if training is None:
            raise CheckpointError(f"--resume: {path} holds weights only, no training state")
        if training["world_size"] != self.dist.world_size:
            raise CheckpointError(
                f"--resume: {path} was written by {training['world_size']} process(es), "
                f"this run has {self.dist.world_size}"
            )
        load_model_state(self.model, state["model"], path)
        for i, stage in enumerate(self.stages):
            for n, opt in stage.optimizers.items():
                opt.load_state_dict(training["optimizers"][f"{i}/{n}"])
            for n, sch in stage.schedules.items():
                sch.load_state_dict(training["schedules"][f"{i}/{n}"])
        self.scaler.load_state_dict(training["scaler"])
        if not training["progress"]["epoch_done"]:  # resumed mid-epoch: the sampler's position must still hold
            sampler = self.samplers[self.stages[training["progress"]["stage"]].sampler_kind]
            try:
                sampler.check_state_dict(training["sampler"])
            except ValueError as error:
                raise CheckpointError(f"--resume: {path}: {error} (has the training data changed?)") from None
        restore_rng_state(training["rng"][self.dist.rank])
        self.global_step = training["progress"]["global_step"]
        return training

    def _resume_point(self) -> tuple[int, int, int, Optional[dict], Optional[int]]:
        """(stage, epoch, batches consumed, sampler state, step) to start from; the last is None
        for a fresh run."""
        if not self.resume:
            return 0, 1, 0, None, None
        training = self.load_for_resume()
        p = training["progress"]
        if not p["epoch_done"]:
            return p["stage"], p["epoch"], p["consumed"], training["sampler"], p["global_step"]
        self._finished_epoch = (p["stage"], p["epoch"])
        stage, epoch = p["stage"], p["epoch"] + 1
        if epoch > self.stages[stage].epochs:
            stage, epoch = stage + 1, 1
        return stage, epoch, 0, None, p["global_step"]

    # -- main loop --------------------------------------------------------------------------

    def _start_logs(self, resume_step: Optional[int], start_stage: int, start_epoch: int, consumed: int) -> None:
        self.run_log.open(resume_step)
        if self.dist.is_main:
            for path in self.run_folder.remove_earlier_run():
                self.log(f"removed {path.relative_to(self.output_dir)}, the earlier run's (--overwrite)")
            for folder in (self.output_dir, self.checkpoint_dir):  # this run owns them: no writer is active
                for path in remove_stale_temporaries(folder):
                    self.log(f"removed {path.name}, a temporary left by an interrupted write")
            if resume_step is None:  # a resumed run's (its eval keys may differ) once its metrics are written
                self._write_config()
        self.log(self.splits.summary())
        self.log(
            f"model {self.model_name}: {sum(p.numel() for p in self.model.parameters()):,} parameters; "
            f"device {self.device}, amp {self.amp_dtype}, {self.dist.world_size} process(es)"
        )
        if resume_step is not None:
            stage = self.stages[start_stage].name if start_stage < len(self.stages) else "done"
            self.log(
                f"resumed from {self.checkpoint_dir / 'last.pt'} at step {resume_step} "
                f"(stage {stage}, epoch {start_epoch}, batch {consumed})"
            )

    def fit(self) -> bool:
        """Train all stages; False when a hook stopped the run (``train.stop_after_iters``)."""
        start_stage, start_epoch, consumed, sampler_state, resume_step = self._resume_point()
        self._start_logs(resume_step, start_stage, start_epoch, consumed)
        if self._finished_epoch is not None:  # resumed from an epoch's end: its evaluation, if a kill cut it short
            stage_index, epoch = self._finished_epoch
            offset = sum(s.epochs for s in self.stages[:stage_index])
            at = Position(stage_index, self.stages[stage_index], epoch, 0, 0, offset)
            next(hook for hook in self.hooks if isinstance(hook, PeriodicEvalHook)).complete(self, at)
        epoch_offset = sum(s.epochs for s in self.stages[:start_stage])
        for stage_index in range(start_stage, len(self.stages)):
            stage = self.stages[stage_index]
            for epoch in range(start_epoch if stage_index == start_stage else 1, stage.epochs + 1):
                if not self._run_epoch(Position(stage_index, stage, epoch, consumed, 0, epoch_offset), sampler_state):
                    return False
                consumed, sampler_state = 0, None
            epoch_offset += stage.epochs
        return True

    def _run_epoch(self, at: Position, sampler_state: Optional[dict]) -> bool:
        """Train epoch ``at.epoch`` from batch ``at.consumed``; False when a hook stopped the run."""
        stage = at.stage
        sampler = self.samplers[stage.sampler_kind]
        sampler.set_epoch(at.epoch)
        if sampler_state is not None:
            sampler.load_state_dict(sampler_state)
        at.total = len(sampler)  # the epoch's batch count: set_epoch draws them
        if not stage.per_iteration_schedule:
            for sch in stage.schedules.values():
                sch.step(at.epoch)
        self.bar = tqdm(
            total=at.total,
            initial=at.consumed,
            disable=not self.progress,
            leave=False,
            unit="it",
            desc=f"{stage.name} epoch {at.epoch}/{stage.epochs}",
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        for batch in self.loaders[stage.sampler_kind]:
            if stage.per_iteration_schedule:
                for sch in stage.schedules.values():
                    sch.step((at.epoch - 1) * at.total + at.consumed)
            self.global_step += 1
            at.consumed += 1
            try:
                losses = stage.step(self.step_context, batch)
            except ValueError as error:  # an op's "contains non-finite values", from weights an update broke
                if self.weights_finite():
                    raise
                raise self.diverged(f"the weights hold NaN or inf ({error})") from error
            self.bar.update(1)
            for hook in self.hooks:
                hook.after_step(self, at, losses)
            if self.stop_reason is not None:
                self.bar.close()
                self.log(self.stop_reason)
                return False
        self.bar.close()
        self.log(
            f"{stage.name} epoch {at.epoch}/{stage.epochs} done: {at.consumed} iterations in "
            f"{time.perf_counter() - started:.1f} s, lr {stage.optimizers['main'].param_groups[0]['lr']:.3e}"
        )
        for hook in self.hooks:
            hook.after_epoch(self, at)
        if self.stop_reason is not None:  # set by an epoch hook: before, the next step ran (or, last, the run ended)
            self.log(self.stop_reason)
            return False
        return True

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, out_dir: Optional[Path] = None, pictures: Optional[bool] = None) -> Optional[dict]:
        """Metrics on rank 0 (None on the other ranks), of the model rank 0 saves."""
        if out_dir is not None and self.run_folder is not None:  # rank 0: before it writes there
            self.run_folder.check_held()
        distributed.broadcast_buffers(self.model)
        return evaluate_with_config(
            self.model,
            self.splits,
            self.config,
            device=self.device,
            out_dir=out_dir,
            pictures=pictures,
            progress=self.progress,
            log=self.log,
        )

    def run(self) -> dict:
        try:
            self.setup()
            with self.preemption.handling():  # the loop alone: elsewhere SIGTERM ends the process at once, as before
                finished = self.fit()
            if not finished:
                return self._result(False, None)
            metrics = self.evaluate(out_dir=self.output_dir)
            if self.dist.is_main:
                self.run_folder.check_held()
                final = make_checkpoint(
                    self.model_name, self.model_args, self.recorded_config, self.model.state_dict(), metrics=metrics
                )
                save_checkpoint(self.checkpoint_dir / "final.pt", final)
                self._write_config()  # the config of final.pt and metrics.json
                self.run_log.plot_losses()
                self.log(f"final weights: {self.checkpoint_dir / 'final.pt'}")
            return self._result(True, metrics)
        finally:
            try:
                self.run_log.close()  # may fail (a full disk): the folder is released all the same
            finally:
                if self.run_folder is not None:
                    self.run_folder.release()

    def _result(self, finished: bool, metrics: Optional[dict]) -> dict:
        run = dict(finished=finished, global_step=self.global_step, metrics=metrics, output_dir=str(self.output_dir))
        return {**run, "stop_reason": self.stop_reason}

    @property
    def recorded_config(self) -> dict:
        """The config the run's config.yaml and checkpoints hold: without train.stop_after_iters, a kill rather
        than a setting of the run (kept, `--config <run>/config.yaml --resume` stopped at the same step again)."""
        return {**self.config, "train": {**self.config["train"], "stop_after_iters": None}}

    def _write_config(self) -> None:
        atomic_write_text(self.output_dir / "config.yaml", dump_config(self.recorded_config))


def train(
    config: dict, output_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, **kwargs
) -> dict:
    """Train (or resume) and evaluate; returns {"finished", "global_step", "metrics", "output_dir", "stop_reason"}
    (None when finished; a SIGTERM stops the run after its step, last.pt written there). A folder that holds an
    earlier run's checkpoints is refused unless `resume` (continue it; "auto": where it has a last.pt, else start)
    or `overwrite` (start over: its checkpoints and results are removed); one run at a time per folder."""
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(f"train: config must be a dict from load_config, got {type(config).__name__}")
    return Trainer(config, output_dir, resume=resume, overwrite=overwrite, **kwargs).run()
