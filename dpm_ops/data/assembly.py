"""The common tail of every dataset loader: drop junk, relabel train pids 0..N-1, check the split
counts against the published ones, attach the foreground masks, optionally verify every file. And
the public loader of a layout table's row (:func:`row_loader`)."""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, Iterable, Optional

from PIL import Image, UnidentifiedImageError

from .errors import DatasetCountWarning, DatasetError
from .masks import build_mask_index
from .parsing import JUNK_PID
from .records import ImageRecord, ReIDSplits

COUNT_POLICIES = ("warn", "error", "off")


def _relabel(train: list[ImageRecord]) -> tuple[list[ImageRecord], dict[int, int]]:
    pid_map = {pid: label for label, pid in enumerate(sorted({r.pid for r in train}))}
    return [r._replace(pid=pid_map[r.pid]) for r in train], pid_map


def _check_counts(name: str, splits: dict[str, list[ImageRecord]], expected: dict, policy: str) -> None:
    if policy not in COUNT_POLICIES:
        raise ValueError(f"check_counts must be one of {COUNT_POLICIES}, got {policy!r}")
    if policy == "off":
        return
    for split_name, (want_ids, want_images) in expected.items():
        records = splits[split_name]
        ids, images = len({r.pid for r in records}), len(records)
        if (ids, images) == (want_ids, want_images):
            continue
        message = (
            f"{name} {split_name}: found {ids} ids / {images} images, the full dataset has "
            f"{want_ids} ids / {want_images} images"
        )
        if policy == "error":
            raise DatasetError(message)
        warnings.warn(message + " (partial copy?)", DatasetCountWarning, stacklevel=4)


def _verify_readable(paths: Iterable[str], kind: str) -> None:
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise DatasetError(f"unreadable {kind}: {path} ({error})") from error


def _assemble(
    name: str,
    dataset_dir: str,
    *,
    train: list[ImageRecord],
    query: list[ImageRecord],
    gallery: list[ImageRecord],
    num_cams: int,
    expected_counts: Optional[dict],
    check_counts: str,
    with_masks: bool,
    mask_root: Optional[str],
    verify_images: bool,
    occluded_paths: Optional[frozenset[str]] = None,
    multi_query: Optional[list[ImageRecord]] = None,
) -> ReIDSplits:
    """Drop junk, relabel train, check counts, attach masks: the common tail of every loader."""
    all_images = sorted({r.path for r in (*train, *query, *gallery, *(multi_query or ()))})
    junk = sum(r.pid == JUNK_PID for r in (*train, *query, *gallery))
    train, query, gallery = ([r for r in split if r.pid != JUNK_PID] for split in (train, query, gallery))
    for split_name, split in (("query", query), ("gallery", gallery)):
        if not split:
            raise DatasetError(f"{name}: the {split_name} split of {dataset_dir} is empty")
    if expected_counts:
        _check_counts(name, {"train": train, "query": query, "gallery": gallery}, expected_counts, check_counts)
    train, pid_map = _relabel(train)

    mask_paths = None
    if with_masks:
        mask_paths = build_mask_index(all_images, dataset_dir, mask_root)
    if verify_images:
        _verify_readable(all_images, "image")
        if mask_paths is not None:
            _verify_readable(mask_paths.values(), "mask")
    return ReIDSplits(
        name=name,
        root=dataset_dir,
        train=train,
        query=query,
        gallery=gallery,
        num_cams=num_cams,
        train_pid_map=pid_map,
        mask_paths=mask_paths,
        occluded_paths=occluded_paths,
        junk_dropped=junk,
        multi_query=multi_query,
    )


def row_loader(load_row: Callable[..., ReIDSplits], row, omit: tuple = ()) -> Callable[..., ReIDSplits]:
    """The public loader ``loader(root, **options)`` of one layout-table ``row`` (with ``name`` and
    ``about``, its docstring): ``load_row(row, root, **options)``. Its signature, which
    ``dataset_options`` reads, is ``load_row``'s without ``row`` and the options in ``omit``."""
    parameters = list(inspect.signature(load_row).parameters.values())[1:]
    signature = inspect.Signature([p for p in parameters if p.name not in omit])

    def load(root: str, **options) -> ReIDSplits:
        signature.bind(root, **options)  # an option the row lacks is a TypeError, as for a def
        return load_row(row, root, **options)

    load.__signature__ = signature
    load.__name__ = load.__qualname__ = f"load_{row.name}"
    load.__doc__ = row.about
    return load
