"""Several datasets trained on as one (fast-reid's ``DATASETS.NAMES``, torchreid's ``sources``), and a dataset's
query and gallery identities trained on too (``combineall``, as both peers call it)."""

from __future__ import annotations

import os
from typing import Sequence

from dpm_ops.ops._checks import quote

from .errors import DatasetError
from .records import ImageRecord, ReIDSplits


def combine_datasets(sources: list[ReIDSplits] | tuple[ReIDSplits, ...], *, combineall: bool = False) -> ReIDSplits:
    """One training set of ``sources``' train splits, in their order: each source's labels follow the previous
    sources' (0..N-1 over them all) and so do its camera ids, so that the model's camera embeddings (SIE) tell
    the sources' cameras apart (torchreid's numbering of combined sources).

    ``combineall`` also trains on each source's query and gallery identities, labelled after its train ones in
    the order of their pids (an identity in both splits is one label); distractor images (Market-1501's pid 0,
    ``distractor_pids``) are left out: torchreid's and fast-reid's ``combineall``. It needs the sources loaded
    with their query and gallery (a set without a test split, ``train_only``, adds its train split).

    The result has no query or gallery: a combined set is tested on another one (``dataset.test_name``).
    Its ``train_pid_map`` maps each label to itself (the sources' original pids collide)."""
    if not isinstance(sources, (list, tuple)) or not sources or not all(isinstance(s, ReIDSplits) for s in sources):
        raise DatasetError(f"combine_datasets takes a non-empty list of ReIDSplits, got {quote(sources)}")
    names = [s.name for s in sources]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise DatasetError(f"combine_datasets: {repeated} is given twice (its images would count twice)")
    if combineall:
        untested = next((s.name for s in sources if not (s.query and s.gallery or s.train_only)), None)
        if untested is not None:
            raise DatasetError(f"combine_datasets with combineall: {untested} was loaded without its query and gallery")
    with_masks = [s.mask_paths is not None for s in sources]
    if any(with_masks) and not all(with_masks):
        raise DatasetError("combine_datasets: some sources were loaded with masks and some without")
    train: list[ImageRecord] = []
    label_offset = camera_offset = 0
    starts = []
    for source in sources:
        starts.append(label_offset)
        records = _identities(source, combineall)
        if not records:
            raise DatasetError(
                f"combine_datasets: {source.name} adds no training images (a test-only set adds its query and "
                "gallery identities with combineall)"
            )
        train += [ImageRecord(r.path, r.pid + label_offset, r.camid + camera_offset) for r in records]
        label_offset += len({r.pid for r in records})
        camera_offset += source.num_cams
    return ReIDSplits(
        name=combined_name(names, combineall),
        root=os.path.commonpath([os.path.abspath(s.root) for s in sources]),
        train=train,
        query=[],
        gallery=[],
        num_cams=camera_offset,
        train_pid_map={label: label for label in range(label_offset)},
        source_labels=tuple(starts),
        mask_paths={k: v for s in sources for k, v in s.mask_paths.items()} if all(with_masks) else None,
        junk_dropped=sum(s.junk_dropped for s in sources),
    )


def combined_name(names: Sequence[str], combineall: bool) -> str:
    """The name of a set combined from the datasets ``names``: ``market1501+dukemtmc``, ``msmt17_all``."""
    return "+".join(f"{name}_all" if combineall else name for name in names)


def _identities(source: ReIDSplits, combineall: bool) -> list[ImageRecord]:
    """``source``'s train records (labels 0..N-1) and, with ``combineall``, its query and gallery records labelled
    N.. in the order of their pids, distractors left out."""
    if not combineall:
        return list(source.train)
    tested = [r for r in (*source.query, *source.gallery) if r.pid not in source.distractor_pids]
    first = source.num_train_pids
    labels = {pid: first + index for index, pid in enumerate(sorted({r.pid for r in tested}))}
    return [*source.train, *(r._replace(pid=labels[r.pid]) for r in tested)]
