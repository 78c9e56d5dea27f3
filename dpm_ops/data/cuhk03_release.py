"""CUHK03 as torchreid and fast-reid read it: the release's ``cuhk03_release/cuhk-03.mat`` (MATLAB 7.3: HDF5)
extracted once into ``images_labeled/`` and ``images_detected/`` (``<pair>_<person:03d>_<view>_<image:02d>.png``)
beside the split files ``splits_classic_{labeled,detected}.json`` (the release's 20 classic test sets of 100
persons, each a split whose query and gallery are both the test persons' images: ``eval.protocol: cuhk03``) and
``splits_new_{labeled,detected}.json`` (the 767/700 split of ``cuhk03_new_protocol_config_{labeled,detected}.mat``).

Datasets ``cuhk03_detected`` (torchreid's default), ``cuhk03_labeled`` (fast-reid's; ``cuhk03`` alone is an error
naming both) and ``cuhk03_classic_detected`` / ``cuhk03_classic_labeled`` (``split_id`` 0..19). A folder torchreid
or fast-reid extracted is read as it is, their lists (tested against torchreid's loader). Where its images or split
files are absent they are extracted here as torchreid extracts them (h5py reads the release, scipy the new
protocol's files; once, a few minutes for the 28,194 images), each image written whole, the split files as torchreid
writes them; one load extracts while any other waits. The camera is the view of the person's camera pair (0 or
1): persons are numbered over the pairs, so no two pairs' views meet in a ranking.
"""

from __future__ import annotations

import fcntl
import os
from typing import Optional

import numpy as np
from PIL import Image

from .assembly import row_loader
from .errors import DatasetError, DatasetNotFoundError
from .parsing import find_dataset_dir
from .torchreid_sets import SmallSet, _load_small_set, _read_records, _write_new

RELEASE = "cuhk03_release/cuhk-03.mat"
KINDS = ("labeled", "detected")
PERSON_NAME = r"[1-5]_([0-9]{3})_([12])_[0-9]{2}"  # pair, person, view, image: the person's view is the camera


def _locate(layout: SmallSet, root: str) -> str:
    """The dataset folder: one with the images and split file the layout reads, or one with the release, extracted
    first where anything torchreid extracts is absent."""
    candidates = ("", "cuhk03")
    try:
        return find_dataset_dir(root, candidates, (*layout.image_folders, layout.split_file), layout.title)
    except DatasetNotFoundError as extracted:
        try:
            dataset_dir = find_dataset_dir(root, candidates, (RELEASE,), layout.title)
        except DatasetNotFoundError:
            raise DatasetNotFoundError(f"{extracted}; nor the release {RELEASE} to extract them from") from None
    _extract(dataset_dir)
    if not os.path.isfile(os.path.join(dataset_dir, layout.split_file)):  # the new split without its protocol file
        kind = layout.image_folders[0].removeprefix("images_")
        raise DatasetNotFoundError(
            f"{layout.title}: {layout.split_file} is made from cuhk03_new_protocol_config_{kind}.mat, not in "
            f"{dataset_dir}"
        )
    return dataset_dir


def _extract(dataset_dir: str) -> None:
    """What torchreid's ``preprocess_split`` writes, where absent: the images of both kinds, the classic split files,
    and the new ones of the protocol files present; one process at a time (a lock file), the others then find it
    done."""
    try:
        import h5py
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise DatasetError(
            f"CUHK03: extracting {os.path.join(dataset_dir, RELEASE)} needs h5py and scipy (pip install h5py scipy)"
        ) from None
    try:
        lock = open(os.path.join(dataset_dir, ".dpm_ops_cuhk03.lock"), "a")
    except OSError as error:
        raise DatasetError(f"CUHK03: cannot extract the release into {dataset_dir}: {error.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(dataset_dir, RELEASE)
        try:
            with h5py.File(path, "r") as mat:
                persons = {
                    kind: _extract_images(mat, kind, os.path.join(dataset_dir, f"images_{kind}")) for kind in KINDS
                }
                tests = [[(int(a), int(b)) for a, b in _read(mat, ref).tolist()] for ref in mat["testsets"][0]]
        except (OSError, KeyError, ValueError, TypeError, IndexError) as error:
            raise DatasetError(f"{path}: not CUHK03's release (labeled, detected, testsets cells): {error}") from None
        for kind in KINDS:
            _write_new(os.path.join(dataset_dir, f"splits_classic_{kind}.json"), _classic_splits(persons[kind], tests))
            protocol = os.path.join(dataset_dir, f"cuhk03_new_protocol_config_{kind}.mat")
            if os.path.isfile(protocol):
                try:
                    config = loadmat(protocol)
                except (OSError, ValueError, MatReadError) as error:
                    raise DatasetError(f"{protocol}: not a MATLAB file scipy reads: {error}") from None
                new = _new_split(config, os.path.join(dataset_dir, f"images_{kind}"), protocol)
                _write_new(os.path.join(dataset_dir, f"splits_new_{kind}.json"), [new])


def _read(mat, ref) -> np.ndarray:
    """A MATLAB 7.3 cell's array, in MATLAB's axis order (HDF5 stores it transposed)."""
    return mat[ref][()].T


def _extract_images(mat, kind: str, folder: str) -> list[tuple[int, int, list[str]]]:
    """Each person's images of ``kind`` written to ``folder`` (those written before kept, as torchreid does), as
    (pair, person, paths), 1-based, in the release's order; an empty cell is no image."""
    os.makedirs(folder, exist_ok=True)
    persons = []
    for pair, pair_ref in enumerate(mat[kind][0], start=1):
        cells = _read(mat, pair_ref)
        for person in range(1, cells.shape[0] + 1):
            paths = []
            for index, ref in enumerate(cells[person - 1], start=1):
                image = _read(mat, ref)
                if image.size == 0 or image.ndim < 3:
                    continue
                view = 1 if index <= 5 else 2  # images 1-5 are the pair's first camera, 6-10 its second
                path = os.path.join(folder, f"{pair}_{person:03d}_{view}_{index:02d}.png")
                if not os.path.isfile(path):  # written whole: a .partial file left by a kill is no image here
                    Image.fromarray(image).save(path + ".partial", format="PNG")
                    os.replace(path + ".partial", path)
                paths.append(path)
            if not paths:
                raise DatasetError(f"CUHK03: pair {pair}, person {person} has no {kind} image in the release")
            persons.append((pair, person, paths))
    return persons


def _camera(path: str) -> int:
    return int(os.path.basename(path).split("_")[2]) - 1


def _classic_splits(persons: list, tests: list[list[tuple[int, int]]]) -> list[dict]:
    """torchreid's classic splits: a test set's persons tested (query = gallery = their images), the others train,
    each side's persons numbered in the release's order."""
    splits = []
    for test in tests:
        tested = set(test)
        sides = {"train": [], "test": []}
        persons_of = {"train": 0, "test": 0}
        for pair, person, paths in persons:
            side = "test" if (pair, person) in tested else "train"
            sides[side] += [[path, persons_of[side], _camera(path)] for path in paths]
            persons_of[side] += 1
        counts = {}
        for key, side in (("train", "train"), ("query", "test"), ("gallery", "test")):
            counts.update({f"num_{key}_pids": persons_of[side], f"num_{key}_imgs": len(sides[side])})
        splits.append({"train": sides["train"], "query": sides["test"], "gallery": sides["test"], **counts})
    return splits


def _new_split(config: dict, folder: str, path: str) -> dict:
    """The 767/700 split of a new-protocol file, as torchreid lists it: train persons labelled 0..766, test pids
    the file's."""
    try:
        pids = [int(pid) for pid in config["labels"].flatten()]
        names = [str(name[0]) for name in config["filelist"].flatten()]
        indices = {key: config[f"{key}_idx"].flatten().astype(np.int64) - 1 for key in ("train", "query", "gallery")}
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise DatasetError(f"{path}: not a CUHK03 new-protocol file (labels, filelist, *_idx): {error}") from None
    # torchreid numbers them in the iteration order of a set of the pids (ascending for the release's, which are
    # below the set's table size; a set of ints iterates in the same order in every process)
    label = {pid: index for index, pid in enumerate(set(pids[i] for i in indices["train"]))}
    split = {}
    for key, chosen in indices.items():
        numbered = label if key == "train" else {pid: pid for pid in label.keys() | set(pids)}
        split[key] = [[os.path.join(folder, names[i]), numbered[pids[i]], _camera(names[i])] for i in chosen]
        split.update({f"num_{key}_pids": len({pids[i] for i in chosen}), f"num_{key}_imgs": len(chosen)})
    return split


def _row(kind: str, classic: bool, published: Optional[dict]) -> SmallSet:
    split = "classic" if classic else "new"
    return SmallSet(
        f"cuhk03_classic_{kind}" if classic else f"cuhk03_{kind}",
        f"CUHK03 ({kind}, {split} split)",
        "cuhk03",
        (f"images_{kind}",),
        ".png",
        PERSON_NAME,
        2,
        f"splits_{split}_{kind}.json",
        _read_records,
        locate=_locate,
        published=published,
        module="cuhk03_release",
    )


CUHK03_ROWS = (
    _row("detected", False, {"train": (767, 7365), "query": (700, 1400), "gallery": (700, 5332)}),
    _row("labeled", False, {"train": (767, 7368), "query": (700, 1400), "gallery": (700, 5328)}),
    _row("detected", True, None),
    _row("labeled", True, None),
)
CUHK03_LOADERS = {layout.name: row_loader(_load_small_set, layout) for layout in CUHK03_ROWS}
