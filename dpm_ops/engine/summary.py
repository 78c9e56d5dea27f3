"""The metrics of several runs summarized (``dpm-reid summary``): the mean and sample standard deviation of each
metric over a dataset's splits, a run each (``dataset.split_id``: VIPeR's and CUHK01's 20, the others' 10,
CUHK03's classic 20), the number their papers report. The runs must have been scored alike (every setting of
their metrics.json but the query and gallery sizes and the weights file the same), on the same test sets, each on
a split of its own."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import yaml

from dpm_ops.ops._checks import quote

METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
VARYING_SETTINGS = ("num_query", "num_gallery", "weights")  # a split's sizes, the checkpoint scored


class SummaryError(ValueError):
    """Runs that cannot be summarized together, named with the reason."""


def read_run(path: str | os.PathLike) -> tuple[dict, Optional[int]]:
    """(``{test set: its metrics.json}``, the split id of the run's config.yaml or None) of a run folder, an
    evaluation's folder or a metrics.json file."""
    path = Path(os.path.expanduser(path))
    file = path / "metrics.json" if path.is_dir() else path
    try:
        metrics = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SummaryError(f"{path}: no metrics.json (a finished run's folder, an evaluation's or the file)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SummaryError(f"{file}: not a metrics.json: {error}") from None
    if not isinstance(metrics, dict) or not metrics:
        raise SummaryError(f"{file}: not a metrics.json (a JSON object of metrics), got {quote(metrics)}")
    sets = {metrics.get("settings", {}).get("dataset", "test set"): metrics} if "all" in metrics else metrics
    for name, scored in sets.items():
        if not isinstance(scored, dict) or not isinstance(scored.get("all"), dict):
            raise SummaryError(f"{file}: the metrics of {name} lack their 'all' queries' entry")
        missing = [key for key in METRICS if not isinstance(scored["all"].get(key), (int, float))]
        if missing:
            raise SummaryError(f"{file}: the metrics of {name} lack {', '.join(missing)}")
    return sets, _split_id(file.parent)


def _split_id(folder: Path) -> Optional[int]:
    """The split a folder scored: ``split_<id>`` (``dpm-reid eval --splits``), else the dataset.split_id of its
    run's config.yaml (beside metrics.json, or above an evaluation's folder)."""
    named = re.fullmatch(r"split_([0-9]+)", folder.name)
    if named:
        return int(named.group(1))
    for config in (folder / "config.yaml", folder.parent / "config.yaml"):
        try:
            data = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        dataset = data.get("dataset") if isinstance(data, dict) else None
        return dataset.get("split_id") if isinstance(dataset, dict) else None
    return None


def summarize_runs(paths: Sequence[str | os.PathLike], split_ids: Optional[Sequence[int]] = None) -> dict:
    """``{"runs": [...], "split_ids": [...], "sets": {set: {subset: {metric: {"mean", "std", "values"}}}}}`` of
    two or more runs (``read_run``'s paths; ``split_ids``: their splits, where their folders do not say): every
    subset (all, clean, occluded) that each run has; ``std`` the sample standard deviation (n - 1)."""
    if isinstance(paths, (str, os.PathLike)) or len(paths) < 2:
        raise SummaryError(f"give two or more runs to summarize, got {quote(paths)}")
    runs = [read_run(path) for path in paths]
    names = [str(path) for path in paths]
    _check_alike(names, [sets for sets, _ in runs])
    split_ids = list(split_ids) if split_ids is not None else [split for _, split in runs]
    for index, split in enumerate(split_ids):
        if split is not None and split in split_ids[:index]:
            first = names[split_ids.index(split)]
            raise SummaryError(f"{first} and {names[index]} both tested split {split}: each split once")
    summary = {}
    for name in runs[0][0]:
        scored = [sets[name] for sets, _ in runs]
        subsets = [key for key, value in scored[0].items() if isinstance(value, dict) and "mAP" in value]
        summary[name] = {
            subset: {metric: _statistics([run[subset][metric] for run in scored]) for metric in METRICS}
            for subset in subsets
            if all(subset in run for run in scored)
        }
    return {"runs": names, "split_ids": split_ids, "sets": summary}


def _check_alike(names: list[str], runs: list[dict]) -> None:
    """The same test sets, scored with the same settings (but for the sizes and weights that vary)."""
    for name, sets in zip(names[1:], runs[1:]):
        if list(sets) != list(runs[0]):
            raise SummaryError(f"{names[0]} is tested on {', '.join(runs[0])}, {name} on {', '.join(sets)}")
        for test in sets:
            first, other = (
                {k: v for k, v in run[test].get("settings", {}).items() if k not in VARYING_SETTINGS}
                for run in (runs[0], sets)
            )
            differ = sorted(key for key in first.keys() | other.keys() if first.get(key) != other.get(key))
            if differ:
                key = differ[0]
                raise SummaryError(
                    f"{names[0]} and {name} were scored differently on {test}: {key} {quote(first.get(key))} and "
                    f"{quote(other.get(key))}"
                )


def _statistics(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    return {"mean": mean, "std": std, "values": values}


def format_summary(summary: dict) -> str:
    """A table per test set and subset: a row per run (as given, with its split where known), then the mean and the
    std."""
    names = [
        name + (f" (split {split})" if split is not None else "")
        for name, split in zip(summary["runs"], summary["split_ids"])
    ]
    width = max(10, *(len(name) + 2 for name in names))
    header = f"{'run':<{width}}" + "".join(f"{title:>9}" for title in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"))
    lines = []
    for test, subsets in summary["sets"].items():
        for subset, metrics in subsets.items():
            lines += ["", f"{test}, {subset} queries:", header, "-" * len(header)]
            for index, name in enumerate(names):
                lines.append(f"{name:<{width}}" + "".join(f"{metrics[m]['values'][index]:>9.1f}" for m in METRICS))
            lines.append("-" * len(header))
            for statistic in ("mean", "std"):
                lines.append(f"{statistic:<{width}}" + "".join(f"{metrics[m][statistic]:>9.1f}" for m in METRICS))
    return "\n".join(lines[1:])
