"""CMC curves and the trainer's loss curves."""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import numpy as np

from ..ops._checks import is_finite_real
from ._common import _array, _check_out_png, _new_figure, _save


def _cmc_percent(name: str, value) -> np.ndarray:
    """A CMC in percent from an evaluate_model subset dict, a RankResult or an array
    (fractions in [0, 1] as RankResult.cmc, or percent when any value exceeds 1)."""
    if isinstance(value, Mapping):
        if "cmc" not in value:
            raise ValueError(f"{name} has no 'cmc' curve")
        curve = _array(name, value["cmc"], 1, np.float64)  # evaluate_model's curves are in percent
    else:
        is_result = hasattr(value, "cmc")  # a RankResult: fractions
        curve = _array(name, value.cmc if is_result else value, 1, np.float64)
        percent = not is_result and curve.size > 0 and curve.max() > 1.0
        if not percent:
            curve = curve * 100.0
    if curve.size == 0:
        raise ValueError(f"{name} is an empty CMC curve")
    if curve.min() < 0 or curve.max() > 100.0 + 1e-6 or np.any(np.diff(curve) < -1e-9):
        raise ValueError(f"{name} is not a CMC curve (non-decreasing, within [0, 1] or [0, 100] %)")
    return curve


def plot_cmc(metrics_or_cmc, out_png, *, title: Optional[str] = None) -> str:
    """Plot CMC curves (matching rate in % against rank) to ``out_png`` (600 x 400 px).

    ``metrics_or_cmc``: the dict ``evaluate_model`` returns (one curve per query subset), a
    ``RankResult``, one curve (array, fractions as ``RankResult.cmc`` or percent), one subset's dict
    (``metrics["all"]``: its "cmc" in percent), or a dict of name -> curve / RankResult.
    """
    _check_out_png(out_png)
    if isinstance(metrics_or_cmc, Mapping) and "cmc" in metrics_or_cmc:  # one subset's metrics, e.g. metrics["all"]
        curves = {"CMC": _cmc_percent("metrics_or_cmc", metrics_or_cmc)}
    elif isinstance(metrics_or_cmc, Mapping):
        curves = {
            name: _cmc_percent(f"metrics_or_cmc[{name!r}]", value)
            for name, value in metrics_or_cmc.items()
            if not (isinstance(value, Mapping) and "cmc" not in value)
        }  # skip e.g. "settings"
        if not curves:
            raise ValueError("metrics_or_cmc holds no CMC curve")
    else:
        curves = {"CMC": _cmc_percent("metrics_or_cmc", metrics_or_cmc)}
    fig = _new_figure(600, 400)
    ax = fig.add_axes((0.11, 0.13, 0.85, 0.78))
    for name, curve in curves.items():
        ranks = np.arange(1, len(curve) + 1)
        ax.plot(
            ranks, curve, marker="o" if len(curve) <= 20 else None, markersize=3, label=f"{name} (R1 {curve[0]:.1f}%)"
        )
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    longest = max(len(c) for c in curves.values())
    ax.set_xlim((1, longest) if longest > 1 else (0.5, 1.5))  # one rank: (1, 1) was a degenerate axis
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "CMC")
    return _save(fig, out_png)


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped); ValueError naming file and line."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"jsonl_path must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"jsonl_path: no such file: {path}")
    records = []
    with open(path, encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from error
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from None
    return records


def plot_loss_curves(jsonl_path, out_png, *, title: Optional[str] = None) -> str:
    """Plot every loss field (``loss`` and ``loss/<component>``) of the trainer's
    ``train_log.jsonl`` against ``step``, and ``lr`` on a second y axis, to ``out_png``
    (800 x 450 px). Lines without ``step`` (e.g. evaluation records) are ignored; a field
    missing from some lines is drawn through the lines that have it."""
    _check_out_png(out_png)
    records = [r for r in read_jsonl(jsonl_path) if "step" in r]
    series: dict[str, tuple[list, list]] = {}
    lr_steps, lrs = [], []
    for record in records:
        step = record["step"]
        if not is_finite_real(step):
            raise ValueError(f"{jsonl_path}: step must be a number, got {step!r}")
        for key, value in record.items():
            if (key == "loss" or key.startswith("loss/")) and is_finite_real(value):
                series.setdefault(key, ([], []))
                series[key][0].append(step)
                series[key][1].append(value)
        if is_finite_real(record.get("lr")):
            lr_steps.append(step)
            lrs.append(record["lr"])
    if not series:
        raise ValueError(f"{jsonl_path}: no line has a numeric 'step' and a 'loss' or 'loss/<name>' field")
    fig = _new_figure(800, 450)
    ax = fig.add_axes((0.08, 0.12, 0.78, 0.78))
    for key in sorted(series, key=lambda k: (k != "loss", k)):  # total first, thicker
        steps, values = series[key]
        ax.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        twin = ax.twinx()
        (line,) = twin.plot(lr_steps, lrs, color="black", linestyle="--", linewidth=1.0, label="lr")
        twin.set_ylabel("learning rate")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles.append(line)
        labels.append("lr")
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(title or f"training losses ({os.path.basename(os.fspath(jsonl_path))})")
    return _save(fig, out_png)
