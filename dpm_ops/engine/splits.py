"""The data a run reads, from its config's dataset section: the synthetic set generated where it is absent
(:func:`prepare_synthetic`), the train split of one dataset or of several combined and the test set
(:func:`load_splits`), every image decoded before any long work."""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from pathlib import Path
from typing import Optional

from dpm_ops.data import DatasetError, ReIDSplits, build_dataset
from dpm_ops.data.assembly import check_query_matches, verify_splits
from dpm_ops.data.combined import combine_datasets, combined_name
from dpm_ops.data.datasets import canonical_dataset_name, dataset_options

from . import distributed
from .config_checks import source_names, tested_names
from .recipes import get_recipe


def prepare_synthetic(config: dict, *, progress: bool = True) -> None:
    """Generate the synthetic set at ``dataset.root`` if it is absent (rank 0; others wait). A set
    generated with other ``dataset.synth`` options is a DatasetError, never reused or replaced."""
    data = config["dataset"]
    if not _trains_on_synthetic(data) or not data["generate"]:
        return
    from dpm_ops.data.synth import check_synthetic_dataset, generate_synthetic_dataset, synth_config

    root = Path(os.path.expanduser(data["root"]))
    wanted = synth_config(data["synth"])  # dataset.synth was checked by load_config
    # every rank checks (a manifest read), so that a mismatch stops them all before the barrier
    present = check_synthetic_dataset(
        root, wanted, option_prefix="dataset.synth.", elsewhere="set another dataset.root"
    )
    if distributed.current().is_main and not present:
        print(f"dpm-reid: generating the synthetic dataset in {root} (absent)", file=sys.stderr)
        generate_synthetic_dataset(root, wanted, progress=progress)
    distributed.barrier()


def _trains_on_synthetic(data: dict) -> bool:
    return [canonical_dataset_name(name) for name in source_names(data)] == ["synthetic"]


def load_splits(config: dict, *, train_split: bool = True) -> ReIDSplits:
    """Train split of ``dataset`` (of each dataset of a list, combined: :func:`combine_datasets`, with their query
    and gallery under ``dataset.combineall``), query/gallery of ``dataset`` or of ``dataset.test_name`` (with its
    ``dataset.test_camids``); the test set's gt_bbox pools with ``eval.multi_query``. A list of test sets: the first
    as one, the others in ``more_tests``, each with the train split.

    ``train_split=False`` (an evaluation: the checkpoint fixes the model's classes and cameras): the test set alone,
    the train split neither read nor needed, so a folder of query and gallery images is scored; a loader that
    takes no ``train_split`` option lists its own, which is not decoded. The test set's own train split is never
    read, nor are a train set's query and gallery when ``dataset.test_name`` names another.

    Checked here, before any long work: each query/gallery can be evaluated (some query has a
    match), and every image the run reads (with its mask) decodes."""
    data = config["dataset"]
    with_masks = (
        data["with_masks"] if data["with_masks"] is not None else get_recipe(config["model"]["name"]).uses_masks
    )
    test_options = {"multi_query": True} if config["eval"]["multi_query"] != "off" else {}
    if data["test_camids"] is not None:
        test_options["camids"] = tuple(data["test_camids"])
    options = dict(train_split=False, check_counts=data["check_counts"], **test_options)
    root = data["test_root"] or data["root"]
    tests = [_build_dataset(data, name, root, with_masks, **options) for name in tested_names(data)]
    loaded = [test.name for test in tests]
    twice = next((name for index, name in enumerate(loaded) if name in loaded[:index]), None)
    if twice is not None:  # their metrics would share one entry and folder
        given = [given for given, name in zip(tested_names(data), loaded) if name == twice]
        raise DatasetError(f"config key dataset.test_name: {' and '.join(given)} are the same test set, {twice}")
    counts = {"check_counts": data["check_counts"]}
    if data["check_counts"] == "warn" and _trains_on_synthetic(data):
        counts = {}  # the synthetic loader's default, "error": its manifest states its exact counts
    sources = None
    if train_split and (len(source_names(data)) > 1 or data["combineall"]):
        wanted = dict(test_splits=data["combineall"], **counts)
        sources = [_build_dataset(data, name, data["root"], with_masks, **wanted) for name in source_names(data)]
        splits = combine_datasets(sources, combineall=data["combineall"])
    elif train_split or not tests:
        wanted = dict(train_split=train_split, test_splits=not tests, **counts)
        splits = _build_dataset(
            data, data["name"], data["root"], with_masks, **wanted, **({} if tests else test_options)
        )
    first = _first_cameras(data, sources)
    tests = [_shifted_cameras(test, first.get(name, 0)) for name, test in zip(tested_names(data), tests)]
    if tests:
        made = [_tested_on(splits, test, with_masks) if train_split else _test_set_alone(data, test) for test in tests]
        splits = dataclasses.replace(made[0], more_tests=tuple(made[1:]))
    if train_split and not splits.train:
        raise DatasetError(
            f"dataset {data['name']} at {data['root']} has no training images (training needs a train split; "
            "dpm-reid eval scores a set of query and gallery images alone)"
        )
    for test in tests or [splits]:
        check_query_matches(test)  # names the test set's own root
    verify_splits(splits, train=train_split)
    for test in splits.more_tests:
        verify_splits(test, train=False)
    return splits


def check_split_untrained(config: dict, trained: Optional[dict], source: str) -> None:
    """An evaluation of a model ``trained`` (its config; None: unknown) on a set it trained on a split of: the same
    split (``dataset.split_id``), whose test persons it never saw; another split's would be persons it trained on,
    scored as if unseen, and so would any of a set it trained on whole (``dataset.combineall``)."""
    if trained is None:
        return
    data, was = config["dataset"], trained["dataset"]
    sources = {canonical_dataset_name(name) for name in source_names(was)}
    for name in tested_names(data) or source_names(data):
        if canonical_dataset_name(name) not in sources:
            continue
        if was["combineall"]:
            raise DatasetError(
                f"{source} trained on every image of {name} (dataset.combineall): test it on a set it did not train on"
            )
        if "split_id" not in dataset_options(name):
            continue
        chosen = data["split_id"] or 0
        trained_on = (was.get("split_id") or 0) if _tested(was, name) else 0  # its first split where untested
        if chosen != trained_on:
            raise DatasetError(
                f"{source} trained on split {trained_on} of {name}: testing it on split {chosen} scores persons it "
                f"trained on (set dataset.split_id={trained_on})"
            )


def _first_cameras(data: dict, sources: Optional[list[ReIDSplits]]) -> dict[str, int]:
    """The first camera of each test set that is one of ``dataset.name``'s datasets after the first, as a set combined
    of them numbers its cameras (after the cameras of those before it), so that the model's camera embeddings (SIE)
    are its own. ``sources``: those datasets loaded (a training run); None (an evaluation): the train folders of the
    ones needed are listed to count their cameras, once each."""
    names = [canonical_dataset_name(source) for source in source_names(data)]
    keys = {name: canonical_dataset_name(name) for name in tested_names(data)}
    position = {name: names.index(key) for name, key in keys.items() if key in names[1:]}
    if not position:
        return {}
    if sources is None:
        before = source_names(data)[: max(position.values())]
        listed = dict(with_masks=False, test_splits=False, check_counts="off")
        try:
            sources = [_build_dataset(data, source, data["root"], **listed) for source in before]
        except DatasetError as error:  # dpm-reid eval reads no train split but these
            last = max(position, key=position.get)
            raise type(error)(
                f"dataset.test_name {last} follows {', '.join(before)} in dataset.name: its cameras are "
                f"numbered after theirs, counted from their train folders: {error}"
            ) from None
    firsts = list(itertools.accumulate((source.num_cams for source in sources), initial=0))
    return {name: firsts[at] for name, at in position.items()}


def _shifted_cameras(test: ReIDSplits, first: int) -> ReIDSplits:
    """``test`` with its camera ids ``first`` and on."""
    if not first:
        return test

    def shifted(records):
        return records if records is None else [r._replace(camid=r.camid + first) for r in records]

    return dataclasses.replace(
        test,
        query=shifted(test.query),
        gallery=shifted(test.gallery),
        multi_query=shifted(test.multi_query),
        num_cams=test.num_cams + first,
    )


def _build_dataset(data: dict, name: str, root: str, with_masks: bool, **options) -> ReIDSplits:
    """build_dataset of ``name`` at ``root`` with the dataset section's masks. ``train_split`` / ``test_splits``
    False (a split not read) go to a loader that takes them, one that does not reads its own; the loader's own image
    check is skipped: load_splits decodes only what the run reads (not the query/gallery of a train set tested on
    another), once."""
    accepted = dataset_options(name)
    if data["split_id"] is not None and "split_id" in accepted and _tested(data, name):
        options["split_id"] = data["split_id"]
    if data["val_ratio"] is not None and "val_ratio" in accepted:
        options["val_ratio"] = data["val_ratio"]
    for key in ("train_split", "test_splits"):
        if options.get(key, True) or key not in accepted:
            options.pop(key, None)
    if "verify_images" in accepted:
        options["verify_images"] = False
    return build_dataset(name, os.path.expanduser(root), with_masks=with_masks, mask_root=data["mask_root"], **options)


def _tested(data: dict, name: str) -> bool:
    """Whether the run tests on ``name``: one of dataset.test_name, or the dataset it trains on where none is given.
    dataset.split_id picks the split of these (a source also tested trains on the same split, so that it is never
    tested on persons it trained on; the others, combineall's sources among them, on their first)."""
    tested = tested_names(data)
    return not tested or canonical_dataset_name(name) in {canonical_dataset_name(test) for test in tested}


def _tested_on(splits: ReIDSplits, test: ReIDSplits, with_masks: bool) -> ReIDSplits:
    """The train split of ``splits`` with the query and gallery of ``test`` (``dataset.test_name``)."""
    mask_paths = {**(splits.mask_paths or {}), **(test.mask_paths or {})} if with_masks else None
    return dataclasses.replace(
        splits,
        name=f"{splits.name}->{test.name}",
        query=test.query,
        gallery=test.gallery,
        mask_paths=mask_paths,
        occluded_paths=test.occluded_paths,
        multi_query=test.multi_query,
    )


def _test_set_alone(data: dict, test: ReIDSplits) -> ReIDSplits:
    """An evaluation's ``dataset.test_name`` set, named as a run trained on ``dataset.name`` and tested on it."""
    trained = combined_name([canonical_dataset_name(name) for name in source_names(data)], data["combineall"])
    return dataclasses.replace(test, name=f"{trained}->{test.name}", train=[])
