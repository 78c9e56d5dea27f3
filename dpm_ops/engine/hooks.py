"""The training loop's position and its hooks: logging, checkpoints, periodic evaluation and the stop
(:class:`~.trainer.Trainer` runs them after every step and epoch, in that order, with the user's hooks
between logging and checkpoints, and preemption.py's SIGTERM stop after the checkpoints)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

from . import distributed
from .checkpoint import capture_rng_state, restore_rng_state
from .recipes import Stage

if TYPE_CHECKING:  # the trainer imports this module
    from .trainer import Trainer


@dataclasses.dataclass
class Position:
    """Where the loop is: stage ``stage_index``, ``epoch`` (1-based, within the stage), ``consumed``
    of the epoch's ``total`` batches; ``epoch_offset`` epochs of the earlier stages."""

    stage_index: int
    stage: Stage
    epoch: int
    consumed: int
    total: int
    epoch_offset: int

    @property
    def run_epoch(self) -> int:
        """The epoch counted across stages (logs, epoch_NNN.pt)."""
        return self.epoch_offset + self.epoch


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN / inf. Raised before a checkpoint would store such weights, so
    the checkpoints already written stay a run to go back to."""


class Hook:
    """Called by :meth:`Trainer.fit`; ``losses`` are the step's detached loss terms (floats only
    computed when someone reads them). Setting ``trainer.stop_reason`` ends the run unfinished."""

    def after_step(self, trainer: "Trainer", at: Position, losses: dict) -> None:
        pass

    def after_epoch(self, trainer: "Trainer", at: Position) -> None:
        pass


class LogHook(Hook):
    """Every ``train.log_period`` steps and at each epoch's last: the losses averaged over ranks,
    checked finite, to train_log.jsonl / train.log and the progress bar."""

    def after_step(self, trainer, at, losses):
        if trainer.global_step % trainer.config["train"]["log_period"] and at.consumed != at.total:
            return
        logged = distributed.mean_across_ranks({k: float(v) for k, v in losses.items()}, trainer.device)
        record = {
            "step": trainer.global_step,
            "epoch": at.run_epoch,
            "lr": at.stage.optimizers["main"].param_groups[0]["lr"],
            **logged,
        }
        if not all(math.isfinite(v) for v in logged.values()):
            raise trainer.diverged(f"non-finite loss {logged}")
        trainer.run_log.step(record, f"{at.stage.name} epoch {at.epoch} iter {at.consumed}/{at.total}")
        trainer.bar.set_postfix(loss=f"{logged['loss']:.3f}")


class CheckpointHook(Hook):
    """last.pt every ``train.checkpoint_every_iters`` steps (mid-epoch) and at each epoch end;
    epoch_NNN.pt every ``train.checkpoint_period`` epochs of the run (counted across its stages, as NNN is)."""

    def after_step(self, trainer, at, losses):
        every = trainer.config["train"]["checkpoint_every_iters"]
        if every and trainer.global_step % every == 0 and at.consumed < at.total:
            trainer.save(at, epoch_done=False)

    def after_epoch(self, trainer, at):
        period = trainer.config["train"]["checkpoint_period"]
        keep = (f"epoch_{at.run_epoch:03d}.pt",) if period and at.run_epoch % period == 0 else ()
        trainer.save(at, epoch_done=True, extra_names=keep)


class PeriodicEvalHook(Hook):
    """Evaluation every ``train.eval_period`` epochs of the run (counted across its stages; the final one is the
    run's own), into eval_epoch_NNN/. It runs after the epoch's last.pt: a resumed run whose checkpoint ended an
    epoch calls ``complete`` for it."""

    def after_epoch(self, trainer, at):
        period = trainer.config["train"]["eval_period"]
        last = at.stage_index == len(trainer.stages) - 1 and at.epoch == at.stage.epochs
        # a run stopping (SIGTERM) leaves it to its resumption, as a kill during it would
        if period and at.run_epoch % period == 0 and not last and trainer.stop_reason is None:
            rng = capture_rng_state()  # evaluation must not shift the training's random streams
            trainer.evaluate(out_dir=self.folder(trainer, at), pictures=False)
            restore_rng_state(rng)

    def complete(self, trainer, at) -> None:
        """Epoch ``at``'s evaluation where a kill cut it short (its metrics.json absent): the weights are the
        checkpoint's, those it would have evaluated."""
        # rank 0's folder decides (evaluation is collective; other ranks' file systems may not hold the run)
        if distributed.all_gather_object(not (self.folder(trainer, at) / "metrics.json").is_file())[0]:
            self.after_epoch(trainer, at)

    @staticmethod
    def folder(trainer, at) -> Path:
        return trainer.output_dir / f"eval_epoch_{at.run_epoch:03d}"


class StopHook(Hook):
    """``train.stop_after_iters``: behaves like a kill (nothing saved beyond the last checkpoint)."""

    def after_step(self, trainer, at, losses):
        stop_after = trainer.config["train"]["stop_after_iters"]
        if stop_after is not None and trainer.global_step >= stop_after:
            trainer.stop_reason = f"stopped after {trainer.global_step} iterations (train.stop_after_iters)"
