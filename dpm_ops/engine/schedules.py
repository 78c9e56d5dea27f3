"""Learning-rate schedules of the recipes, as pure functions plus a small stateful wrapper.

* ``warmup_cosine``: timm's ``CosineLRScheduler`` as DPM / TransReID configure it (their solver/scheduler_factory.py):
  ``t_initial = E`` epochs, ``warmup_t = W``, ``warmup_lr_init = warmup_factor · base_lr``,
  ``lr_min = min_lr_factor · base_lr`` (one absolute value for every group), cycle_limit 1, stepped
  with the epoch number t = 1..E at the start of each epoch:

      t < W:       init + t · (v − init) / W
      W <= t < E:  lr_min + ½ (v − lr_min)(1 + cos(π t / E))      (no warmup offset)
      t >= E:      lr_min

  where v is the group's own lr (weights base_lr, biases base_lr · bias_lr_factor).
* ``poly``: ``v · (1 − t / T)^power`` (MaskReID's DGD-style fine-tuning), stepped per iteration.
* ``constant``: v (DPM's mask-generator optimizer has no scheduler at all).
"""

from __future__ import annotations

import math

import torch

from dpm_ops.ops._checks import check_int, check_real

SCHEDULES = ("warmup_cosine", "poly", "constant")
_WARMUP_COSINE = ("warmup", "warmup_init", "lr_min")  # the settings warmup_cosine alone reads
# the settings each kind leaves unread: a resumed run compares only the others (a run whose config held another
# kind's, kept and never used, resumes)
_UNREAD = {"warmup_cosine": ("power",), "poly": _WARMUP_COSINE, "constant": ("power", *_WARMUP_COSINE)}


def warmup_cosine_lr(value: float, t: int, total: int, warmup: int, warmup_init: float, lr_min: float) -> float:
    if t < warmup:
        return warmup_init + t * (value - warmup_init) / warmup
    if t >= total:
        return lr_min
    return lr_min + 0.5 * (value - lr_min) * (1.0 + math.cos(math.pi * t / total))


def poly_lr(value: float, t: int, total: int, power: float) -> float:
    return value * max(0.0, 1.0 - t / total) ** power


class LRSchedule:
    """Sets every group's lr from its ``initial_lr`` and a step counter ``t``.

    ``step(t)`` is absolute (like timm's ``step(epoch)``), so a resumed run only needs ``t``;
    ``state_dict`` still records it with the settings, and ``load_state_dict`` checks they match.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str,
        total: int,
        *,
        base_lr: float,
        warmup: int = 0,
        warmup_factor: float = 0.01,
        min_lr_factor: float = 0.002,
        power: float = 0.5,
    ):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        total = check_int("LRSchedule", "total", total, 1)
        # the config's bounds on the same settings (solver.*): a negative power divided by zero at the end
        base_lr = check_real("LRSchedule", "base_lr", base_lr, 0, low_open=True)
        warmup = check_int("LRSchedule", "warmup", warmup, 0)
        warmup_factor = check_real("LRSchedule", "warmup_factor", warmup_factor, 0, 1, low_open=True)
        min_lr_factor = check_real("LRSchedule", "min_lr_factor", min_lr_factor, 0, 1)
        self.optimizer, self.kind, self.total = optimizer, kind, total
        self.warmup = warmup
        self.warmup_init = warmup_factor * base_lr
        self.lr_min = min_lr_factor * base_lr
        self.power = check_real("LRSchedule", "power", power, 0, low_open=True)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.t = 0
        self.step(0)  # timm sets warmup_lr_init at construction

    def lr_at(self, value: float, t: int) -> float:
        if self.kind == "warmup_cosine":
            return warmup_cosine_lr(value, t, self.total, self.warmup, self.warmup_init, self.lr_min)
        if self.kind == "poly":
            return poly_lr(value, t, self.total, self.power)
        return value

    def step(self, t: int) -> None:
        self.t = check_int("LRSchedule", "t", t, 0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(group["initial_lr"], self.t)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "total": self.total,
            "t": self.t,
            "warmup": self.warmup,
            "warmup_init": self.warmup_init,
            "lr_min": self.lr_min,
            "power": self.power,
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "t" not in state:
            raise ValueError(
                f"LRSchedule: a state must be the dict of LRSchedule.state_dict(), got {type(state).__name__}"
            )
        mine = self.state_dict()
        differ = [k for k in mine if k != "t" and k not in _UNREAD[self.kind] and state.get(k) != mine[k]]
        if differ:
            raise ValueError(f"schedule settings differ from the checkpoint's: {', '.join(differ)}")
        self.step(state["t"])
