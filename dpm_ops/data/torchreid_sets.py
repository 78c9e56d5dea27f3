"""torchreid's small datasets with their split protocols: VIPeR, GRID, i-LIDS, PRID2011 (single shot), CUHK01,
CUHK02 and CUHK-SYSU's person crops (which train only), in the folders torchreid reads (``<root>/viper/VIPeR/cam_a/``,
...; ``root`` may also be the dataset's own folder). ``split_id`` picks one of the random splits in the split file
torchreid keeps in the dataset folder (``splits.json``; PRID's ``splits_single_shot.json``): a paper's number is the
mean over the splits, a run each.

* A split file torchreid wrote is read as it is: the train, query and gallery lists, ids and cameras of torchreid's
  own loader, split by split. Its paths are absolute where torchreid ran; each is read as the same file of this
  dataset folder (a copy moved or mounted elsewhere reads), which must be there, on the camera its name says.
* Where there is none, the splits are drawn as torchreid draws them but from a seeded generator (torchreid's draws
  are unseeded) and written where torchreid looks, in its format: torchreid then reads the same splits, and so
  does every later run. A folder that cannot be written is a warning, the same draw made each time.
* GRID's ten splits are its own partitions (``underground_reid/features_and_partitions.mat``, read with scipy, which
  only the first load needs). CUHK02's split is fixed (P1-P4 train, P5 test: camera 1 query, camera 2 gallery).

Kept from torchreid: VIPeR's and CUHK01's splits come in pairs sharing a train split, query and gallery cameras
swapped (20 splits of 10 draws; their test ids numbered in draw order); i-LIDS tests one random image pair per test
person (its "camera" is the image's place in the person's sequence, 8 at most); PRID's gallery adds the 549
persons of camera B alone and GRID's the 775 images of no one (pid 0): distractors (``distractor_pids``), left out of
``combineall``. Train labels are the split file's, or 0..N-1 in the order of the ids where it lists the persons' own
(i-LIDS, PRID), as torchreid numbers them (its CUHK02 and CUHK-SYSU number them in the iteration order of a set of
strings, which changes with each Python process). torchreid's CUHK03 is :mod:`dpm_ops.data.cuhk03_release`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import warnings
from typing import Callable, Optional

import numpy as np

from dpm_ops.ops._checks import is_integer, quote

from .._stack import stacklevel_outside
from .assembly import _assemble, check_wanted_splits, row_loader
from .errors import DatasetError, DatasetNotFoundError
from .parsing import find_dataset_dir, list_images, read_json
from .records import ImageRecord
from .torchreid_draws import PRID_BOTH, PRID_LAST, draw_cuhk01, draw_grid, draw_ilids, draw_prid, draw_viper

SPLIT_SEED = 0  # the generator of splits drawn here (torchreid's draws are unseeded)
_HERE = os.path.dirname(os.path.abspath(__file__))  # a warning points past the loaders, at their caller


@dataclasses.dataclass(frozen=True)
class SmallSet:
    """One of torchreid's small datasets: one row, one public loader."""

    name: str  # registry name
    title: str
    folder: str  # torchreid's folder under root
    image_folders: tuple[str, ...]  # under the dataset folder; a folder's index is its camera where names hold none
    suffix: str
    name_pattern: str  # a file name's stem: the pid, then the 1-based camera or image index where names hold it
    num_cams: int
    split_file: Optional[str]  # None: one fixed split
    read: Callable  # (images, split, where) -> (train, query, gallery) records of a split of the split file
    draw: Optional[Callable] = None  # (images, rng) -> the splits of a split file written where there is none
    # (layout, root) -> the dataset folder, its images and split files made first where absent (CUHK03's, from its .mat)
    locate: Optional[Callable] = None
    published: Optional[dict] = None  # every split's (ids, images) where they are fixed
    distractor_pids: frozenset = frozenset()
    first_pid: int = 0  # the pid of a name's first person, numbered 0 (CUHK01's 1: torchreid's pids are 0-based)
    train_only: bool = False  # no test split: query and gallery are never read (a test of it is an error)
    other_folders: tuple[str, ...] = ()  # other names of its folder under root (fast-reid's)
    module: str = "torchreid_sets"  # the module of dpm_ops.data whose docstring tells more
    views_per_camera: int = 1  # images of a camera a name's image number counts (CUHK01: 1-2 camera 0, 3-4 camera 1)

    @property
    def about(self) -> str:  # the loader's docstring
        where = f"``{self.folder}/{{{','.join(self.image_folders)}}}/``"
        split = f"split ``split_id`` of ``{self.split_file}``" if self.split_file else "its fixed split"
        return f"""{self.title} as torchreid reads it: {where}, {split}. See :mod:`dpm_ops.data.{self.module}`.

    ``root`` may be the ``{self.folder}`` folder or the one holding it.
    """


def _load_small_set(
    layout: SmallSet,
    root: str,
    *,
    split_id: int = 0,
    with_masks: bool = False,
    mask_root: Optional[str] = None,
    check_counts: str = "warn",
    verify_images: bool = True,
    train_split: bool = True,
    test_splits: bool = True,
):
    check_wanted_splits(train_split, test_splits)
    if not is_integer(split_id) or split_id < 0:
        raise DatasetError(f"{layout.title}: split_id must be an integer >= 0, got {quote(split_id)}")
    if layout.train_only and not train_split:
        raise DatasetError(f"{layout.title} has no test split (it trains only): test on another set")
    dataset_dir = (layout.locate or find_small_set)(layout, root)
    files = [list_images(os.path.join(dataset_dir, folder), layout.suffix) for folder in layout.image_folders]
    images = SmallSetImages(layout, dataset_dir, files)
    listed = _split_file(layout, images) if layout.split_file else [{}]  # the split file's splits
    if split_id >= len(listed):
        raise DatasetError(
            f"{layout.title}: split_id {split_id} is past the splits of {images.split_path} (0..{len(listed) - 1})"
        )
    where = f"{images.split_path}, split {split_id}" if layout.split_file else dataset_dir
    train, query, gallery = layout.read(images, listed[split_id], where)
    _check_apart(where, train, query, gallery)
    if not train_split:
        train = []
    if not test_splits:
        query, gallery = [], []
    read = {r.path for r in (*train, *query, *gallery)}
    return _assemble(
        layout.name,
        dataset_dir,
        train=train,
        query=query,
        gallery=gallery,
        num_cams=layout.num_cams,
        expected_counts=layout.published,
        check_counts=check_counts,
        with_masks=with_masks,
        mask_root=mask_root,
        verify_images=verify_images,
        distractor_pids=layout.distractor_pids,
        unused=[path for folder in files for path in folder if path not in read],  # their masks may be there
        train_split=train_split,
        test_splits=test_splits,
        train_only=layout.train_only,
    )


def find_small_set(layout: SmallSet, root: str) -> str:
    """The dataset folder: ``root`` or its folder of the dataset's name (CUHK02's ``cuhk02/Dataset`` or ``Dataset``,
    CUHK-SYSU's ``cuhksysu`` or fast-reid's ``cuhk_sysu``)."""
    candidates = dict.fromkeys(("", layout.folder, os.path.basename(layout.folder), *layout.other_folders))
    return find_dataset_dir(root, candidates, layout.image_folders, layout.title)


class SmallSetImages:
    """The images of a dataset folder, each with the pid and camera its name (or folder) gives."""

    def __init__(self, layout: SmallSet, dataset_dir: str, files: list[list[str]]):
        self.layout, self.dataset_dir, self.files = layout, dataset_dir, files
        self.split_path = os.path.join(dataset_dir, layout.split_file) if layout.split_file else None
        pattern = re.compile(layout.name_pattern)
        self.identity: dict[str, tuple[int, int]] = {}  # path -> (pid, camera)
        for camera, paths in enumerate(files):
            for path in paths:
                match = pattern.fullmatch(os.path.splitext(os.path.basename(path))[0])
                if match is None:
                    raise DatasetError(f"{layout.title}: cannot read a person from the file name {path}")
                self.identity[path] = _identity(layout, match.groups(), camera, path)
        self.by_place = {(folder, os.path.basename(path)): path for folder, paths in enumerate(files) for path in paths}

    def record(self, path: str, pid: Optional[int] = None) -> ImageRecord:
        """``path``'s record, with the pid its name gives or ``pid``."""
        named, camera = self.identity[path]
        return ImageRecord(path, named if pid is None else pid, camera)

    def resolve(self, stored, where: str) -> str:
        """The image of this folder that a split file's path (written where torchreid ran) or name stands for."""
        parts = re.split(r"[\\/]", stored) if isinstance(stored, str) else []
        bare_name = len(parts) == 1 and len(self.layout.image_folders) == 1  # i-LIDS's split file
        for folder, relative in enumerate(self.layout.image_folders):
            tail = relative.split("/")
            if bare_name or parts[-len(tail) - 1 : -1] == tail:
                path = self.by_place.get((folder, parts[-1]))
                if path is None:
                    wanted = os.path.join(self.dataset_dir, relative, parts[-1])
                    raise DatasetNotFoundError(f"{where}: {quote(stored)} is not here: no image {wanted}")
                return path
        folders = " or ".join(self.layout.image_folders)
        raise DatasetError(f"{where}: expected an image of {folders}, got {quote(stored)}")


def _identity(layout: SmallSet, fields: tuple[str, ...], folder: int, path: str) -> tuple[int, int]:
    """(pid, 0-based camera) from a name's fields: the camera is the folder's unless the name holds it (or the
    image's number, ``views_per_camera`` of them a camera)."""
    pid = int(fields[0]) - layout.first_pid
    if len(fields) == 1:
        return pid, folder
    number, limit = int(fields[1]), layout.num_cams * layout.views_per_camera
    if not 1 <= number <= limit:
        raise DatasetError(f"{layout.title}: camera / image {number} outside 1..{limit} in {path}")
    return pid, (number - 1) // layout.views_per_camera


def _split_file(layout: SmallSet, images: SmallSetImages) -> list:
    """The splits of the split file; where there is none, drawn as torchreid draws them (seeded) and written."""
    path = images.split_path
    if not os.path.exists(path) and layout.draw is not None:
        drawn = layout.draw(images, np.random.default_rng(SPLIT_SEED))
        if not _write_new(path, drawn):
            return json.loads(json.dumps(drawn))  # as read from the file
    splits = read_json(path, f"{layout.title} split file")
    if not isinstance(splits, list) or not splits or not all(isinstance(split, dict) for split in splits):
        raise DatasetError(f"{path}: expected a list of splits (torchreid's split file), got {quote(splits)}")
    return splits


def _write_new(path: str, splits: list) -> bool:
    """Write ``splits`` as torchreid does (its ``write_json``) unless another load (the same draw) or torchreid wrote
    the file first: created whole, never replacing one. False, with a warning, where the folder is not writable."""
    try:
        handle = tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".tmp", delete=False)
    except OSError as error:
        warnings.warn(
            f"cannot write the split file {path} ({error.strerror}): its splits are drawn again, the same, at "
            "each load; torchreid would draw others",
            stacklevel=stacklevel_outside(_HERE),
        )
        return False
    try:
        with handle:
            json.dump(splits, handle, indent=4, separators=(",", ": "))
        os.link(handle.name, path)  # an error where the file is there
    except FileExistsError:
        pass
    finally:
        os.unlink(handle.name)
    return True


def _entries(split: dict, key: str, where: str) -> list:
    if not isinstance(split.get(key), list):
        raise DatasetError(f"{where}: expected a list {key!r}, got {quote(split.get(key))}")
    return split[key]


def _read_records(images: SmallSetImages, split: dict, where: str):
    """VIPeR's, GRID's and CUHK01's splits: lists of [path, pid, camera], each path an image of this folder, on the
    camera its name (or folder) says."""
    lists = []
    for key in ("train", "query", "gallery"):
        records = []
        for entry in _entries(split, key, where):
            if not (isinstance(entry, list) and len(entry) == 3 and is_integer(entry[1]) and entry[1] >= 0):
                raise DatasetError(f"{where}: {key} entries must be [path, pid, camera], got {quote(entry)}")
            record = images.record(images.resolve(entry[0], f"{where}, {key}"), int(entry[1]))
            if entry[2] != record.camid:
                raise DatasetError(f"{where}: {key} puts {entry[0]} on camera {quote(entry[2])}, not {record.camid}")
            records.append(record)
        lists.append(records)
    return lists


def _read_names(images: SmallSetImages, split: dict, where: str):
    """i-LIDS's splits: lists of image names, the pid and camera in each name."""
    return [
        [images.record(images.resolve(name, f"{where}, {key}")) for name in _entries(split, key, where)]
        for key in ("train", "query", "gallery")
    ]


def _read_prid(images: SmallSetImages, split: dict, where: str):
    """PRID's splits: train and test pids of the 200 persons both cameras saw; the gallery adds camera B's others."""

    def image(camera: int, pid) -> ImageRecord:
        path = images.by_place.get((camera, f"person_{pid:04d}.png"))
        if path is None:
            folder = os.path.join(images.dataset_dir, images.layout.image_folders[camera])
            raise DatasetNotFoundError(f"{where}: no image of person {pid} in {folder}")
        return images.record(path)

    lists = {key: _entries(split, key, where) for key in ("train", "test")}
    for key, pids in lists.items():
        bad = next((pid for pid in pids if not is_integer(pid) or not 1 <= pid <= PRID_BOTH), None)
        if bad is not None:
            raise DatasetError(f"{where}: {key} holds {quote(bad)}, not one of the persons 1..{PRID_BOTH}")
    train = [image(camera, int(pid)) for pid in lists["train"] for camera in (0, 1)]
    query = [image(0, int(pid)) for pid in lists["test"]]
    gallery = [image(1, int(pid)) for pid in (*lists["test"], *range(PRID_BOTH + 1, PRID_LAST + 1))]
    return train, query, gallery


def _check_apart(where: str, train: list[ImageRecord], query: list[ImageRecord], gallery: list[ImageRecord]) -> None:
    """No image twice in a split, nor trained on and tested."""
    for key, records in (("train", train), ("query", query), ("gallery", gallery)):
        paths = [r.path for r in records]
        if len(set(paths)) != len(paths):
            raise DatasetError(f"{where}: {key} lists an image twice")
    tested = {r.path for r in (*query, *gallery)}
    both = next((r.path for r in train if r.path in tested), None)
    if both is not None:
        raise DatasetError(f"{where}: {both} is in the train split and tested")


def _read_train_only(images: SmallSetImages, split: dict, where: str):
    """A set that trains only (CUHK-SYSU's crops): every image, its person from its name, on camera 0."""
    return [images.record(path) for paths in images.files for path in paths], [], []


def _read_cuhk02(images: SmallSetImages, split: dict, where: str):
    """CUHK02's fixed split: the persons of pairs P1-P4 train (labelled pair by pair, each pair's in pid order),
    pair P5 tested, camera 1 the query and camera 2 the gallery."""
    train, first = [], 0
    for pair in range(4):
        paths = [*images.files[2 * pair], *images.files[2 * pair + 1]]
        label = {pid: first + index for index, pid in enumerate(sorted({images.identity[p][0] for p in paths}))}
        train += [images.record(path, label[images.identity[path][0]]) for path in paths]
        first += len(label)
    return train, [images.record(path) for path in images.files[8]], [images.record(path) for path in images.files[9]]


SMALL_SETS = (
    SmallSet(
        "viper",
        "VIPeR",
        "viper",
        ("VIPeR/cam_a", "VIPeR/cam_b"),
        ".bmp",
        r"([0-9]+)_.*",
        2,
        "splits.json",
        _read_records,
        draw_viper,
        published={"train": (316, 632), "query": (316, 316), "gallery": (316, 316)},
    ),
    SmallSet(
        "grid",
        "GRID",
        "grid",
        ("underground_reid/probe", "underground_reid/gallery"),
        ".jpeg",
        r"([0-9]+)_([0-9]+)_.*",
        8,
        "splits.json",
        _read_records,
        draw_grid,
        distractor_pids=frozenset({0}),
    ),
    SmallSet(
        "ilids",
        "i-LIDS",
        "ilids",
        ("i-LIDS_Pedestrian/Persons",),
        ".jpg",
        r"([0-9]{4})([0-9]{3})",
        8,
        "splits.json",
        _read_names,
        draw_ilids,
        published={"query": (60, 60), "gallery": (60, 60)},
    ),
    SmallSet(
        "prid",
        "PRID2011",
        "prid2011",
        ("prid_2011/single_shot/cam_a", "prid_2011/single_shot/cam_b"),
        ".png",
        r"person_([0-9]+)",
        2,
        "splits_single_shot.json",
        _read_prid,
        draw_prid,
        published={"train": (100, 200), "query": (100, 100), "gallery": (649, 649)},
        distractor_pids=frozenset(range(PRID_BOTH + 1, PRID_LAST + 1)),
    ),
    SmallSet(
        "cuhk01",
        "CUHK01",
        "cuhk01",
        ("campus",),
        ".png",
        r"([0-9]{4})([0-9]{3})",
        2,
        "splits.json",
        _read_records,
        draw_cuhk01,
        published={"train": (485, 1940), "query": (486, 972), "gallery": (486, 972)},
        first_pid=1,
        views_per_camera=2,
    ),
    SmallSet(
        "cuhk02",
        "CUHK02",
        "cuhk02/Dataset",
        tuple(f"P{pair}/cam{camera}" for pair in range(1, 6) for camera in (1, 2)),
        ".png",
        r"([0-9]+)_.*",
        10,
        None,
        _read_cuhk02,
    ),
    SmallSet(
        "cuhksysu",
        "CUHK-SYSU",
        "cuhksysu",
        ("cropped_images",),
        ".jpg",
        r"p([0-9]+)_s[0-9]+(?:_[0-9]+)*",  # p<person>_s<scene>_<n>: one camera (torchreid's and fast-reid's 0)
        1,
        None,
        _read_train_only,
        published={"train": (11934, 34574)},
        train_only=True,
        other_folders=("cuhk_sysu",),
    ),
)
SMALL_SET_LOADERS = {  # a set with one fixed split takes no split_id (dataset.split_id picks the others')
    layout.name: row_loader(_load_small_set, layout, omit=() if layout.split_file else ("split_id",))
    for layout in SMALL_SETS
}
