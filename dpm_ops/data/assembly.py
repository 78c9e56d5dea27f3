"""The common tail of every dataset loader: drop junk, relabel train pids 0..N-1, check the split
counts against the published ones, attach the foreground masks, verify every file (decoded, on a
thread pool). The check that a run's query/gallery can be evaluated (:func:`check_query_matches`),
and the public loader of a layout table's row (:func:`row_loader`)."""

from __future__ import annotations

import inspect
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional, Sequence, TypeVar

from dpm_ops.ops._checks import quote

from .._stack import stacklevel_outside
from .errors import DatasetCountWarning, DatasetError
from .image_io import MASK_THRESHOLD, check_mask_size, decoded
from .masks import build_mask_index
from .parsing import JUNK_PID
from .records import ImageRecord, ReIDSplits

COUNT_POLICIES = ("warn", "error", "off")
VERIFY_THREADS = 16  # decoding threads, at most one per usable CPU

T = TypeVar("T")


def _relabel(train: list[ImageRecord]) -> tuple[list[ImageRecord], dict[int, int]]:
    pid_map = {pid: label for label, pid in enumerate(sorted({r.pid for r in train}))}
    return [r._replace(pid=pid_map[r.pid]) for r in train], pid_map


def check_count_policy(policy) -> None:
    if policy not in COUNT_POLICIES:
        raise DatasetError(f"check_counts must be one of {COUNT_POLICIES}, got {quote(policy)}")


def check_wanted_splits(train_split: bool, test_splits: bool) -> None:
    """A loader's ``train_split`` / ``test_splits``: each True or False ("no" read as true), not both False."""
    for flag, value in (("train_split", train_split), ("test_splits", test_splits)):
        if not isinstance(value, bool):
            raise DatasetError(f"dataset option {flag} must be True or False, got {quote(value)}")
    if not (train_split or test_splits):
        raise DatasetError("train_split=False and test_splits=False leave nothing to load")


_HERE = os.path.dirname(os.path.abspath(__file__))  # a count warning points past the loaders, at their caller


def _check_counts(name: str, splits: dict[str, list[ImageRecord]], expected: dict, policy: str) -> None:
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
        warnings.warn(message + " (partial copy?)", DatasetCountWarning, stacklevel=stacklevel_outside(_HERE))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_all(check: Callable[[T], None], items: Iterable[T]) -> None:
    """``check`` every item on a thread pool (Pillow decodes without the GIL) and raise the error of
    the first failing item in order, without waiting for the items after it."""
    pool = ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, _usable_cpus()))
    try:
        for _ in pool.map(check, items):
            pass
    finally:
        pool.shutdown(cancel_futures=True)


def _decodes(path: str, kind: str) -> tuple[int, int]:
    """The (width, height) of the file, decoded whole: a header check passes truncated files."""
    with decoded(path, kind) as image:
        return image.size


def _verify_readable(paths: Iterable[str], kind: str) -> None:
    """Decode every file of ``paths``; the first that fails is a DatasetError naming it."""
    _check_all(lambda path: _decodes(path, kind), paths)


def verify_splits(splits: ReIDSplits, *, train: bool = True) -> None:
    """Decode every image the splits use (train unless ``train=False``, query, gallery, multi-query
    pools) and, with masks, its mask, checking that it has the image's size: a bad file is named
    before any long work instead of in a data loader hours later. The images are not kept."""
    records = (*(splits.train if train else ()), *splits.query, *splits.gallery, *(splits.multi_query or ()))
    paths = list(dict.fromkeys(r.path for r in records))
    mask_paths = splits.mask_paths
    with_foreground = []  # masks with a foreground pixel (list.append is atomic across the pool's threads)

    def check(path: str) -> None:
        size = _decodes(path, "image")
        if mask_paths is not None:
            if path not in mask_paths:
                raise DatasetError(f"image has no mask: {path}")
            with decoded(mask_paths[path], "mask") as mask:
                check_mask_size(mask_paths[path], mask.size, size)
                if mask.convert("L").getextrema()[1] >= MASK_THRESHOLD:
                    with_foreground.append(path)

    _check_all(check, paths)
    if mask_paths is not None and paths and not with_foreground:  # every masked image would be black
        raise DatasetError(
            f"every mask of {splits.name} is all background (no value >= {MASK_THRESHOLD}): masks mark the person "
            "with 255 (a 0 / 1 label PNG reads as background: scale it by 255)"
        )


def check_query_matches(splits: ReIDSplits) -> None:
    """Evaluation ranks each query against the gallery images of its id on another camera; with no
    such image for any query there is nothing to evaluate, which is found here from the ids and
    cameras instead of after training."""
    gallery_cameras: dict[int, set[int]] = {}
    for record in splits.gallery:
        gallery_cameras.setdefault(record.pid, set()).add(record.camid)
    if any(gallery_cameras.get(r.pid, set()) - {r.camid} for r in splits.query):
        return
    shared = {r.pid for r in splits.query} & set(gallery_cameras)
    if not shared:
        problem = "none of the query ids is in the gallery"
    else:
        problem = (
            f"the {len(shared)} query id(s) in the gallery are there only on the query's own camera "
            "(same-camera images are not matches; a one-camera set?)"
        )
    raise DatasetError(
        f"{splits.name} at {splits.root}: no query has a match in the gallery (the same id on another "
        f"camera), so it cannot be evaluated: {problem}"
    )


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
    distractor_pids: frozenset[int] = frozenset(),
    unused: Sequence[str] = (),
    train_split: bool = True,
    test_splits: bool = True,
    train_only: bool = False,
) -> ReIDSplits:
    """Drop junk, relabel train, check counts, attach masks: the common tail of every loader. ``unused``: images
    in the splits' folders that no split takes (MSMT17's val without include_val), whose masks may be there.
    ``test_splits=False``: the train split alone (query and gallery not read: a run tested on another set);
    ``train_split=False``: query and gallery alone (an evaluation, whose model comes from its checkpoint);
    ``train_only``: a set without a test split (its query and gallery never read, whatever ``test_splits``). The
    counts checked are those of the splits read."""
    check_count_policy(check_counts)
    test_splits = test_splits and not train_only
    read = {"train": train_split, "query": test_splits, "gallery": test_splits}
    if expected_counts:
        expected_counts = {split: counts for split, counts in expected_counts.items() if read[split]} or None
    all_images = sorted({r.path for r in (*train, *query, *gallery, *(multi_query or ()))})
    junk = sum(r.pid == JUNK_PID for r in (*train, *query, *gallery))
    listed_train = bool(train)  # test-only sets have none
    train, query, gallery = ([r for r in split if r.pid != JUNK_PID] for split in (train, query, gallery))
    for split_name, split in (("train", train), ("query", query), ("gallery", gallery)):
        required = listed_train if split_name == "train" else test_splits
        if not split and required:
            raise DatasetError(f"{name}: the {split_name} split of {dataset_dir} is empty (junk images aside)")
    if expected_counts:
        _check_counts(name, {"train": train, "query": query, "gallery": gallery}, expected_counts, check_counts)
    train, pid_map = _relabel(train)

    mask_paths = None
    if with_masks:
        mask_paths = build_mask_index(all_images, dataset_dir, mask_root, unused)
    splits = ReIDSplits(
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
        distractor_pids=distractor_pids,
        train_only=train_only,
    )
    if verify_images:
        verify_splits(splits)
    return splits


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
