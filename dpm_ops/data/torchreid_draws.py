"""How torchreid draws the split files of its small datasets (:mod:`dpm_ops.data.torchreid_sets`), from a seeded
generator: each function takes the dataset's images and returns the splits of its split file, in torchreid's format."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from .errors import DatasetError, DatasetNotFoundError

if TYPE_CHECKING:
    from .torchreid_sets import SmallSetImages

DRAWS = 10  # torchreid's random splits per dataset (VIPeR's and CUHK01's each used twice, cameras swapped)
PRID_BOTH, PRID_LAST = 200, 749  # persons 1..200 are seen by both cameras, 201..749 by camera B alone


def _two_ways(train: list, test_a: list, test_b: list, num_train: int, num_test: int) -> list[dict]:
    """A draw's two splits, as torchreid lists them: camera A queries, then camera B."""
    counts = {"num_train_pids": num_train, "num_query_pids": num_test, "num_gallery_pids": num_test}
    return [
        {"train": train, "query": test_a, "gallery": test_b, **counts},
        {"train": train, "query": test_b, "gallery": test_a, **counts},
    ]


def draw_viper(images: SmallSetImages, rng: np.random.Generator) -> list[dict]:
    """torchreid's VIPeR draw: half the persons (the i-th images of the two cameras, sorted) train, the others are
    tested, numbered in draw order."""
    cam_a, cam_b = images.files
    if [images.identity[p][0] for p in cam_a] != [images.identity[p][0] for p in cam_b]:
        raise DatasetError(
            f"{images.layout.title}: the two cameras' images do not pair up by name in {images.dataset_dir} "
            f"({len(cam_a)} and {len(cam_b)} images)"
        )
    count, splits = len(cam_a), []
    for _ in range(DRAWS):
        order = [int(i) for i in rng.permutation(count)]
        train = [
            [path, pid, cam]
            for pid, i in enumerate(order[: count // 2])
            for cam, path in enumerate((cam_a[i], cam_b[i]))
        ]
        test = list(enumerate(order[count // 2 :]))
        test_a, test_b = ([[files[i], pid, cam] for pid, i in test] for cam, files in enumerate((cam_a, cam_b)))
        splits += _two_ways(train, test_a, test_b, count // 2, len(test))
    return splits


def draw_cuhk01(images: SmallSetImages, rng: np.random.Generator) -> list[dict]:
    """torchreid's CUHK01 draw: half the persons train (labelled in pid order), the others are tested."""
    (paths,) = images.files
    pids = sorted({images.identity[path][0] for path in paths})
    splits = []
    for _ in range(DRAWS):
        order = rng.permutation(len(pids))
        label = {pid: index for index, pid in enumerate(sorted(pids[i] for i in order[: len(pids) // 2]))}
        train, tested = [], ([], [])
        for path in paths:
            pid, camera = images.identity[path]
            if pid in label:
                train.append([path, label[pid], camera])
            else:
                tested[camera].append([path, pid, camera])
        splits += _two_ways(train, *tested, len(label), len(pids) - len(label))
    return splits


def draw_ilids(images: SmallSetImages, rng: np.random.Generator) -> list[dict]:
    """torchreid's i-LIDS draw: half the persons (rounded down) train, every other one tested on two of its images,
    drawn: one the query, the other the gallery."""
    (paths,) = images.files
    named: dict[int, list[str]] = {}
    for path in paths:
        named.setdefault(images.identity[path][0], []).append(os.path.basename(path))
    pids = sorted(named)
    alone = next((pid for pid in pids if len(named[pid]) < 2), None)
    if alone is not None:
        raise DatasetError(
            f"{images.layout.title}: person {alone} has one image in {images.dataset_dir} (a test needs two)"
        )
    splits = []
    for _ in range(DRAWS):
        order = [pids[i] for i in rng.permutation(len(pids))]
        train_pids, test_pids = order[: len(pids) // 2], order[len(pids) // 2 :]
        pairs = [[named[pid][i] for i in rng.choice(len(named[pid]), 2, replace=False)] for pid in test_pids]
        train = [name for pid in train_pids for name in named[pid]]
        splits.append({"train": train, "query": [q for q, _ in pairs], "gallery": [g for _, g in pairs]})
    return splits


def draw_prid(images: SmallSetImages, rng: np.random.Generator) -> list[dict]:
    """torchreid's PRID draw: 100 of the 200 persons both cameras saw train, the others are tested."""
    persons = np.arange(1, PRID_BOTH + 1)
    splits = []
    for _ in range(DRAWS):
        train = sorted(int(pid) for pid in rng.choice(persons, PRID_BOTH // 2, replace=False))
        splits.append({"train": train, "test": [int(pid) for pid in persons if pid not in train]})
    return splits


def draw_grid(images: SmallSetImages, rng: np.random.Generator) -> list[dict]:
    """GRID's own ten partitions (no draw): each split's 125 train persons from features_and_partitions.mat, as
    torchreid reads them; the other persons' probe images are the query, their gallery images the gallery."""
    path = os.path.join(images.dataset_dir, "underground_reid", "features_and_partitions.mat")
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"GRID: neither the split file {images.split_path} nor the partitions {path}")
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise DatasetError(
            f"GRID: reading its partitions {path} (once, to write {images.split_path}) needs scipy (pip install scipy)"
        ) from None
    try:
        partitions = loadmat(path)["trainIdxAll"][0]
        trained = [[int(i) for i in partitions[draw][0][0][2][0]] for draw in range(DRAWS)]
    except (KeyError, IndexError, TypeError, ValueError, OSError, MatReadError) as error:
        raise DatasetError(f"{path}: expected GRID's ten partitions (trainIdxAll): {error}") from None
    splits = []
    for train_pids in trained:
        label = {pid: index for index, pid in enumerate(train_pids)}
        lists = {"train": [], "query": [], "gallery": []}
        for tested, paths in zip(("query", "gallery"), images.files):
            for path in paths:
                pid, camera = images.identity[path]
                lists["train" if pid in label else tested].append([path, label.get(pid, pid), camera])
        counts = {"num_train_pids": len(label), "num_query_pids": 125, "num_gallery_pids": 900}  # torchreid's
        splits.append({**lists, **counts})
    return splits
