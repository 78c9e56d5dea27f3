"""The Market-style layouts (``{bounding_box_train,query,bounding_box_test}/<pid>_c<cam>...``): one
:class:`MarketLayout` row per dataset (Market-1501, DukeMTMC-reID, Occluded-Duke, CUHK03-NP's two
variants), each row one public loader, and the synthetic set, which shares the layout.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

from dpm_ops.ops._checks import is_integer, quote

from .assembly import _assemble, check_wanted_splits, row_loader
from .errors import DatasetError, DatasetNotFoundError
from .parsing import (
    JUNK_PID,
    MARKET_FOLDERS,
    MARKET_MULTI_QUERY_FOLDER,
    SYNTHETIC_MANIFEST,
    find_dataset_dir,
    parse_market_folder,
    read_synthetic_manifest,
)
from .records import ImageRecord, ReIDSplits

SPLITS = ("train", "query", "gallery")
SYNTHETIC_KEYS = ("config", "counts", "occlusion")  # what load_synthetic reads of the manifest

# (ids, images) per split as each dataset's release publishes them; the Market gallery count is after
# junk removal and counts distractor pid 0 as one id.
PUBLISHED_COUNTS = {
    "market1501": {"train": (751, 12936), "query": (750, 3368), "gallery": (751, 15913)},
    "dukemtmc": {"train": (702, 16522), "query": (702, 2228), "gallery": (1110, 17661)},
    "occluded_duke": {"train": (702, 15618), "query": (519, 2210), "gallery": (1110, 17661)},
    "cuhk03_np_labeled": {"train": (767, 7368), "query": (700, 1400), "gallery": (700, 5328)},
    "cuhk03_np_detected": {"train": (767, 7365), "query": (700, 1400), "gallery": (700, 5332)},
    "occluded_reid": {"query": (200, 1000), "gallery": (200, 1000)},
    "partial_reid": {"query": (60, 300), "gallery": (60, 300)},
    # MSMT17 release numbers; train with list_val merged (TransReID) / list_train alone.
    "msmt17": {"train": (1041, 32621), "query": (3060, 11659), "gallery": (3060, 82161)},
    "msmt17_no_val": {"train": (1041, 30248), "query": (3060, 11659), "gallery": (3060, 82161)},
}


def _load_market_style(
    name: str,
    dataset_dir: str,
    *,
    suffix: str,
    num_cams: int,
    occluded: Callable[[list[ImageRecord], list[ImageRecord], list[ImageRecord]], Optional[frozenset]] = (
        lambda train, query, gallery: None  # not published
    ),
    multi_query_folder: Optional[str] = None,
    distractors: bool = False,
    train_split: bool = True,
    test_splits: bool = True,
    **assembly_options,
) -> ReIDSplits:
    """Parses the Market-style folders (``test_splits=False``: the train folder alone; ``train_split=False``: query
    and gallery alone); ``assembly_options`` are ``_assemble``'s (expected_counts, check_counts, with_masks,
    mask_root, verify_images). With ``distractors``, pid 0 marks gallery images of no identity: one in train or query
    is an error (a query of pid 0 was scored with the distractors as its matches)."""
    wanted = _market_folders(train_split, test_splits)
    train, query, gallery = (
        parse_market_folder(os.path.join(dataset_dir, folder), suffix, num_cams) if folder in wanted else []
        for folder in MARKET_FOLDERS
    )
    for folder, records in zip(MARKET_FOLDERS[:2], (train, query) if distractors else ()):
        stray = next((r.path for r in records if r.pid == 0), None)
        if stray is not None:
            raise DatasetError(
                f"{name}: pid 0 marks distractors, gallery images of no identity; {folder} holds {stray}"
            )
    multi_query = None
    if multi_query_folder is not None:
        folder = os.path.join(dataset_dir, multi_query_folder)
        if not os.path.isdir(folder):
            raise DatasetNotFoundError(
                f"{name}: multi-query needs the {multi_query_folder}/ folder, not found in {dataset_dir}"
            )
        multi_query = [r for r in parse_market_folder(folder, suffix, num_cams) if r.pid != JUNK_PID]
    return _assemble(
        name,
        dataset_dir,
        train=train,
        query=query,
        gallery=gallery,
        num_cams=num_cams,
        occluded_paths=occluded(train, query, gallery),
        multi_query=multi_query,
        distractor_pids=frozenset({0}) if distractors else frozenset(),
        train_split=train_split,
        test_splits=test_splits,
        **assembly_options,
    )


def _market_folders(train_split: bool, test_splits: bool) -> tuple[str, ...]:
    """The Market folders a load reads: an evaluation (``train_split=False``) reads no train folder, which may be
    absent; a run tested on another set (``test_splits=False``) no query and gallery folders."""
    check_wanted_splits(train_split, test_splits)
    return (MARKET_FOLDERS[:1] if train_split else ()) + (MARKET_FOLDERS[1:] if test_splits else ())


CUHK03_VARIANTS = ("labeled", "detected")  # the box source: hand-drawn or DPM-detected


@dataclasses.dataclass(frozen=True)
class MarketLayout:
    """What tells one Market-style dataset from another: one row, one public loader."""

    name: str  # registry name and PUBLISHED_COUNTS key
    title: str  # names the dataset in errors
    folders: tuple[str, ...]  # where under ``root`` the dataset folder may be ("" = root itself)
    num_cams: int
    about: str  # the loader's docstring
    suffix: str = ".jpg"  # the image files' extension
    every_query_occluded: bool = False
    multi_query_folder: Optional[str] = None  # the multi-query pools, where the dataset has them
    distractors: bool = False  # pid 0 marks gallery images of no identity (Market-1501's)


MARKET_LAYOUTS = (
    MarketLayout(
        "market1501",
        "Market-1501",
        ("", "Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "market1501", "Market-1501"),
        num_cams=6,
        multi_query_folder=MARKET_MULTI_QUERY_FOLDER,
        distractors=True,
        about="""Market-1501: ``Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}/*.jpg``.

    ``root`` may be the dataset folder itself or a parent holding ``Market-1501-v15.09.15``,
    ``market1501/Market-1501-v15.09.15`` or ``market1501``. The gallery is 15,913 images after the
    3,819 junk boxes are dropped; distractors (pid 0) stay.

    ``multi_query=True`` also reads ``gt_bbox/`` (the 25,259 hand-drawn boxes of all 1,501 ids)
    into ``multi_query``, the pools of the multi-query protocol (and, with masks, its
    ``gt_bbox_seg`` mirror).
    """,
    ),
    MarketLayout(
        "dukemtmc",
        "DukeMTMC-reID",
        ("", "DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID", "dukemtmc-reid"),
        num_cams=8,
        about="""DukeMTMC-reID: ``DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}/*.jpg``, cams 1-8.

    ``root`` may be the dataset folder, or a parent holding ``DukeMTMC-reID`` or
    ``dukemtmc-reid/DukeMTMC-reID``.
    """,
    ),
    MarketLayout(
        "occluded_duke",
        "Occluded-Duke",
        ("", "Occluded_Duke", "occluded_duke", "Occluded-Duke"),
        num_cams=8,
        every_query_occluded=True,
        about="""Occluded-Duke: ``Occluded_Duke/{bounding_box_train,query,bounding_box_test}/*.jpg``, cams 1-8.

    Every query is occluded (the split was built that way), so ``occluded_paths`` holds the query
    images; which ~10% of the gallery is occluded is not published.
    """,
    ),
    *(
        MarketLayout(
            f"cuhk03_np_{variant}",
            f"CUHK03-NP {variant}",
            ("", variant, f"cuhk03-np/{variant}", f"CUHK03-NP/{variant}"),
            num_cams=2,
            suffix=".png",
            about=f"""CUHK03-NP {variant}: ``cuhk03-np/{variant}/{{bounding_box_train,query,bounding_box_test}}/*.png``.

    Names are Market-like (``NNNN_cK_...png``); the camera is the view within a camera pair (1-2).
    ``root`` may be the variant folder, the ``cuhk03-np`` folder or its parent.
    """,
        )
        for variant in CUHK03_VARIANTS
    ),
)


def _load_market_layout(
    layout: MarketLayout,
    root: str,
    *,
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = True,
    multi_query: bool = False,
    train_split: bool = True,
    test_splits: bool = True,
) -> ReIDSplits:
    folders = _market_folders(train_split, test_splits)
    dataset_dir = find_dataset_dir(root, layout.folders, folders, layout.title)
    _check_folder_name(layout, dataset_dir)
    every_query = layout.every_query_occluded
    return _load_market_style(
        layout.name,
        dataset_dir,
        suffix=layout.suffix,
        num_cams=layout.num_cams,
        check_counts=check_counts,
        expected_counts=PUBLISHED_COUNTS[layout.name],
        with_masks=with_masks,
        mask_root=mask_root,
        verify_images=verify_images,
        occluded=lambda train, query, gallery: frozenset(r.path for r in query) if every_query else None,
        multi_query_folder=layout.multi_query_folder if multi_query else None,
        distractors=layout.distractors,
        train_split=train_split,
        test_splits=test_splits,
    )


def _check_folder_name(layout: MarketLayout, dataset_dir: str) -> None:
    """A DatasetError for a dataset folder named as another layout's (the same three folders hold Duke and
    Occluded-Duke, CUHK03-NP's labeled and detected boxes): given as ``root``, Duke loaded as Occluded-Duke
    and detected boxes as labeled ones, their only sign a count warning."""

    def names(row):
        return {os.path.basename(folder).lower() for folder in row.folders if folder}

    name = os.path.basename(dataset_dir).lower()
    if name in names(layout):
        return
    for other in MARKET_LAYOUTS:
        if other is not layout and name in names(other):
            raise DatasetError(
                f"{layout.title}: {dataset_dir} is named as {other.title}'s folder; give the {layout.title} folder "
                f"(or the dataset {other.name!r})"
            )


# multi_query only where the layout has the pools
MARKET_LOADERS = {
    layout.name: row_loader(_load_market_layout, layout, omit=() if layout.multi_query_folder else ("multi_query",))
    for layout in MARKET_LAYOUTS
}
load_market1501, load_dukemtmc_reid, load_occluded_duke = (
    MARKET_LOADERS[name] for name in ("market1501", "dukemtmc", "occluded_duke")
)


def load_cuhk03_np(
    root: str,
    *,
    variant: str = "labeled",
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = True,
    train_split: bool = True,
    test_splits: bool = True,
) -> ReIDSplits:
    """CUHK03-NP: ``cuhk03-np/{labeled,detected}/{bounding_box_train,query,bounding_box_test}/*.png``,
    the ``variant`` row of the layout table.

    Names are Market-like (``NNNN_cK_...png``); the camera is the view within a camera pair (1-2).
    ``root`` may be the variant folder, the ``cuhk03-np`` folder or its parent.
    """
    if variant not in CUHK03_VARIANTS:
        raise DatasetError(f"CUHK03-NP variant must be 'labeled' or 'detected', got {variant!r}")
    options = dict(with_masks=with_masks, mask_root=mask_root, check_counts=check_counts, verify_images=verify_images)
    options.update(train_split=train_split, test_splits=test_splits)
    return MARKET_LOADERS[f"cuhk03_np_{variant}"](root, **options)


# Not a MarketLayout row: its camera count, split counts and occluded images are not fixed but read
# from the manifest of the set written.
def _synthetic_manifest(dataset_dir: str) -> tuple[int, dict, frozenset]:
    """The manifest's camera count, split counts {split: (ids, images)} and occluded image paths, each checked
    (a string of occluded paths was read as one-character names, 2.7 cameras as 2, a missing split a KeyError)."""
    manifest = read_synthetic_manifest(dataset_dir)
    config, counts, occlusion = (manifest.get(key) if isinstance(manifest, dict) else None for key in SYNTHETIC_KEYS)
    cameras = config.get("cameras") if isinstance(config, dict) else None
    problem = None
    if not (is_integer(cameras) and 1 <= cameras <= 9):  # Market names hold one camera digit
        problem = f"config.cameras must be an integer in [1, 9], got {quote(cameras)}"
    elif not (isinstance(counts, dict) and sorted(counts) == sorted(SPLITS)):
        problem = f"counts must hold {', '.join(SPLITS)}, got {quote(counts)}"
    elif not all(
        isinstance(c, list) and len(c) == 2 and all(is_integer(v) and v >= 0 for v in c) for c in counts.values()
    ):
        problem = f"counts must be [ids, images] pairs of integers >= 0, got {quote(counts)}"
    elif not (
        isinstance(occlusion, dict) and all(isinstance(name, str) and not os.path.isabs(name) for name in occlusion)
    ):
        problem = f"occlusion must map image paths relative to the dataset to their occluders, got {quote(occlusion)}"
    if problem is not None:
        raise DatasetError(f"corrupt synthetic manifest {os.path.join(dataset_dir, SYNTHETIC_MANIFEST)}: {problem}")
    occluded = frozenset(os.path.join(dataset_dir, name) for name in occlusion)
    return int(cameras), {split: tuple(c) for split, c in counts.items()}, occluded


def load_synthetic(
    root: str,
    *,
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "error",
    verify_images: bool = True,
    train_split: bool = True,
    test_splits: bool = True,
) -> ReIDSplits:
    """A set written by :mod:`dpm_ops.data.synth`: Market layout plus ``synthetic.json``.

    The manifest gives the camera count, the exact split counts and which images are occluded.
    """
    folders = _market_folders(train_split, test_splits)
    dataset_dir = find_dataset_dir(root, [""], (*folders, SYNTHETIC_MANIFEST), "synthetic dataset")
    num_cams, expected, occluded = _synthetic_manifest(dataset_dir)
    return _load_market_style(
        "synthetic",
        dataset_dir,
        suffix=".jpg",
        num_cams=num_cams,
        expected_counts=expected,
        check_counts=check_counts,
        with_masks=with_masks,
        mask_root=mask_root,
        verify_images=verify_images,
        occluded=lambda train, query, gallery: occluded,
        train_split=train_split,
        test_splits=test_splits,
    )
