"""The dataset registry, the test-only sets (Occluded-REID, Partial-REID) and MSMT17; the
Market-style layouts are rows of the table in :mod:`.layouts`.

Each loader returns a :class:`ReIDSplits` with 0-based camera ids and train pids relabelled
0..N-1. Layouts, filename patterns and counts follow each dataset's release (MSMT17: its list
files, see :func:`load_msmt17`).

Rules shared by every loader:

* pid -1 (junk, Market-1501) is dropped at load time; distractor pid 0 is kept in the gallery.
* A camera outside the dataset's range, a filename that does not parse, a missing folder or an
  empty split raises :class:`DatasetError` / :class:`DatasetNotFoundError` naming the file/folder.
* Split counts: when a split's (ids, images) differ from the published ones, ``check_counts``
  decides: ``"warn"`` (default for public datasets, since a partial copy is a legitimate dev setup)
  emits a :class:`DatasetCountWarning` naming the split, expected and found; ``"error"`` raises
  :class:`DatasetError`; ``"off"`` skips the check. The synthetic set defaults to ``"error"``
  because its manifest states its exact counts.
* ``train_split=False`` (query and gallery alone: an evaluation, whose model comes from its checkpoint) and
  ``test_splits=False`` (the train split alone: a run tested on another set) leave a split's folders unread:
  they may be absent, and only the splits read are counted. The test-only sets have no train split to leave.
* ``with_masks=True`` attaches the MaskReID foreground masks (layout in :mod:`.masks`) and checks
  that they mirror the images one to one.
* ``verify_images=True`` (the default) decodes every image of every split, and its mask (which must
  have the image's size), on a thread pool before returning, so that a truncated or unreadable file
  is a :class:`DatasetError` naming it at load time, not in a data loader after hours of training
  (a few seconds for Market-1501; ``verify_images=False`` skips it, to look at the split lists).

File names, MSMT17 list files and the synthetic manifest are read by :mod:`.parsing`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Callable, Optional

from dpm_ops.ops._checks import check_known_options, quote

from .assembly import _assemble, check_count_policy, check_wanted_splits, row_loader
from .cuhk03_release import CUHK03_LOADERS
from .dgd import DGD_LOADERS
from .errors import DatasetError, DatasetNotFoundError
from .layouts import MARKET_LOADERS, PUBLISHED_COUNTS, load_cuhk03_np, load_synthetic
from .parsing import MSMT17_CAMERAS, find_dataset_dir, parse_msmt_list, parse_pid_index_folder
from .records import ReIDSplits
from .torchreid_sets import SMALL_SET_LOADERS


# ---------------------------------------------------------------------------------------------
# test-only sets with query = occluded/partial (camera 0) and gallery = whole body (camera 1)


def check_split_camids(camids) -> tuple[int, int]:
    """(query camera, gallery camera) of a test-only set: two different non-negative integers."""
    if (
        not isinstance(camids, (tuple, list))
        or len(camids) != 2
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in camids)
    ):
        raise DatasetError(f"camids must be (query camid, gallery camid), two integers >= 0, got {quote(camids)}")
    if camids[0] == camids[1]:
        raise DatasetError(
            f"camids must give query and gallery different cameras (the same camera removes every "
            f"match), got {tuple(camids)}"
        )
    return int(camids[0]), int(camids[1])


@dataclasses.dataclass(frozen=True)
class QueryGalleryLayout:
    """A test-only set: query = the images of ``query_folder`` (all reported as occluded), gallery =
    ``whole_body_images``, each split on its own camera. One row, one public loader."""

    name: str  # registry name and PUBLISHED_COUNTS key
    title: str  # names the dataset in errors
    folders: tuple[str, ...]  # where under ``root`` the dataset folder may be ("" = root itself)
    query_folder: str
    suffix: str  # the image files' extension
    per_identity_dirs: bool  # images sit in one folder per identity
    about: str  # the loader's docstring


QUERY_GALLERY_LAYOUTS = (
    QueryGalleryLayout(
        "occluded_reid",
        "Occluded-REID",
        ("", "Occluded_REID", "OccludedREID", "Occluded-REID", "occluded_reid"),
        "occluded_body_images",
        ".tif",
        per_identity_dirs=True,
        about="""Occluded-REID (test only): ``Occluded_REID/{occluded_body_images,whole_body_images}/<pid>/<pid>_<nn>.tif``.

    Query = occluded images, gallery = whole-body images, with the cameras ``camids`` =
    (query, gallery): (0, 1) by default as in PVPM/BPBReID; DPM's ``Rename.py`` names them
    ``_c1`` / ``_c3s3``, i.e. (0, 2), and the camera picks DPM's SIE embedding row.
    The train split is empty: train on Market-1501.
    """,
    ),
    QueryGalleryLayout(
        "partial_reid",
        "Partial-REID",
        ("", "Partial_REID", "Partial-REID", "partial_reid", "PartialREID"),
        "partial_body_images",
        ".jpg",
        per_identity_dirs=False,
        about="""Partial-REID (test only): ``Partial_REID/{partial_body_images,whole_body_images}/<pid:03d>_<nn:02d>.jpg``.

    Query = partial images, gallery = whole-body images, with the cameras ``camids`` = (query,
    gallery), (0, 1) by default; the partial queries are reported as occluded.
    """,
    ),
)


def _load_query_gallery_layout(
    layout: QueryGalleryLayout,
    root: str,
    *,
    camids: tuple[int, int] = (0, 1),
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = True,
) -> ReIDSplits:
    query_camid, gallery_camid = check_split_camids(camids)
    dataset_dir = find_dataset_dir(root, layout.folders, (layout.query_folder, "whole_body_images"), layout.title)
    query, gallery = (
        parse_pid_index_folder(os.path.join(dataset_dir, folder), layout.suffix, camid, layout.per_identity_dirs)
        for folder, camid in ((layout.query_folder, query_camid), ("whole_body_images", gallery_camid))
    )
    return _assemble(
        layout.name,
        dataset_dir,
        train=[],
        query=query,
        gallery=gallery,
        num_cams=max(query_camid, gallery_camid) + 1,
        expected_counts=PUBLISHED_COUNTS[layout.name],
        occluded_paths=frozenset(r.path for r in query),
        with_masks=with_masks,
        mask_root=mask_root,
        check_counts=check_counts,
        verify_images=verify_images,
    )


load_occluded_reid, load_partial_reid = (
    row_loader(_load_query_gallery_layout, layout) for layout in QUERY_GALLERY_LAYOUTS
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
    verify_images: bool = True,
    train_split: bool = True,
    test_splits: bool = True,
) -> ReIDSplits:
    """MSMT17 (V1 or V2): ``MSMT17_V1/{train,test}/`` (V2: ``mask_train_v2``, ``mask_test_v2``) plus
    ``list_{train,val,query,gallery}.txt`` whose lines are ``<pid>/<name>.jpg <pid>``.

    The camera (1-15) is the third ``_`` field of the name. ``include_val`` merges ``list_val``
    into train (TransReID's choice; 32,621 train images) — turn it off for the 30,248-image split.
    """
    check_wanted_splits(train_split, test_splits)
    tried = []
    for version, (train_folder, test_folder) in MSMT17_VERSIONS.items():
        wanted = ((train_folder, train_split), (test_folder, test_splits), ("list_train.txt", train_split))
        wanted += tuple((f"list_{split}.txt", test_splits) for split in ("query", "gallery"))
        required = [entry for entry, read in wanted if read]
        try:
            dataset_dir = find_dataset_dir(
                root, ["", version, f"msmt17/{version}", f"MSMT17/{version}"], required, "MSMT17"
            )
            break
        except DatasetNotFoundError as error:
            tried.append(str(error))
    else:
        raise DatasetNotFoundError(" | ".join(tried))

    train_dir, test_dir = (os.path.join(dataset_dir, folder) for folder in (train_folder, test_folder))
    train = parse_msmt_list(os.path.join(dataset_dir, "list_train.txt"), train_dir) if train_split else []
    val_list = os.path.join(dataset_dir, "list_val.txt")
    read_val = train_split and (include_val or os.path.exists(val_list))  # optional without include_val
    val = parse_msmt_list(val_list, train_dir) if read_val else []
    if include_val:
        twice = sorted({r.path for r in train} & {r.path for r in val})
        if twice:
            raise DatasetError(
                f"MSMT17: {twice[0]} is listed in list_train.txt and list_val.txt (val joins train once)"
            )
        train += val
    query, gallery = (
        parse_msmt_list(os.path.join(dataset_dir, f"list_{split}.txt"), test_dir) if test_splits else []
        for split in ("query", "gallery")
    )
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
        unused=() if include_val else tuple(r.path for r in val),  # their masks mirror the folder too
        train_split=train_split,
        test_splits=test_splits,
    )


# ---------------------------------------------------------------------------------------------
# registry

_LOADERS: dict[str, Callable[..., ReIDSplits]] = {
    **MARKET_LOADERS,
    "occluded_reid": load_occluded_reid,
    "partial_reid": load_partial_reid,
    "cuhk03_np": load_cuhk03_np,
    "msmt17": load_msmt17,
    "synthetic": load_synthetic,
    **DGD_LOADERS,
    **SMALL_SET_LOADERS,
    **CUHK03_LOADERS,
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
    "prid2011": "prid",
    "i_lids": "ilids",
}
# names that mean one set to one peer and another to the other: named, not guessed
_AMBIGUOUS = {"cuhk03": "torchreid's cuhk03 is cuhk03_detected, fast-reid's cuhk03_labeled (or their classic splits)"}


def canonical_dataset_name(name: str) -> str:
    """The registry's name of ``name`` (an alias as ``market`` or ``Market-1501``: ``market1501``)."""
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def register_dataset(name: str, loader: Callable[..., ReIDSplits]) -> None:
    """Add a loader ``loader(root, **kw) -> ReIDSplits`` under ``name``."""
    key = canonical_dataset_name(name)
    if key in _LOADERS:
        raise ValueError(f"dataset {name!r} is already registered")
    _LOADERS[key] = loader


def available_datasets() -> list[str]:
    return sorted(_LOADERS)


def dataset_options(name: str) -> frozenset[str]:
    """The keyword options the loader of dataset ``name`` takes (``camids``, ``multi_query``, ...)."""
    key = canonical_dataset_name(name) if isinstance(name, str) else None
    if key not in _LOADERS:
        if key in _AMBIGUOUS:
            raise DatasetError(f"dataset {name!r} is ambiguous: {_AMBIGUOUS[key]}; name the one meant")
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    loader = _LOADERS[key]
    keywords = getattr(loader, "keywords", None) or {}  # functools.partial: its bound options are fixed
    parameters = inspect.signature(loader).parameters
    return frozenset(k for k, p in parameters.items() if p.kind is p.KEYWORD_ONLY and k not in keywords)


def build_dataset(name: str, root: str, **kwargs) -> ReIDSplits:
    """Load dataset ``name`` from ``root``; ``kwargs`` go to its loader (``with_masks``, ...).

    The built-in loaders decode every image (and mask) of every split before returning, naming the
    first unreadable one (``verify_images=True``, their default): the price is a few seconds for
    Market-1501, paid once before any long work. ``verify_images=False`` skips it.
    """
    options = dataset_options(name)  # an unknown name: a DatasetError naming the available ones
    parameters = inspect.signature(_LOADERS[canonical_dataset_name(name)]).parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)  # a registered loader's **options
    if not takes_any:
        check_known_options(f"dataset {name!r}", kwargs, sorted(options), DatasetError)
    if not isinstance(root, (str, os.PathLike)) or not str(root):  # None read as a folder named "None"
        raise DatasetError(f"dataset root must be a folder path, got {root!r}")
    if "check_counts" in kwargs:  # before the folders are parsed
        check_count_policy(kwargs["check_counts"])
    for flag in ("with_masks", "multi_query", "verify_images", "include_val", "train_split", "test_splits"):
        if flag in kwargs and not isinstance(kwargs[flag], bool):  # "no" would read as true
            raise DatasetError(f"dataset option {flag} must be True or False, got {kwargs[flag]!r}")
    return _LOADERS[canonical_dataset_name(name)](root, **kwargs)
