"""Loaders for the published re-ID folder layouts and the dataset registry.

Each loader returns a :class:`ReIDSplits` with 0-based camera ids and train pids relabelled
0..N-1. Layouts, filename patterns and counts follow ``shared/spec/datasets.md``; MSMT17, which
that spec does not cover, follows the dataset's release (list files, see :func:`load_msmt17`).

Rules shared by every loader:

* pid -1 (junk, Market-1501) is dropped at load time; distractor pid 0 is kept in the gallery.
* A camera outside the dataset's range, a filename that does not parse, a missing folder or an
  empty split raises :class:`DatasetError` / :class:`DatasetNotFoundError` naming the file/folder.
* Split counts: when a split's (ids, images) differ from the published ones, ``check_counts``
  decides: ``"warn"`` (default for public datasets, since a partial copy is a legitimate dev setup)
  emits a :class:`DatasetCountWarning` naming the split, expected and found; ``"error"`` raises
  :class:`DatasetError`; ``"off"`` skips the check. The synthetic set defaults to ``"error"``
  because its manifest states its exact counts.
* ``with_masks=True`` attaches the MaskReID foreground masks (layout in :mod:`.masks`) and checks
  that they mirror the images one to one.

File names, MSMT17 list files and the synthetic manifest are read by :mod:`.parsing`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings
from typing import Callable, Iterable, Optional

from PIL import Image, UnidentifiedImageError

from .errors import DatasetCountWarning, DatasetError, DatasetNotFoundError
from .masks import build_mask_index
from .parsing import (
    JUNK_PID,
    MARKET_FOLDERS,
    MARKET_MULTI_QUERY_FOLDER,
    MSMT17_CAMERAS,
    SYNTHETIC_MANIFEST,
    find_dataset_dir,
    parse_market_folder,
    parse_msmt_list,
    parse_pid_index_folder,
    read_synthetic_manifest,
)
from .records import ImageRecord, ReIDSplits

COUNT_POLICIES = ("warn", "error", "off")

# (ids, images) per split, datasets.md §1; the Market gallery count is after junk removal and
# counts distractor pid 0 as one id.
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


# ---------------------------------------------------------------------------------------------
# shared helpers


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


# ---------------------------------------------------------------------------------------------
# Market-style layouts: Market-1501, DukeMTMC-reID, Occluded-Duke, CUHK03-NP, synthetic


def _load_market_style(
    name: str,
    dataset_dir: str,
    *,
    suffix: str,
    num_cams: int,
    expected_counts: Optional[dict],
    check_counts: str,
    with_masks: bool,
    mask_root: Optional[str],
    verify_images: bool,
    occluded: Callable[[list[ImageRecord], list[ImageRecord], list[ImageRecord]], Optional[frozenset]] = (
        lambda train, query, gallery: None  # not published
    ),
    multi_query_folder: Optional[str] = None,
) -> ReIDSplits:
    train, query, gallery = (
        parse_market_folder(os.path.join(dataset_dir, folder), suffix, num_cams) for folder in MARKET_FOLDERS
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
        expected_counts=expected_counts,
        check_counts=check_counts,
        with_masks=with_masks,
        mask_root=mask_root,
        verify_images=verify_images,
        occluded_paths=occluded(train, query, gallery),
        multi_query=multi_query,
    )


@dataclasses.dataclass(frozen=True)
class MarketLayout:
    """What tells one Market-style dataset from another: one row, one public loader."""

    name: str  # registry name and PUBLISHED_COUNTS key
    title: str  # names the dataset in errors
    folders: tuple[str, ...]  # where under ``root`` the dataset folder may be ("" = root itself)
    num_cams: int
    about: str  # the loader's docstring
    every_query_occluded: bool = False
    multi_query_folder: Optional[str] = None  # the multi-query pools, where the dataset has them


MARKET_LAYOUTS = (
    MarketLayout(
        "market1501",
        "Market-1501",
        ("", "Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "market1501", "Market-1501"),
        num_cams=6,
        multi_query_folder=MARKET_MULTI_QUERY_FOLDER,
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

    Every query is occluded (datasets.md §1), so ``occluded_paths`` holds the query images; which
    ~10% of the gallery is occluded is not published.
    """,
    ),
)


def _load_market_layout(
    layout: MarketLayout,
    root: str,
    *,
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = False,
    multi_query: bool = False,
) -> ReIDSplits:
    dataset_dir = find_dataset_dir(root, layout.folders, MARKET_FOLDERS, layout.title)
    every_query = layout.every_query_occluded
    return _load_market_style(
        layout.name,
        dataset_dir,
        suffix=".jpg",
        num_cams=layout.num_cams,
        check_counts=check_counts,
        expected_counts=PUBLISHED_COUNTS[layout.name],
        with_masks=with_masks,
        mask_root=mask_root,
        verify_images=verify_images,
        occluded=lambda train, query, gallery: frozenset(r.path for r in query) if every_query else None,
        multi_query_folder=layout.multi_query_folder if multi_query else None,
    )


def _market_loader(layout: MarketLayout) -> Callable[..., ReIDSplits]:
    """The loader ``loader(root, **options)`` of one row. Its signature, which
    :func:`dataset_options` reads, offers ``multi_query`` only where the layout has the pools."""
    parameters = [
        parameter
        for name, parameter in inspect.signature(_load_market_layout).parameters.items()
        if name != "layout" and (name != "multi_query" or layout.multi_query_folder)
    ]
    signature = inspect.Signature(parameters)

    def load(root: str, **options) -> ReIDSplits:
        signature.bind(root, **options)  # an option the layout lacks is a TypeError, as for a def
        return _load_market_layout(layout, root, **options)

    load.__signature__ = signature
    load.__name__ = load.__qualname__ = f"load_{layout.name}"
    load.__doc__ = layout.about
    return load


load_market1501, load_dukemtmc_reid, load_occluded_duke = (_market_loader(layout) for layout in MARKET_LAYOUTS)


def load_cuhk03_np(
    root: str,
    *,
    variant: str = "labeled",
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = False,
) -> ReIDSplits:
    """CUHK03-NP: ``cuhk03-np/{labeled,detected}/{bounding_box_train,query,bounding_box_test}/*.png``.

    Names are Market-like (``NNNN_cK_...png``); the camera is the view within a camera pair (1-2).
    ``root`` may be the variant folder, the ``cuhk03-np`` folder or its parent.
    """
    if variant not in ("labeled", "detected"):
        raise ValueError(f"CUHK03-NP variant must be 'labeled' or 'detected', got {variant!r}")
    dataset_dir = find_dataset_dir(
        root, ["", variant, f"cuhk03-np/{variant}", f"CUHK03-NP/{variant}"], MARKET_FOLDERS, f"CUHK03-NP {variant}"
    )
    name = f"cuhk03_np_{variant}"
    return _load_market_style(
        name,
        dataset_dir,
        suffix=".png",
        num_cams=2,
        expected_counts=PUBLISHED_COUNTS[name],
        check_counts=check_counts,
        with_masks=with_masks,
        mask_root=mask_root,
        verify_images=verify_images,
    )


def load_synthetic(
    root: str,
    *,
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "error",
    verify_images: bool = False,
) -> ReIDSplits:
    """A set written by :mod:`dpm_ops.data.synth`: Market layout plus ``synthetic.json``.

    The manifest gives the camera count, the exact split counts and which images are occluded.
    """
    dataset_dir = find_dataset_dir(root, [""], (*MARKET_FOLDERS, SYNTHETIC_MANIFEST), "synthetic dataset")
    manifest = read_synthetic_manifest(dataset_dir)
    try:
        num_cams = int(manifest["config"]["cameras"])
        expected = {split: tuple(counts) for split, counts in manifest["counts"].items()}
        occluded = frozenset(os.path.join(dataset_dir, name) for name in manifest["occlusion"])
    except (KeyError, TypeError, ValueError) as error:
        manifest_path = os.path.join(dataset_dir, SYNTHETIC_MANIFEST)
        raise DatasetError(f"corrupt synthetic manifest {manifest_path}: {error!r}") from error
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
    )


# ---------------------------------------------------------------------------------------------
# test-only sets with query = occluded/partial (camera 0) and gallery = whole body (camera 1)


def check_split_camids(camids) -> tuple[int, int]:
    """(query camera, gallery camera) of a test-only set: two different non-negative integers."""
    if (
        not isinstance(camids, (tuple, list))
        or len(camids) != 2
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in camids)
    ):
        raise ValueError(f"camids must be (query camid, gallery camid), two integers >= 0, got {camids!r}")
    if camids[0] == camids[1]:
        raise ValueError(
            f"camids must give query and gallery different cameras (the same camera removes every "
            f"match), got {tuple(camids)}"
        )
    return int(camids[0]), int(camids[1])


def _load_query_gallery_set(
    name: str,
    title: str,
    root: str,
    folders: list[str],
    query_folder: str,
    suffix: str,
    per_identity_dirs: bool,
    camids,
    **options,
) -> ReIDSplits:
    """A test-only set: query = the images of ``query_folder`` (all reported as occluded), gallery
    = ``whole_body_images``, each split on its own camera of ``camids``."""
    query_camid, gallery_camid = check_split_camids(camids)
    dataset_dir = find_dataset_dir(root, folders, (query_folder, "whole_body_images"), title)
    query = parse_pid_index_folder(os.path.join(dataset_dir, query_folder), suffix, query_camid, per_identity_dirs)
    gallery = parse_pid_index_folder(
        os.path.join(dataset_dir, "whole_body_images"), suffix, gallery_camid, per_identity_dirs
    )
    return _assemble(
        name,
        dataset_dir,
        train=[],
        query=query,
        gallery=gallery,
        num_cams=max(query_camid, gallery_camid) + 1,
        expected_counts=PUBLISHED_COUNTS[name],
        occluded_paths=frozenset(r.path for r in query),
        **options,
    )


def load_occluded_reid(
    root: str,
    *,
    camids: tuple[int, int] = (0, 1),
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = False,
) -> ReIDSplits:
    """Occluded-REID (test only): ``Occluded_REID/{occluded_body_images,whole_body_images}/<pid>/<pid>_<nn>.tif``.

    Query = occluded images, gallery = whole-body images, with the cameras ``camids`` =
    (query, gallery): (0, 1) by default as in PVPM/BPBReID; DPM's ``Rename.py`` names them
    ``_c1`` / ``_c3s3``, i.e. (0, 2), and the camera picks DPM's SIE embedding (datasets.md §6).
    The train split is empty: train on Market-1501.
    """
    return _load_query_gallery_set(
        "occluded_reid",
        "Occluded-REID",
        root,
        ["", "Occluded_REID", "OccludedREID", "Occluded-REID", "occluded_reid"],
        "occluded_body_images",
        ".tif",
        True,
        camids,
        with_masks=with_masks,
        mask_root=mask_root,
        check_counts=check_counts,
        verify_images=verify_images,
    )


def load_partial_reid(
    root: str,
    *,
    camids: tuple[int, int] = (0, 1),
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = False,
) -> ReIDSplits:
    """Partial-REID (test only): ``Partial_REID/{partial_body_images,whole_body_images}/<pid:03d>_<nn:02d>.jpg``.

    Query = partial images, gallery = whole-body images, with the cameras ``camids`` = (query,
    gallery), (0, 1) by default; the partial queries are reported as occluded.
    """
    return _load_query_gallery_set(
        "partial_reid",
        "Partial-REID",
        root,
        ["", "Partial_REID", "Partial-REID", "partial_reid", "PartialREID"],
        "partial_body_images",
        ".jpg",
        False,
        camids,
        with_masks=with_masks,
        mask_root=mask_root,
        check_counts=check_counts,
        verify_images=verify_images,
    )


# ---------------------------------------------------------------------------------------------
# MSMT17: list files


MSMT17_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}


def load_msmt17(
    root: str,
    *,
    include_val: bool = True,
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = False,
) -> ReIDSplits:
    """MSMT17 (V1 or V2): ``MSMT17_V1/{train,test}/`` (V2: ``mask_train_v2``, ``mask_test_v2``) plus
    ``list_{train,val,query,gallery}.txt`` whose lines are ``<pid>/<name>.jpg <pid>``.

    The camera (1-15) is the third ``_`` field of the name. ``include_val`` merges ``list_val``
    into train (TransReID's choice; 32,621 train images) — turn it off for the 30,248-image split.
    """
    tried = []
    for version, (train_folder, test_folder) in MSMT17_VERSIONS.items():
        try:
            dataset_dir = find_dataset_dir(
                root,
                ["", version, f"msmt17/{version}", f"MSMT17/{version}"],
                (train_folder, test_folder, "list_train.txt", "list_query.txt", "list_gallery.txt"),
                "MSMT17",
            )
            break
        except DatasetNotFoundError as error:
            tried.append(str(error))
    else:
        raise DatasetNotFoundError(" | ".join(tried))

    train_dir, test_dir = (os.path.join(dataset_dir, folder) for folder in (train_folder, test_folder))
    train = parse_msmt_list(os.path.join(dataset_dir, "list_train.txt"), train_dir)
    if include_val:
        train += parse_msmt_list(os.path.join(dataset_dir, "list_val.txt"), train_dir)
    query = parse_msmt_list(os.path.join(dataset_dir, "list_query.txt"), test_dir)
    gallery = parse_msmt_list(os.path.join(dataset_dir, "list_gallery.txt"), test_dir)
    return _assemble(
        "msmt17",
        dataset_dir,
        train=train,
        query=query,
        gallery=gallery,
        num_cams=MSMT17_CAMERAS,
        expected_counts=PUBLISHED_COUNTS["msmt17" if include_val else "msmt17_no_val"],
        check_counts=check_counts,
        with_masks=with_masks,
        mask_root=mask_root,
        verify_images=verify_images,
    )


# ---------------------------------------------------------------------------------------------
# registry

_LOADERS: dict[str, Callable[..., ReIDSplits]] = {
    "market1501": load_market1501,
    "dukemtmc": load_dukemtmc_reid,
    "occluded_duke": load_occluded_duke,
    "occluded_reid": load_occluded_reid,
    "partial_reid": load_partial_reid,
    "cuhk03_np": load_cuhk03_np,
    "cuhk03_np_labeled": functools.partial(load_cuhk03_np, variant="labeled"),
    "cuhk03_np_detected": functools.partial(load_cuhk03_np, variant="detected"),
    "msmt17": load_msmt17,
    "synthetic": load_synthetic,
}

_ALIASES = {
    "market": "market1501",
    "market_1501": "market1501",
    "duke": "dukemtmc",
    "dukemtmc_reid": "dukemtmc",
    "dukemtmcreid": "dukemtmc",
    "occ_duke": "occluded_duke",
    "occ_reid": "occluded_reid",
    "cuhk03np": "cuhk03_np",
    "msmt": "msmt17",
    "synth": "synthetic",
}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def register_dataset(name: str, loader: Callable[..., ReIDSplits]) -> None:
    """Add a loader ``loader(root, **kw) -> ReIDSplits`` under ``name``."""
    key = _canonical(name)
    if key in _LOADERS:
        raise ValueError(f"dataset {name!r} is already registered")
    _LOADERS[key] = loader


def available_datasets() -> list[str]:
    return sorted(_LOADERS)


def dataset_options(name: str) -> frozenset[str]:
    """The keyword options the loader of dataset ``name`` takes (``camids``, ``multi_query``, ...)."""
    key = _canonical(name)
    if key not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    loader = _LOADERS[key]
    keywords = getattr(loader, "keywords", None) or {}  # functools.partial: its bound options are fixed
    parameters = inspect.signature(loader).parameters
    return frozenset(k for k, p in parameters.items() if p.kind is p.KEYWORD_ONLY and k not in keywords)


def build_dataset(name: str, root: str, **kwargs) -> ReIDSplits:
    """Load dataset ``name`` from ``root``; ``kwargs`` go to its loader (``with_masks``, ...)."""
    key = _canonical(name)
    if key not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return _LOADERS[key](root, **kwargs)
