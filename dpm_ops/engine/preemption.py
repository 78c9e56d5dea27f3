"""A graceful stop on SIGTERM: what a cluster sends before it kills a job (SLURM's scancel, its preemption and
time limit with ``--signal``, Kubernetes' pod eviction; torchrun forwards it to every rank). The run finishes its
step, writes ``last.pt`` there and stops (every rank at the same step), so that ``--resume`` loses no work; without
it the process died at once, losing everything since the last checkpoint. A second SIGTERM kills at once. Under
torchrun the ranks agree on it with one small all-reduce per step."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from . import distributed
from .hooks import Hook


class PreemptionHook(Hook):
    """Turns a SIGTERM received while :meth:`handling` is open into the run's stop after the current step: a mid-epoch
    step writes ``last.pt`` (unless the step wrote it already), an epoch's last step leaves it to the epoch's own
    checkpoint; the periodic evaluation is left to the resumed run (``PeriodicEvalHook.complete``)."""

    REASON = "stopped by SIGTERM"

    def __init__(self) -> None:
        self.received = False

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """SIGTERM sets ``received`` inside the block (the main thread's handler, restored after). Elsewhere, or where
        the process does not take SIGTERM's default action (ignored, or a handler of the caller's own), nothing
        changes."""
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or previous is not signal.SIG_DFL:
            yield
            return

        def handler(signum, frame):
            self.received = True
            signal.signal(signal.SIGTERM, previous)  # a second SIGTERM: the action the process had before

        signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _stopping(self, trainer) -> bool:
        # every rank stops at the same step (its checkpoint is collective), where any rank got the signal
        return distributed.any_rank(self.received, trainer.device)

    def after_step(self, trainer, at, losses):
        if at.consumed == at.total or not self._stopping(trainer):
            return  # an epoch's last step: after_epoch, after the epoch's checkpoint
        if trainer.saved_step != trainer.global_step:
            trainer.save(at, epoch_done=False)
        self._stop(trainer)

    def after_epoch(self, trainer, at):
        if self._stopping(trainer):
            self._stop(trainer)  # after the epoch's checkpoint

    def _stop(self, trainer) -> None:
        trainer.stop_reason = f"{self.REASON} after {trainer.global_step} iterations: last.pt written there"
