"""The small datasets of DGD's joint single-task learning (JSTL; Xiao et al., CVPR 2016), in the uniform format its
``data/format_*.py`` scripts write: the set MaskReID's softmax stage trains on (3DPeS, CUHK01, CUHK03, i-LIDS, PRID,
VIPeR and Shinpuhkan merged; maskreid.md §5) and its Table 1 tests on.

A formatted dataset is a folder (``external/exp/datasets/<viper, prid, ...>`` in DGD's scripts) holding
``meta.json`` (``name``, ``num_cameras``, ``identities``: per person, per camera, the image files relative to the
folder, ``cam_<c>/<person:05d>_<n:05d>.<ext>``) and ``split.json`` (``trainval``, ``test_probe``, ``test_gallery``:
person indices). The scripts draw the split at random, unseeded, once: reading their ``split.json`` gives DGD's split,
which no seed could rebuild.

The splits, as DGD's ``tools/make_lists_id_training.py`` lists them: train = the trainval persons' images but those
it keeps apart for Caffe's validation (``val_ratio``, its ``--val-ratio`` 0.2: of a single-shot set, 2 x 20% of the
persons each give the second half of their shuffled views; of a multi-shot one, 20% of the images; drawn here from
a seeded generator, DGD's draw being unseeded; ``val_ratio=0`` trains on all of trainval); query = the
first half of a probe person's cameras (camera 0 of a two-camera set), gallery = the other half, plus every image of
the gallery-only persons (PRID's 549 camera-B persons). Rank-1 as DGD reports it is the single-gallery-shot CMC
(``eval.protocol: cuhk03``; DGD averages 100 draws).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from dpm_ops.ops._checks import is_finite_real, is_integer, quote

from .assembly import _assemble, check_wanted_splits, row_loader
from .errors import DatasetError, DatasetNotFoundError
from .parsing import find_dataset_dir, read_json
from .records import ImageRecord, ReIDSplits

DGD_FILES = ("meta.json", "split.json")
SPLIT_KEYS = ("trainval", "test_probe", "test_gallery")
SHOTS = ("single", "multiple")  # meta.json's shot: one image a camera per person, or several
DGD_VAL_RATIO = 0.2  # make_lists_id_training.py's --val-ratio default
VALIDATION_SEED = 0  # the generator of the validation draw (DGD's is unseeded)


@dataclasses.dataclass(frozen=True)
class DGDLayout:
    """One dataset of DGD's format: one row, one public loader."""

    name: str  # registry name
    title: str  # meta.json's "name", as DGD's script writes it
    folder: str  # the folder DGD's scripts write it to
    num_cams: int

    @property
    def about(self) -> str:  # the loader's docstring
        return f"""{self.title} in DGD's format: ``{self.folder}/{{meta.json,split.json,cam_*/}}`` with DGD's split.

    ``root`` may be the folder or the one holding it (DGD's ``external/exp/datasets``). See :mod:`dpm_ops.data.dgd`.
    """


DGD_LAYOUTS = (
    DGDLayout("dgd_3dpes", "3DPeS", "3dpes", 2),
    DGDLayout("dgd_cuhk01", "cuhk01", "cuhk01", 2),
    DGDLayout("dgd_cuhk03", "cuhk03", "cuhk03", 2),  # labeled and detected boxes merged, the five pairs tiled as one
    DGDLayout("dgd_ilids", "i-LIDS", "ilids", 2),
    DGDLayout("dgd_prid", "PRID", "prid", 2),
    DGDLayout("dgd_viper", "VIPeR", "viper", 2),
    DGDLayout("dgd_shinpuhkan", "Shinpuhkan", "shinpuhkan", 16),  # trainval only: no test split
)


def _load_dgd_layout(
    layout: DGDLayout,
    root: str,
    *,
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = True,
    val_ratio: float = DGD_VAL_RATIO,
    train_split: bool = True,
    test_splits: bool = True,
) -> ReIDSplits:
    check_wanted_splits(train_split, test_splits)
    if not is_finite_real(val_ratio) or not 0 <= val_ratio < 1:
        raise DatasetError(f"{layout.title}: val_ratio must be a number in [0, 1), got {quote(val_ratio)}")
    dataset_dir = find_dataset_dir(root, ("", layout.folder), DGD_FILES, f"{layout.title} (DGD's format)")
    persons, shot = _read_meta(layout, dataset_dir)
    split = _read_split(dataset_dir, len(persons))
    half = {person: len(persons[person]) // 2 for person in split["test_probe"]}  # DGD's probe: the first views
    train_only = not (split["test_probe"] or split["test_gallery"])  # Shinpuhkan's: every person trains
    if train_only and not train_split:
        raise DatasetError(f"{layout.title} (DGD's format) has no test split (it trains only): test on another set")

    def records(person: int, first: int = 0, stop: Optional[int] = None) -> list[ImageRecord]:
        """The images of ``person``'s views ``first`` to ``stop`` (all by default)."""
        views = persons[person][first:stop]
        return [ImageRecord(os.path.join(dataset_dir, file), person, camera) for view in views for file, camera in view]

    train = []
    if train_split:
        held_out = {
            os.path.join(dataset_dir, file) for file in _validation(persons, split["trainval"], shot, val_ratio)
        }
        train = [r for p in split["trainval"] for r in records(p) if r.path not in held_out]
    query, gallery = [], []
    if test_splits:
        query = [r for p in split["test_probe"] for r in records(p, stop=half[p])]
        gallery = [r for p in split["test_gallery"] for r in records(p, first=half.get(p, 0))]
    read = {r.path for r in (*train, *query, *gallery)}  # the masks of the others share their camera folders
    unused = [r.path for p in range(len(persons)) for r in records(p) if r.path not in read]
    return _assemble(
        layout.name,
        dataset_dir,
        train=train,
        query=query,
        gallery=gallery,
        num_cams=layout.num_cams,
        expected_counts=None,  # split.json's draw decides them
        check_counts=check_counts,
        with_masks=with_masks,
        mask_root=mask_root,
        verify_images=verify_images,
        unused=unused,
        train_split=train_split,
        test_splits=test_splits,
        train_only=train_only,
    )


def _validation(persons: list, trainval: list[int], shot: str, ratio: float) -> set[str]:
    """The files of trainval that DGD's make_lists_id_training.py keeps apart for Caffe's validation: of a single-shot
    set, ``int(ratio * persons) * 2`` persons each give the second half of their shuffled views (keeping the first
    half); of a multi-shot set, ``int(ratio * images)`` images."""
    rng = np.random.default_rng(VALIDATION_SEED)
    if shot == "single":
        chosen = [trainval[i] for i in rng.permutation(len(trainval))[: int(len(trainval) * ratio) * 2]]
        views = [[persons[p][i] for i in rng.permutation(len(persons[p]))] for p in chosen]
        return {file for shuffled in views for view in shuffled[len(shuffled) // 2 :] for file, _ in view}
    files = [file for p in trainval for view in persons[p] for file, _ in view]
    return {files[i] for i in rng.permutation(len(files))[: int(len(files) * ratio)]}


def _read_meta(layout: DGDLayout, dataset_dir: str) -> tuple[list[list[list[tuple[str, int]]]], str]:
    """meta.json's identities as (file, camera) per person and view, and its shot ("single", "multiple"), checked:
    the layout's dataset and cameras; each view one camera's files (in its ``cam_<c>/`` folder: the camera, since
    Shinpuhkan's script lists a person's cameras in the order it meets them), a camera per view; every file once,
    named for its person, present."""
    path = os.path.join(dataset_dir, "meta.json")
    meta = read_json(path, "DGD meta file")
    if not isinstance(meta, dict) or meta.get("name") != layout.title:
        found = meta.get("name") if isinstance(meta, dict) else meta
        raise DatasetError(f"{path}: expected the meta file of {layout.title} (its name), got {quote(found)}")
    if meta.get("num_cameras") != layout.num_cams or not isinstance(meta.get("identities"), list):
        raise DatasetError(f"{path}: expected num_cameras {layout.num_cams} and a list of identities")
    if meta.get("shot") not in SHOTS:
        raise DatasetError(f"{path}: expected shot 'single' or 'multiple', got {quote(meta.get('shot'))}")
    seen, persons = set(), []
    for person, views in enumerate(meta["identities"]):
        if not isinstance(views, list) or len(views) > layout.num_cams:
            raise DatasetError(f"{path}: identity {person} must list at most {layout.num_cams} cameras' files")
        persons.append([])
        for view, files in enumerate(views):
            where = f"{path}: identity {person}, view {view}"
            if not isinstance(files, list):
                raise DatasetError(f"{where}: expected a list of files, got {quote(files)}")
            persons[-1].append([_checked_file(where, dataset_dir, person, layout.num_cams, f, seen) for f in files])
        cameras = [{camera for _, camera in view} for view in persons[-1] if view]
        if any(len(view) > 1 for view in cameras) or len(set().union(*cameras)) < len(cameras):
            raise DatasetError(f"{path}: identity {person}: each view must hold the files of one camera of its own")
    return persons, meta["shot"]


def _checked_file(where: str, dataset_dir: str, person: int, num_cams: int, file, seen: set) -> tuple[str, int]:
    """(``file``, its camera): in a ``cam_<c>/`` folder of a camera below ``num_cams``, named for ``person``, listed
    once, present."""
    folder, _, name = file.partition("/") if isinstance(file, str) else ("", "", "")
    stem = os.path.splitext(name)[0].split("_")
    numbers = (folder[len("cam_") :], stem[0]) if folder.startswith("cam_") and len(stem) == 2 else ("", "")
    if not all(number.isascii() and number.isdigit() for number in numbers) or int(numbers[0]) >= num_cams:
        raise DatasetError(f"{where}: expected 'cam_<camera below {num_cams}>/<person>_<n>.<ext>', got {quote(file)}")
    if int(numbers[1]) != person:
        raise DatasetError(f"{where}: {file} is named for identity {int(numbers[1])}")
    if file in seen:
        raise DatasetError(f"{where}: {file} is listed twice")
    seen.add(file)
    if not os.path.isfile(os.path.join(dataset_dir, file)):
        raise DatasetNotFoundError(f"{where}: image not found: {os.path.join(dataset_dir, file)}")
    return file, int(numbers[0])


def _read_split(dataset_dir: str, num_persons: int) -> dict[str, list[int]]:
    """split.json's person lists, checked as DGD's scripts assume: persons of the meta file, each listed once, no
    trainval person tested, every probe person in the gallery."""
    path = os.path.join(dataset_dir, "split.json")
    split = read_json(path, "DGD split file")
    if not isinstance(split, dict) or any(not isinstance(split.get(key), list) for key in SPLIT_KEYS):
        raise DatasetError(f"{path}: expected lists {', '.join(SPLIT_KEYS)}")
    for key in SPLIT_KEYS:
        bad = next((p for p in split[key] if not is_integer(p) or not 0 <= p < num_persons), None)
        if bad is not None:
            raise DatasetError(f"{path}: {key} holds {quote(bad)}, not an identity of meta.json (0..{num_persons - 1})")
        if len(set(split[key])) != len(split[key]):
            raise DatasetError(f"{path}: {key} lists an identity twice")
    tested = set(split["test_probe"]) | set(split["test_gallery"])
    both = sorted(set(split["trainval"]) & tested)
    if both:
        raise DatasetError(f"{path}: identity {both[0]} is in trainval and in the test split")
    if not set(split["test_probe"]) <= set(split["test_gallery"]):
        raise DatasetError(f"{path}: every test_probe identity must be in test_gallery (its matches)")
    return {key: [int(p) for p in split[key]] for key in SPLIT_KEYS}


DGD_LOADERS = {layout.name: row_loader(_load_dgd_layout, layout) for layout in DGD_LAYOUTS}
