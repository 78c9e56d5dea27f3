"""CUHK03 from its release (dpm_ops.data.cuhk03_release) against torchreid 0.2.5's own loader, run from its file: a
folder torchreid extracted is read into torchreid's lists; the extraction here writes the same images (pixels), the
same split files and so the same lists, which torchreid then reads. A small release written as MATLAB 7.3 writes
one (HDF5 cells, each array stored transposed), new-protocol files as scipy writes MATLAB 5 files."""

import json
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.reference import peers
from dpm_ops.data import DatasetError, DatasetNotFoundError, build_dataset

h5py = pytest.importorskip("h5py")
scipy_io = pytest.importorskip("scipy.io")

PAIR_PERSONS = (3, 2, 2, 2, 3)  # persons of the five camera pairs (the release: 843, 440, 77, 58, 49)
VARIANTS = {  # registry name: torchreid's options
    "cuhk03_detected": {"cuhk03_labeled": False, "cuhk03_classic_split": False},
    "cuhk03_labeled": {"cuhk03_labeled": True, "cuhk03_classic_split": False},
    "cuhk03_classic_detected": {"cuhk03_labeled": False, "cuhk03_classic_split": True},
    "cuhk03_classic_labeled": {"cuhk03_labeled": True, "cuhk03_classic_split": True},
}


def write_release(root: Path, *, new_protocol: bool = True) -> Path:
    """``root/cuhk03`` with a small cuhk-03.mat (both kinds, some cells empty, 20 test sets of 3 persons) and the
    new-protocol files (person 1 of each pair and pair 5's persons tested: query the first image of each view)."""
    folder = root / "cuhk03"
    (folder / "cuhk03_release").mkdir(parents=True)
    rng = np.random.default_rng(5)
    files = {kind: [] for kind in ("labeled", "detected")}  # (name, global person) per image, as extracted
    with h5py.File(folder / "cuhk03_release" / "cuhk-03.mat", "w") as mat:
        stored = mat.create_group("#refs#")

        def store(array, dtype=None):  # MATLAB's array, stored transposed
            name = str(len(stored))
            stored.create_dataset(name, data=np.asarray(array).T, dtype=dtype)
            return stored[name].ref

        for kind in files:
            pairs = []
            for pair, count in enumerate(PAIR_PERSONS, start=1):
                cells = np.empty((count, 10), dtype=object)
                for person in range(count):
                    for index in range(10):
                        empty = (index + person + pair + len(kind)) % 4 == 0
                        image = rng.integers(0, 256, (6 + index, 4, 3), dtype=np.uint8)
                        cells[person, index] = store(np.zeros(2, np.uint64) if empty else image)
                        if not empty:
                            view = 1 if index < 5 else 2
                            name = f"{pair}_{person + 1:03d}_{view}_{index + 1:02d}.png"
                            files[kind].append((name, 10 * pair + person + 1))
                pairs.append(store(cells, h5py.ref_dtype))
            mat.create_dataset(kind, data=np.array([pairs], dtype=object), dtype=h5py.ref_dtype)
        everyone = [(pair, person) for pair, count in enumerate(PAIR_PERSONS, 1) for person in range(1, count + 1)]
        tests = [store(np.array([everyone[i] for i in rng.choice(12, 3, replace=False)], float)) for _ in range(20)]
        mat.create_dataset("testsets", data=np.array([tests], dtype=object), dtype=h5py.ref_dtype)
    if new_protocol:
        for kind, images in files.items():
            tested = {pid for _, pid in images if pid % 10 == 1 or pid > 50}
            train = [i for i, (_, pid) in enumerate(images) if pid not in tested]
            first = {}
            for i, (name, pid) in enumerate(images):
                first.setdefault((pid, name.split("_")[2]), i)
            query = sorted(i for (pid, _), i in first.items() if pid in tested)
            gallery = [i for i, (_, pid) in enumerate(images) if pid in tested and i not in query]
            filelist = np.empty((len(images), 1), dtype=object)
            filelist[:, 0] = [name for name, _ in images]
            scipy_io.savemat(
                folder / f"cuhk03_new_protocol_config_{kind}.mat",
                {
                    "filelist": filelist,
                    "labels": np.array([[pid] for _, pid in images], np.int32),
                    **{
                        f"{key}_idx": np.array(idx, np.int32).reshape(-1, 1) + 1
                        for key, idx in (("train", train), ("query", query), ("gallery", gallery))
                    },
                },
            )
    return root


def torchreid_lists(root, name: str, split_id: int = 0):
    module = peers.torchreid_dataset("cuhk03")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = module.CUHK03(root=str(root), split_id=split_id, verbose=False, **VARIANTS[name])
    return [[tuple(r[:3]) for r in split] for split in (dataset.train, dataset.query, dataset.gallery)]


def our_lists(root, name: str, split_id: int = 0):
    splits = build_dataset(name, str(root), split_id=split_id, check_counts="off")
    return [[tuple(r) for r in split] for split in (splits.train, splits.query, splits.gallery)]


def relative(lists, root):
    return [[(str(Path(p).relative_to(root)), *rest) for p, *rest in split] for split in lists]


def test_a_folder_torchreid_extracted_is_read_as_torchreid_reads_it(tmp_path):
    root = write_release(tmp_path)
    torchreid_lists(root, "cuhk03_detected")  # torchreid extracts the images and writes the four split files
    for name in VARIANTS:
        for split_id in (0, 7, 19) if "classic" in name else (0,):
            assert our_lists(root, name, split_id) == torchreid_lists(root, name, split_id), (name, split_id)


def test_the_extraction_writes_what_torchreid_writes(tmp_path):
    theirs = write_release(tmp_path / "theirs")
    ours = write_release(tmp_path / "ours")
    torchreid_lists(theirs, "cuhk03_labeled")
    loaded = our_lists(ours, "cuhk03_classic_labeled", 3)  # extracts here
    extracted = sorted(p.relative_to(ours) for p in ours.rglob("images_*/*.png"))
    assert extracted == sorted(p.relative_to(theirs) for p in theirs.rglob("images_*/*.png")) and extracted
    for path in extracted:
        assert np.array_equal(np.asarray(Image.open(ours / path)), np.asarray(Image.open(theirs / path))), path
    for file in sorted((theirs / "cuhk03").glob("splits_*.json")):
        written = (ours / "cuhk03" / file.name).read_text().replace(str(ours), str(theirs))
        assert json.loads(written) == json.loads(file.read_text()), file.name
    assert loaded == torchreid_lists(ours, "cuhk03_classic_labeled", 3)  # torchreid reads ours (nothing re-made)
    splits = build_dataset("cuhk03_detected", str(ours), check_counts="off")  # torchreid's default
    assert splits.name == "cuhk03_detected" and {r.camid for r in splits.query} == {0, 1}
    with pytest.raises(DatasetError, match="'CUHK03' is ambiguous: torchreid's cuhk03 is cuhk03_detected, fast-reid"):
        build_dataset("CUHK03", str(ours))
    assert not list((ours / "cuhk03").rglob("*.tmp*"))


def test_two_loads_extract_once(tmp_path):
    root = write_release(tmp_path)
    results, errors = [], []

    def load():
        try:
            results.append(our_lists(root, "cuhk03_classic_detected", 2))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results[0] == results[1]


def test_missing_and_bad_release_files_are_named(tmp_path):
    with pytest.raises(
        DatasetNotFoundError,
        match="no folder with images_detected, splits_new_detected.json .*nor the release cuhk03_release/cuhk-03.mat",
    ):
        our_lists(tmp_path, "cuhk03_detected")
    root = write_release(tmp_path / "a", new_protocol=False)
    with pytest.raises(
        DatasetNotFoundError, match="splits_new_labeled.json is made from cuhk03_new_protocol_config_labeled.mat"
    ):
        our_lists(root, "cuhk03_labeled")
    assert len(our_lists(root, "cuhk03_classic_labeled")[1]) > 0  # the classic splits need the release alone
    with pytest.raises(
        DatasetError, match=r"split_id 20 is past the splits of .*splits_classic_labeled.json \(0..19\)"
    ):
        our_lists(root, "cuhk03_classic_labeled", 20)
    bad = tmp_path / "b" / "cuhk03" / "cuhk03_release"
    bad.mkdir(parents=True)
    (bad / "cuhk-03.mat").write_bytes(b"not HDF5")
    with pytest.raises(DatasetError, match="cuhk-03.mat: not CUHK03's release"):
        our_lists(tmp_path / "b", "cuhk03_labeled")
    shutil.rmtree(root / "cuhk03" / "images_labeled")  # the split file names images no longer there
    (root / "cuhk03" / "cuhk03_release" / "cuhk-03.mat").unlink()
    with pytest.raises(DatasetNotFoundError, match="no folder with images_labeled"):
        our_lists(root, "cuhk03_classic_labeled")
