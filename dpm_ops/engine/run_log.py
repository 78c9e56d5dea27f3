"""A run's logs (rank 0): ``train.log`` (text, also echoed to a stream) and ``train_log.jsonl`` (one
JSON object per logged step: ``step``, ``epoch``, ``lr``, ``loss``, ``loss/<term>``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .checkpoint import CheckpointError, atomic_write_text, naming


class RunLog:
    def __init__(self, output_dir: Path, stream, enabled: bool):
        self.output_dir, self.stream, self.enabled = output_dir, stream, enabled
        self._text = None
        self._jsonl = None

    def open(self, resume_step: Optional[int]) -> None:
        """Start both files, or continue them from step ``resume_step`` of a resumed run."""
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.output_dir / "train_log.jsonl"
        if resume_step is not None and jsonl.is_file():
            # drop records past the checkpoint: the resumed run logs those steps again
            kept = [line for line, step in _logged_steps(jsonl) if step <= resume_step]
            # atomically: a run killed while it rewrites keeps the whole earlier log
            atomic_write_text(jsonl, "".join(line + "\n" for line in kept))
        elif jsonl.exists():
            jsonl.unlink()
        self._jsonl = open(jsonl, "a", encoding="utf-8")
        self._text = open(self.output_dir / "train.log", "a" if resume_step is not None else "w", encoding="utf-8")

    def close(self) -> None:
        """Both files closed; the first one's failure to flush (a full disk) raised after, naming it."""
        handles, self._jsonl, self._text = (self._jsonl, self._text), None, None
        failed = None
        for handle in handles:
            if handle is not None:
                try:
                    with naming(handle.name):
                        handle.close()
                except OSError as error:
                    failed = failed or error
        if failed is not None:
            raise failed

    def plot_losses(self) -> None:
        """loss_curves.png beside train_log.jsonl (rank 0, after the run)."""
        from dpm_ops.visualize import plot_loss_curves

        jsonl = self.output_dir / "train_log.jsonl"
        if jsonl.is_file() and jsonl.stat().st_size:
            plot_loss_curves(str(jsonl), str(self.output_dir / "loss_curves.png"))

    def message(self, text: str) -> None:
        """A line in train.log and on the stream."""
        if not self.enabled:
            return
        self._write_text(text)
        tqdm.write(text, file=self.stream)

    def step(self, record: dict, where: str) -> None:
        """One logged step: its JSONL record and a train.log line (not echoed: the progress bar shows it)."""
        if self._jsonl is None:
            return
        with naming(self._jsonl.name):
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss/"))
        self._write_text(f"{where} step {record['step']} lr {record['lr']:.3e} loss {record['loss']:.4f} ({terms})")

    def _write_text(self, text: str) -> None:
        if self._text is not None:
            with naming(self._text.name):
                self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
                self._text.flush()


def _logged_steps(jsonl: Path) -> list[tuple[str, int]]:
    """(line, step) of each record of a run's train_log.jsonl. Its unreadable tail is dropped: a line torn by a
    crash or a full disk (records are flushed, not synced), whose steps the resumed run logs again; an unreadable
    line before a readable one is a CheckpointError naming the file and the line."""
    records, torn = [], None
    for number, line in enumerate(jsonl.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
            if not isinstance(step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            torn = torn or number
            continue
        if torn is not None:
            raise CheckpointError(f"{jsonl}: line {torn} is not a logged step's JSON record; remove it to resume")
        records.append((line, step))
    return records
