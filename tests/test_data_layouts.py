"""Dataset loaders on tiny generated folder trees in every published layout (datasets.md)."""

import functools
import gc
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dpm_ops.data import (
    DatasetCountWarning,
    DatasetError,
    DatasetNotFoundError,
    ImageDataset,
    available_datasets,
    build_dataset,
    register_dataset,
)
from dpm_ops.data import datasets as datasets_module
from dpm_ops.data.image_io import read_image, read_mask
from dpm_ops.data.masks import mask_path_for
from dpm_ops.data.transforms import dpm_test_transforms


def write_image(path, colour=(200, 30, 30), size=(8, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_mask(image_path, dataset_dir, size=(8, 16)):
    path = mask_path_for(str(image_path), str(dataset_dir))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("1", size, 1).save(path)


def make_market_tree(base, folder_names=None):
    """A Market-1501 tree with train ids 2 and 7, query id 3 and 5, junk and distractors."""
    root = base / "Market-1501-v15.09.15"
    names = folder_names or {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c6s4_002452_02.jpg"],
        "query": ["0003_c1s1_000151_00.jpg", "0005_c3s2_000301_00.jpg"],
        "bounding_box_test": [
            "0003_c2s1_000201_01.jpg",
            "0003_c1s1_000161_02.jpg",
            "0005_c4s2_000401_01.jpg",
            "0000_c1s1_000811_05.jpg",  # distractor
            "-1_c3s1_000901_04.jpg",  # junk
            "-1_c5s1_000911_02.jpg",  # junk
        ],
    }
    for folder, files in names.items():
        for name in files:
            write_image(root / folder / name)
    return root


def load_quietly(name, root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetCountWarning)
        return build_dataset(name, root, **kwargs)


# --------------------------------------------------------------------------------- Market-1501


def test_market_parses_pids_cameras_junk_and_distractors(tmp_path):
    root = make_market_tree(tmp_path)
    data = load_quietly("market1501", root)
    assert data.num_cams == 6
    assert sorted((r.pid, r.camid) for r in data.train) == [(0, 0), (0, 1), (1, 5)]
    assert data.train_pid_map == {2: 0, 7: 1}
    assert sorted((r.pid, r.camid) for r in data.query) == [(3, 0), (5, 2)]
    gallery = sorted((r.pid, r.camid) for r in data.gallery)
    assert gallery == [(0, 0), (3, 0), (3, 1), (5, 3)]  # distractor pid 0 kept, junk gone
    assert data.junk_dropped == 2
    assert all(os.path.isabs(r.path) and os.path.isfile(r.path) for r in data.gallery)
    assert data.occluded_paths is None and data.is_occluded(data.query[0]) is None


def test_train_relabel_follows_sorted_pids_and_train_junk_is_dropped(tmp_path):
    names = {
        "bounding_box_train": ["0008_c1s1_000451_03.jpg", "0001_c2s1_000551_01.jpg", "-1_c2s1_000561_01.jpg"],
        "query": ["0005_c3s2_000301_00.jpg", "0003_c1s1_000151_00.jpg"],
        "bounding_box_test": ["0005_c4s2_000401_01.jpg", "0003_c2s1_000201_01.jpg", "0000_c1s1_000811_05.jpg"],
    }
    data = load_quietly("market1501", make_market_tree(tmp_path, names))
    assert data.train_pid_map == {1: 0, 8: 1}  # labels in pid order (a set of {1, 8} iterates 8 first)
    assert data.junk_dropped == 1
    for split in (data.train, data.query, data.gallery):  # in file-name order, whatever the folder's
        assert [r.path for r in split] == sorted(r.path for r in split)


def test_market_multi_query_reads_gt_bbox(tmp_path):
    root = make_market_tree(tmp_path)
    assert load_quietly("market1501", root).multi_query is None  # only when asked for
    with pytest.raises(DatasetNotFoundError, match="gt_bbox"):
        load_quietly("market1501", root, multi_query=True)
    for name in (
        "0003_c1s1_000151_00.jpg",
        "0003_c1s1_000171_00.jpg",
        "0003_c2s1_000201_00.jpg",
        "0005_c3s2_000301_00.jpg",
        "0002_c1s1_000451_00.jpg",
        "-1_c2s1_000211_00.jpg",  # junk: dropped from the pools too
    ):
        write_image(root / "gt_bbox" / name)
    data = load_quietly("market1501", root, multi_query=True)
    assert sorted((r.pid, r.camid) for r in data.multi_query) == [(2, 0), (3, 0), (3, 0), (3, 1), (5, 2)]
    assert all(os.path.isfile(r.path) for r in data.multi_query)
    assert sorted((r.pid, r.camid) for r in data.query) == [(3, 0), (5, 2)]  # the splits are unchanged
    write_truncated_jpeg(root / "gt_bbox" / "0003_c1s1_000171_00.jpg")  # the pools are decoded at load too
    with pytest.raises(DatasetError, match=r"unreadable image: .*gt_bbox.0003_c1s1_000171_00\.jpg"):
        load_quietly("market1501", root, multi_query=True)
    write_image(root / "gt_bbox" / "0003_c1s1_000171_00.jpg")
    # With masks, gt_bbox needs its gt_bbox_seg mirror like every other folder.
    for path in [
        *(r.path for r in (*data.train, *data.query, *data.gallery)),
        *(str(p) for p in (root / "bounding_box_test").glob("-1_*")),
    ]:
        write_mask(path, root)
    with pytest.raises(DatasetNotFoundError, match="gt_bbox_seg"):
        load_quietly("market1501", root, multi_query=True, with_masks=True)
    for record in data.multi_query:
        write_mask(record.path, root)
    masked = load_quietly("market1501", root, multi_query=True, with_masks=True)
    assert all(r.path in masked.mask_paths for r in masked.multi_query)


@pytest.mark.filterwarnings("ignore::dpm_ops.data.DatasetCountWarning")
def test_config_reaches_the_test_set_options(tmp_path):
    from dpm_ops.engine.config import load_config
    from dpm_ops.engine.splits import load_splits

    root = make_market_tree(tmp_path)
    make_occluded_reid_tree(tmp_path / "Occluded_REID")
    common = [f"dataset.root={root}", "dataset.name=market1501", f"dataset.test_root={tmp_path}"]
    # DPM's shipped Occluded-REID config: query camera 0, gallery camera 2 (datasets.md §6).
    shipped = load_config("dpm_market_occluded_reid", common)
    splits = load_splits(shipped)
    assert {r.camid for r in splits.query} == {0} and {r.camid for r in splits.gallery} == {2}
    assert splits.name == "market1501->occluded_reid" and len(splits.train) == 3
    default = load_splits(load_config("dpm_market_occluded_reid", [*common, "dataset.test_camids=null"]))
    assert {r.camid for r in default.gallery} == {1}
    # eval.multi_query loads the gt_bbox pools of the set that provides the queries.
    write_image(root / "gt_bbox" / "0003_c1s1_000151_00.jpg")
    pooled = load_splits(load_config(None, [*common[:2], "eval.multi_query=avg"]))
    assert [(r.pid, r.camid) for r in pooled.multi_query] == [(3, 0)]
    assert load_splits(load_config(None, common[:2])).multi_query is None


def test_dataset_options():
    assert {"camids", "with_masks"} <= datasets_module.dataset_options("occluded_reid")
    assert "multi_query" in datasets_module.dataset_options("market")
    assert "camids" not in datasets_module.dataset_options("market1501")
    assert "variant" not in datasets_module.dataset_options("cuhk03_np_labeled")  # fixed by the alias
    with pytest.raises(DatasetError, match="unknown dataset"):
        datasets_module.dataset_options("nope")
    # build_dataset checks its options against them (a misspelt one was the loader's TypeError), its root and
    # flags ("no" read as true; None as a folder named None)
    for root, options, needle in [
        ("/data", dict(with_mask=True), "dataset 'market1501' takes no option 'with_mask'; its options: "),
        ("/data", dict(with_masks="no"), "dataset option with_masks must be True or False, got 'no'"),
        (None, {}, "dataset root must be a folder path, got None"),
        ("", {}, "dataset root must be a folder path, got ''"),
        ("/data", dict(check_counts="bogus"), "check_counts must be one of ('warn', 'error', 'off'), got 'bogus'"),
    ]:
        with pytest.raises(DatasetError, match=re.escape(needle)):
            datasets_module.build_dataset("market1501", root, **options)
    # MSMT17's include_val too (a DatasetError, not a plain ValueError: the README's contract), before any folder
    for name, options, needle in [
        ("msmt17", dict(include_val="no"), "dataset option include_val must be True or False, got 'no'"),
        ("occluded_reid", dict(camids=(0, 0)), "camids must give query and gallery different cameras"),
    ]:
        with pytest.raises(DatasetError, match=re.escape(needle)):
            datasets_module.build_dataset(name, "/nonexistent", **options)
    # a registered partial: the options it binds are fixed, not options of the dataset
    register_dataset("dpm_occluded_reid_for_test", functools.partial(datasets_module.load_occluded_reid, camids=(0, 2)))
    try:
        options = datasets_module.dataset_options("dpm_occluded_reid_for_test")
        assert "camids" not in options and "with_masks" in options
    finally:
        datasets_module._LOADERS.pop("dpm_occluded_reid_for_test")


@pytest.mark.parametrize("nesting", ["", "market1501"])
def test_market_found_from_parent_folders(tmp_path, nesting):
    make_market_tree(tmp_path / nesting if nesting else tmp_path)
    data = load_quietly("Market-1501", tmp_path)  # alias, case and dash tolerant
    assert data.root.endswith("Market-1501-v15.09.15")


def test_count_check_warns_naming_the_split_errors_or_stays_silent(tmp_path, monkeypatch):
    root = make_market_tree(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_dataset("market1501", root)
    messages = [str(w.message) for w in caught if issubclass(w.category, DatasetCountWarning)]
    assert len(messages) == 3
    assert messages[0].startswith("market1501 train: found 2 ids / 3 images, the full dataset has 751 ids / 12936")
    assert messages[2].startswith("market1501 gallery: found 3 ids / 4 images")
    with pytest.raises(DatasetError, match="market1501 train"):
        build_dataset("market1501", root, check_counts="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset("market1501", root, check_counts="off")
        # a "full" dataset: counts equal to the published ones -> no warning even in error mode
        monkeypatch.setitem(
            datasets_module.PUBLISHED_COUNTS,
            "market1501",
            {"train": (2, 3), "query": (2, 2), "gallery": (3, 4)},
        )
        build_dataset("market1501", root, check_counts="error")
        # the right number of images of the wrong number of ids is still a different dataset
        monkeypatch.setitem(
            datasets_module.PUBLISHED_COUNTS,
            "market1501",
            {"train": (3, 3), "query": (2, 2), "gallery": (3, 4)},
        )
        with pytest.raises(DatasetError, match="market1501 train: found 2 ids / 3 images"):
            build_dataset("market1501", root, check_counts="error")
    with pytest.raises(ValueError, match="check_counts"):
        build_dataset("market1501", root, check_counts="sometimes")


def test_published_counts_follow_the_spec():
    # datasets.md's summary table; MSMT17 from its release (list_val's 2,373 images merged or not;
    # query + gallery = the 93,820 of rerank_eval.md)
    assert datasets_module.PUBLISHED_COUNTS == {
        "market1501": {"train": (751, 12936), "query": (750, 3368), "gallery": (751, 15913)},
        "dukemtmc": {"train": (702, 16522), "query": (702, 2228), "gallery": (1110, 17661)},
        "occluded_duke": {"train": (702, 15618), "query": (519, 2210), "gallery": (1110, 17661)},
        "cuhk03_np_labeled": {"train": (767, 7368), "query": (700, 1400), "gallery": (700, 5328)},
        "cuhk03_np_detected": {"train": (767, 7365), "query": (700, 1400), "gallery": (700, 5332)},
        "occluded_reid": {"query": (200, 1000), "gallery": (200, 1000)},
        "partial_reid": {"query": (60, 300), "gallery": (60, 300)},
        "msmt17": {"train": (1041, 32621), "query": (3060, 11659), "gallery": (3060, 82161)},
        "msmt17_no_val": {"train": (1041, 30248), "query": (3060, 11659), "gallery": (3060, 82161)},
    }


@pytest.mark.parametrize("camera", ["7", "12"])
def test_market_rejects_camera_seven(tmp_path, camera):
    # c12 is camera 12, not camera 1 followed by a 2 (the peers' one-digit pattern reads it so)
    root = make_market_tree(tmp_path)
    write_image(root / "bounding_box_test" / f"0003_c{camera}s1_000201_01.jpg")
    with pytest.raises(DatasetError, match=rf"c{camera} outside 1\.\.6 in .*0003_c{camera}s1_000201_01\.jpg"):
        load_quietly("market1501", root)


# a pid with a dash inside, two dashes, non-ASCII digits (str.isdigit / \d accept them, int() may not)
@pytest.mark.parametrize(
    "name",
    [
        "person3.jpg",
        "1-2_c1s1_000001_01.jpg",
        "--1_c1s1_000001_01.jpg",
        "0\u00b2_c1s1_000001_01.jpg",
        "0003_c\u0663s1_000001_01.jpg",
    ],
)
def test_bad_filename_is_named(tmp_path, name):
    root = make_market_tree(tmp_path)
    write_image(root / "query" / name)
    with pytest.raises(DatasetError, match="does not match") as info:
        load_quietly("market1501", root)
    assert name in str(info.value)


def test_negative_pid_other_than_junk_is_named(tmp_path):
    root = make_market_tree(tmp_path)
    write_image(root / "bounding_box_test" / "-2_c1s1_000001_01.jpg")
    with pytest.raises(DatasetError, match=r"negative pid other than -1 in .*-2_c1s1_000001_01\.jpg"):
        load_quietly("market1501", root)


def test_missing_root_and_wrong_layout_name_the_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset root not found") as info:
        build_dataset("market1501", tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert str(tmp_path / "nowhere") in str(info.value)

    root = tmp_path / "Market-1501-v15.09.15"
    write_image(root / "bounding_box_train" / "0002_c1s1_000451_03.jpg")
    write_image(root / "bounding_box_test" / "0003_c2s1_000201_01.jpg")
    with pytest.raises(DatasetNotFoundError, match=r"Market-1501-v15\.09\.15 \(lacks query\)"):
        build_dataset("market1501", tmp_path)


def test_empty_split_folder_is_named(tmp_path):
    root = make_market_tree(tmp_path)
    for name in os.listdir(root / "query"):
        os.remove(root / "query" / name)
    with pytest.raises(DatasetError, match=r"no \*\.jpg images in .*query"):
        load_quietly("market1501", root)


# --------------------------------------------------------------------------- Duke / Occluded-Duke


def make_duke_tree(root):
    files = {
        "bounding_box_train": ["0001_c1_f0046985.jpg", "0001_c8_f0047105.jpg", "0004_c2_f0001234.jpg"],
        "query": ["0005_c2_f0046985.jpg", "0009_c7_f0100000.jpg"],
        "bounding_box_test": ["0005_c3_f0047225.jpg", "0009_c8_f0100120.jpg", "0012_c1_f0000120.jpg"],
    }
    for folder, names in files.items():
        for name in names:
            write_image(root / folder / name)
    return root


def test_duke_cameras_one_to_eight(tmp_path):
    make_duke_tree(tmp_path / "DukeMTMC-reID")
    data = load_quietly("dukemtmc", tmp_path)
    assert data.num_cams == 8
    assert sorted(r.camid for r in data.train) == [0, 1, 7]
    assert sorted(r.pid for r in data.gallery) == [5, 9, 12]  # distractor ids are real ids
    write_image(tmp_path / "DukeMTMC-reID" / "query" / "0010_c9_f0000001.jpg")
    with pytest.raises(DatasetError, match="c9 outside 1..8"):
        load_quietly("duke", tmp_path)


def test_occluded_duke_marks_every_query_occluded(tmp_path):
    make_duke_tree(tmp_path / "Occluded_Duke")
    data = load_quietly("occluded_duke", tmp_path)
    assert data.name == "occluded_duke"
    assert all(data.is_occluded(r) for r in data.query)
    assert not any(data.is_occluded(r) for r in data.gallery)
    assert data.num_cams == 8 and sorted(r.camid for r in data.train) == [0, 1, 7]
    write_image(tmp_path / "Occluded_Duke" / "bounding_box_test" / "0010_c9_f0000001.jpg")
    with pytest.raises(DatasetError, match="c9 outside 1..8"):
        load_quietly("occluded_duke", tmp_path)


# ---------------------------------------------------------------------------------- CUHK03-NP


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_cuhk03_np_variants(tmp_path, variant):
    for other in ("labeled", "detected"):
        base = tmp_path / "cuhk03-np" / other
        pid = 1 if other == variant else 50
        write_image(base / "bounding_box_train" / f"{pid:04d}_c1_1.png")
        write_image(base / "bounding_box_train" / f"{pid:04d}_c2_2.png")
        write_image(base / "query" / f"{pid + 1:04d}_c1_1.png")
        write_image(base / "bounding_box_test" / f"{pid + 1:04d}_c2_3.png")
    data = load_quietly(f"cuhk03_np_{variant}", tmp_path)
    assert data.name == f"cuhk03_np_{variant}" and data.num_cams == 2
    assert data.train_pid_map == {1: 0}
    assert [r.camid for r in data.query] == [0] and [r.camid for r in data.gallery] == [1]
    assert load_quietly("cuhk03_np", tmp_path, variant=variant).train_pid_map == {1: 0}


def test_cuhk03_np_rejects_third_view_and_bad_variant(tmp_path):
    base = tmp_path / "cuhk03-np" / "labeled"
    for folder, name in (
        ("bounding_box_train", "0001_c1_1.png"),
        ("query", "0002_c1_1.png"),
        ("bounding_box_test", "0002_c3_1.png"),
    ):
        write_image(base / folder / name)
    with pytest.raises(DatasetError, match="c3 outside 1..2"):
        load_quietly("cuhk03_np", tmp_path)
    with pytest.raises(DatasetError, match="variant"):
        build_dataset("cuhk03_np", tmp_path, variant="both")


# ------------------------------------------------------------------ Occluded-REID / Partial-REID


def make_occluded_reid_tree(root, ids=(1, 2), per_id=3):
    for pid in ids:
        for index in range(1, per_id + 1):
            write_image(root / "occluded_body_images" / f"{pid:03d}" / f"{pid:03d}_{index:02d}.tif")
            write_image(root / "whole_body_images" / f"{pid:03d}" / f"{pid:03d}_{index:02d}.tif")
    return root


def test_occluded_reid_cameras_come_from_the_folder_not_the_index(tmp_path):
    make_occluded_reid_tree(tmp_path / "Occluded_REID")
    data = load_quietly("occluded_reid", tmp_path)
    assert data.train == [] and data.num_train_pids == 0
    assert {r.camid for r in data.query} == {0} and {r.camid for r in data.gallery} == {1}
    assert sorted({r.pid for r in data.query}) == [1, 2] and len(data.query) == 6
    assert all(r.path.endswith(".tif") for r in data.query)
    assert all(data.is_occluded(r) for r in data.query) and not any(data.is_occluded(r) for r in data.gallery)
    renamed = load_quietly("occluded_reid", tmp_path, camids=(0, 2))  # DPM's Rename.py cameras
    assert {r.camid for r in renamed.query} == {0} and {r.camid for r in renamed.gallery} == {2}
    assert renamed.num_cams == 3
    for camids in ((1, 1), (0, -1), (0,), (0, 1.0), "02"):
        with pytest.raises(ValueError, match="camids"):
            load_quietly("occluded_reid", tmp_path, camids=camids)


def test_occluded_reid_wants_tif_in_pid_folders(tmp_path):
    root = tmp_path / "Occluded_REID"
    make_occluded_reid_tree(root)
    write_image(root / "whole_body_images" / "002" / "003_01.tif")
    with pytest.raises(DatasetError, match=r"<pid>/<pid>_<nn>\.tif.*003_01\.tif"):
        load_quietly("occluded_reid", root)

    jpg_root = tmp_path / "jpg" / "Occluded_REID"
    write_image(jpg_root / "occluded_body_images" / "001" / "001_01.jpg")
    write_image(jpg_root / "whole_body_images" / "001" / "001_01.jpg")
    with pytest.raises(DatasetError, match=r"no \*\.tif images in .*occluded_body_images"):
        load_quietly("occluded_reid", jpg_root)


def test_partial_reid(tmp_path):
    root = tmp_path / "Partial_REID"
    for pid in (1, 7):
        for index in (1, 2):
            write_image(root / "partial_body_images" / f"{pid:03d}_{index:02d}.jpg")
            write_image(root / "whole_body_images" / f"{pid:03d}_{index:02d}.jpg")
    data = load_quietly("partial_reid", tmp_path)
    assert sorted((r.pid, r.camid) for r in data.query) == [(1, 0), (1, 0), (7, 0), (7, 0)]
    assert {r.camid for r in data.gallery} == {1}
    swapped = load_quietly("partial_reid", tmp_path, camids=(3, 0))
    assert {r.camid for r in swapped.query} == {3} and {r.camid for r in swapped.gallery} == {0}
    write_image(root / "whole_body_images" / "seven_01.jpg")
    with pytest.raises(DatasetError, match=r"seven_01\.jpg"):
        load_quietly("partial_reid", tmp_path)


# ------------------------------------------------------------------------------------- MSMT17


def make_msmt_tree(base, version="MSMT17_V1"):
    train_folder, test_folder = datasets_module.MSMT17_VERSIONS[version]
    root = base / version
    lists = {
        ("list_train.txt", train_folder): [
            ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
            ("0001/0001_003_15_0303noon_0101_1.jpg", 1),
        ],
        ("list_val.txt", train_folder): [("0001/0001_004_07_0303noon_0102_0.jpg", 1)],
        ("list_query.txt", test_folder): [("0000/0000_000_02_0113morning_0001_0.jpg", 0)],
        ("list_gallery.txt", test_folder): [
            ("0000/0000_001_03_0113morning_0010_0.jpg", 0),
            ("0002/0002_000_11_0113noon_0003_1.jpg", 2),
        ],
    }
    for (list_name, folder), entries in lists.items():
        for relative, _ in entries:
            write_image(root / folder / relative)
        (root / list_name).write_text("".join(f"{relative} {pid}\n" for relative, pid in entries))
    return root


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_list_files(tmp_path, version):
    make_msmt_tree(tmp_path, version)
    data = load_quietly("msmt17", tmp_path)
    assert data.num_cams == 15
    assert sorted((r.pid, r.camid) for r in data.train) == [(0, 0), (1, 6), (1, 14)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(build_dataset("msmt17", tmp_path, include_val=False).train) == 2
    assert "the full dataset has 1041 ids / 30248 images" in str(caught[0].message)  # list_train alone
    assert [(r.pid, r.camid) for r in data.query] == [(0, 1)]
    assert sorted(r.camid for r in data.gallery) == [2, 10]


def test_msmt17_absent_names_both_versions_layouts(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("msmt17", tmp_path)
    message = str(info.value)
    assert "no folder with train, test, list_train.txt" in message and str(tmp_path / "MSMT17_V1") in message
    assert "no folder with mask_train_v2, mask_test_v2" in message and str(tmp_path / "MSMT17_V2") in message


@pytest.mark.parametrize("split, folder", [("query", "query"), ("train", "bounding_box_train")])
def test_a_split_of_junk_only_is_empty(tmp_path, split, folder):
    """A train split of junk only loaded as an empty one, with a count warning (a query split was refused)."""
    root = make_market_tree(tmp_path)
    for name in os.listdir(root / folder):
        os.remove(root / folder / name)
    write_image(root / folder / "-1_c1s1_000001_00.jpg")  # junk is dropped: no image is left
    with pytest.raises(DatasetError, match=rf"market1501: the {split} split of .*Market-1501-v15\.09\.15 is empty"):
        load_quietly("market1501", root)


def test_msmt17_without_val_takes_a_mask_tree_that_mirrors_the_folders(tmp_path):
    """The val images' masks (list_val's images lie in the train folder) were orphans without include_val."""
    root = make_msmt_tree(tmp_path)
    for folder in ("train", "test"):
        for image in (root / folder).rglob("*.jpg"):
            write_mask(image, root)
    assert len(load_quietly("msmt17", tmp_path, with_masks=True, include_val=False).mask_paths) == 5
    assert len(load_quietly("msmt17", tmp_path, with_masks=True).mask_paths) == 6
    for mask in (root / "train_seg").rglob("0001_004_07*.png"):  # val's masks may be absent as well
        mask.unlink()
    assert len(load_quietly("msmt17", tmp_path, with_masks=True, include_val=False).mask_paths) == 5
    with pytest.raises(DatasetNotFoundError, match="1 image\\(s\\) have no mask"):
        load_quietly("msmt17", tmp_path, with_masks=True)


def test_a_folder_named_as_another_dataset_is_refused(tmp_path):
    """Given as root, Duke's folder loaded as Occluded-Duke (every query marked occluded) and CUHK03-NP's
    detected boxes as the labeled ones: only a count warning said anything."""
    make_duke_tree(tmp_path / "DukeMTMC-reID")
    with pytest.raises(DatasetError, match="Occluded-Duke: .*DukeMTMC-reID is named as DukeMTMC-reID's folder"):
        load_quietly("occluded_duke", tmp_path / "DukeMTMC-reID")
    assert load_quietly("dukemtmc", tmp_path / "DukeMTMC-reID").name == "dukemtmc"
    detected = tmp_path / "cuhk03-np" / "detected"
    for folder, name in (("bounding_box_train", "0001_c1_1.png"), ("query", "0002_c1_1.png")):
        write_image(detected / folder / name)
    write_image(detected / "bounding_box_test" / "0002_c2_1.png")
    with pytest.raises(DatasetError, match="CUHK03-NP labeled: .*detected is named as CUHK03-NP detected's folder"):
        load_quietly("cuhk03_np", detected)
    assert load_quietly("cuhk03_np", detected, variant="detected").name == "cuhk03_np_detected"


def test_msmt17_bad_lines_missing_images_and_cameras(tmp_path):
    root = make_msmt_tree(tmp_path)
    (root / "list_val.txt").write_text("\n0001/0001_004_07_0303noon_0102_0.jpg 1\n\n")  # blank lines are skipped
    assert len(load_quietly("msmt17", tmp_path).train) == 3
    train_list = (root / "list_train.txt").read_text()
    (root / "list_train.txt").write_text("")
    with pytest.raises(DatasetError, match=r"list file is empty: .*list_train\.txt"):
        load_quietly("msmt17", tmp_path)
    (root / "list_train.txt").write_text(train_list)
    (root / "list_query.txt").write_text("0000/0000_000_02_0113morning_0001_0.jpg\n")
    with pytest.raises(DatasetError, match=r"list_query\.txt:1: expected"):
        load_quietly("msmt17", tmp_path)
    (root / "list_query.txt").write_text("0000/0000_999_02_0113morning_0001_0.jpg 0\n")
    with pytest.raises(DatasetNotFoundError, match=r"list_query\.txt:1: image not found: .*0000_999_02"):
        load_quietly("msmt17", tmp_path)
    for line in (
        "0000/0000_000_02_0113morning_0001_0.jpg --0\n",
        "0000/0000_000_02_0113morning_0001_0.jpg \u00b2\n",
        "0000/0000_000_\u00b2_0113morning_0001_0.jpg 0\n",
    ):
        (root / "list_query.txt").write_text(line, encoding="utf-8")
        with pytest.raises(DatasetError, match=r"list_query\.txt:1: expected"):
            load_quietly("msmt17", tmp_path)
    (root / "list_query.txt").write_text("0000/0000_000_02_0113morning_0001_0.jpg 0\n")
    val_list = (root / "list_val.txt").read_text()
    (root / "list_val.txt").unlink()  # the one list file the layout search does not require
    with pytest.raises(DatasetNotFoundError, match=r"MSMT17 list file not found: .*list_val\.txt"):
        load_quietly("msmt17", tmp_path)
    assert len(build_dataset("msmt17", tmp_path, include_val=False, check_counts="off").train) == 2
    (root / "list_val.txt").write_text(val_list)
    write_image(root / "test" / "0000" / "0000_000_16_0113morning_0001_0.jpg")
    (root / "list_query.txt").write_text("0000/0000_000_16_0113morning_0001_0.jpg 0\n")
    with pytest.raises(DatasetError, match="c16 outside 1..15"):
        load_quietly("msmt17", tmp_path)


# ------------------------------------------------------------------------------ MaskReID masks


def add_masks(dataset_dir):
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        for name in os.listdir(dataset_dir / folder):
            write_mask(dataset_dir / folder / name, dataset_dir)


def test_masks_mirror_the_image_tree_one_to_one(tmp_path):
    root = make_market_tree(tmp_path)
    add_masks(root)  # junk images get masks too: the tree mirrors the files on disk
    data = load_quietly("market1501", root, with_masks=True)
    assert len(data.mask_paths) == 11
    query_image = data.query[0].path
    assert data.mask_paths[query_image] == str(root / "query_seg" / (os.path.basename(query_image)[:-4] + ".png"))
    assert data.mask_paths[query_image] == mask_path_for(query_image, str(root))
    assert load_quietly("market1501", root).mask_paths is None


@pytest.mark.filterwarnings("ignore::dpm_ops.data.DatasetCountWarning")
def test_a_run_tested_on_another_set_has_the_masks_of_both(tmp_path):
    # MaskReID trained on one set and tested on another reads the train set's masks and the test set's
    from dpm_ops.engine.splits import load_splits

    train_root, test_root = make_market_tree(tmp_path / "train"), make_market_tree(tmp_path / "test")
    add_masks(train_root)
    add_masks(test_root)
    splits = load_splits(
        run_config(
            train_root,
            "dataset.with_masks=true",
            f"dataset.test_root={tmp_path / 'test'}",
            "dataset.test_name=market1501",
        )
    )
    assert {r.path for r in splits.query} <= {str(p) for p in test_root.rglob("*.jpg")}
    for records, root in ((splits.train, train_root), (splits.query, test_root), (splits.gallery, test_root)):
        assert records and all(splits.mask_paths[r.path] == mask_path_for(r.path, str(root)) for r in records)


def test_missing_and_orphan_masks_are_named(tmp_path):
    root = make_market_tree(tmp_path)
    add_masks(root)
    missing = root / "bounding_box_test_seg" / "0005_c4s2_000401_01.png"
    os.remove(missing)
    with pytest.raises(DatasetNotFoundError, match=r"1 image\(s\) have no mask, first: .*0005_c4s2_000401_01\.png"):
        load_quietly("market1501", root, with_masks=True)
    Image.new("1", (8, 16), 1).save(missing)
    Image.new("1", (8, 16), 1).save(root / "query_seg" / "0099_c1s1_000001_00.png")
    with pytest.raises(DatasetError, match=r"1 mask\(s\) have no image, first: .*0099_c1s1_000001_00\.png"):
        load_quietly("market1501", root, with_masks=True)


def test_missing_mask_folder_and_separate_mask_root(tmp_path):
    root = make_occluded_reid_tree(tmp_path / "Occluded_REID", ids=(1,), per_id=1)
    with pytest.raises(DatasetNotFoundError, match=r"mask folder not found: .*occluded_body_images_seg"):
        load_quietly("occluded_reid", root, with_masks=True)
    mask_root = tmp_path / "masks"
    for folder in ("occluded_body_images", "whole_body_images"):
        path = mask_root / f"{folder}_seg" / "001" / "001_01.png"
        os.makedirs(path.parent)
        Image.new("1", (8, 16), 1).save(path)
    data = load_quietly("occluded_reid", root, with_masks=True, mask_root=str(mask_root))
    assert data.mask_paths[data.query[0].path] == str(mask_root / "occluded_body_images_seg" / "001" / "001_01.png")


# ----------------------------------------------------------------------------- unreadable files


def write_truncated_jpeg(path):
    """A JPEG cut short: its header is whole, so Image.verify() passes it; decoding fails."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with Image.open(path) as image:
        image.verify()


def test_unreadable_image_named_at_load_and_at_read(tmp_path):
    root = make_market_tree(tmp_path)
    broken = root / "query" / "0005_c3s2_000301_00.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"unreadable image: .*0005_c3s2_000301_00\.jpg"):
        load_quietly("market1501", root)  # every file is decoded by default
    data = load_quietly("market1501", root, verify_images=False)  # a look at the split lists
    dataset = ImageDataset(data.query, dpm_test_transforms((16, 8)))
    index = [r.path for r in data.query].index(str(broken))
    with pytest.raises(DatasetError, match=r"unreadable image: .*0005_c3s2_000301_00\.jpg"):
        dataset[index]


def test_truncated_files_are_decoded_and_the_first_is_named(tmp_path):
    # Before: Image.verify() only parsed the header and passed a truncated JPEG.
    root = make_market_tree(tmp_path)
    write_truncated_jpeg(root / "bounding_box_test" / "0005_c4s2_000401_01.jpg")
    with pytest.raises(DatasetError, match=r"unreadable image: .*0005_c4s2_000401_01\.jpg \(image file is truncated"):
        load_quietly("market1501", root)
    # two bad files: the first in split order (train, query, gallery) is named, whatever thread found it
    write_truncated_jpeg(root / "bounding_box_train" / "0007_c6s4_002452_02.jpg")
    with pytest.raises(DatasetError, match=r"0007_c6s4_002452_02\.jpg"):
        load_quietly("market1501", root)
    # junk images are never read, so they are not checked
    root = make_market_tree(tmp_path / "junk")
    write_truncated_jpeg(root / "bounding_box_test" / "-1_c3s1_000901_04.jpg")
    assert load_quietly("market1501", root).junk_dropped == 2


def test_masks_are_decoded_and_size_checked_at_load(tmp_path):
    root = make_market_tree(tmp_path)
    add_masks(root)
    mask = root / "bounding_box_test_seg" / "0003_c2s1_000201_01.png"
    Image.new("1", (9, 16), 1).save(mask)
    with pytest.raises(DatasetError, match=r"mask .*0003_c2s1_000201_01\.png is 9x16 but its image is 8x16"):
        load_quietly("market1501", root, with_masks=True)
    mask.write_bytes(mask.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"unreadable mask: .*0003_c2s1_000201_01\.png"):
        load_quietly("market1501", root, with_masks=True)
    assert load_quietly("market1501", root).mask_paths is None  # masks not asked for: not read


def test_masks_that_are_all_background_are_refused_at_load(tmp_path):
    """A 0 / 1 label PNG reads as all background (the threshold is 128): the masked stream was black, silently."""
    root = make_market_tree(tmp_path)
    add_masks(root)
    masks = sorted((root / "bounding_box_test_seg").glob("*.png")) + sorted((root / "query_seg").glob("*.png"))
    masks += sorted((root / "bounding_box_train_seg").glob("*.png"))
    for mask in masks:
        with Image.open(mask) as image:
            size = image.size
        Image.fromarray(np.ones(size[::-1], np.uint8), "L").save(mask)  # labels 0 / 1
    with pytest.raises(DatasetError, match=r"every mask of market1501 is all background \(no value >= 128\)"):
        load_quietly("market1501", root, with_masks=True)
    query_mask = sorted((root / "query_seg").glob("*.png"))[0]
    Image.fromarray(np.full(size[::-1], 255, np.uint8), "L").save(query_mask)  # one person marked: a set of masks
    assert load_quietly("market1501", root, with_masks=True).mask_paths is not None


def test_a_failed_decode_closes_its_file(tmp_path):
    # Before: the file of an image whose decoding failed stayed open (a ResourceWarning per bad
    # image before the error line, with data-loader workers)
    path = tmp_path / "cut.jpg"
    write_truncated_jpeg(path)

    def fail_to_read():
        with pytest.raises(DatasetError, match="truncated"):
            read_image(str(path))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fail_to_read()
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught


def test_unreadable_or_mismatched_mask_named_at_read(tmp_path):
    root = make_market_tree(tmp_path)
    add_masks(root)
    data = load_quietly("market1501", root, with_masks=True)
    dataset = ImageDataset(data.query, dpm_test_transforms((16, 8)), data.mask_paths)
    item = dataset[0]
    assert item["mask"].shape == (1, 16, 8)
    half = np.zeros((16, 8), dtype=np.uint8)
    half[:, :4] = 255
    Image.fromarray(half).save(data.mask_paths[data.query[1].path])
    item = dataset[1]
    assert item["mask"][0, :, 4:].eq(0).all()
    assert torch.equal(item["masked"], item["image"] * item["mask"])  # MaskReID's input: background 0
    unmasked = {path: mask for path, mask in data.mask_paths.items() if path != data.query[0].path}
    with pytest.raises(
        DatasetError, match=r"1 image\(s\) have no mask, first: .*" + os.path.basename(data.query[0].path)
    ):
        ImageDataset(data.query, dpm_test_transforms((16, 8)), unmasked)
    mask_path = data.mask_paths[data.query[0].path]
    Image.new("1", (9, 16), 1).save(mask_path)
    with pytest.raises(DatasetError, match=r"mask .* is 9x16 but its image is 8x16"):
        dataset[0]
    with open(mask_path, "wb") as handle:
        handle.write(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="unreadable mask: " + ".*" + os.path.basename(mask_path)):
        dataset[0]


def test_sixteen_bit_images_and_masks_are_scaled_not_clipped(tmp_path):
    # Before: convert("RGB") clipped 16-bit samples at 255, so a 16-bit PNG read as near-white.
    ramp = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(2, axis=0)
    for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2")):
        path = tmp_path / f"{mode.replace(';', '_')}.tif"
        Image.frombytes(mode, (4, 2), ramp.astype(dtype).tobytes()).save(path)
        png = tmp_path / f"{mode.replace(';', '_')}.png"
        Image.frombytes(mode, (4, 2), ramp.astype(dtype).tobytes()).save(png)
        for image_path in (path, png):
            with Image.open(image_path) as raw:
                assert raw.mode.startswith("I;16")
            rgb = np.asarray(read_image(str(image_path)))
            assert rgb.shape == (2, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 128, 255], image_path
    # 16-bit masks too: 200 / 65535 is background, not a clipped 200 / 255 foreground
    mask = tmp_path / "mask.png"
    Image.frombytes("I;16", (4, 2), np.array([[0, 200, 40000, 65535]] * 2, dtype="<u2").tobytes()).save(mask)
    assert np.asarray(read_mask(str(mask), expected_size=(4, 2)))[0].tolist() == [0, 0, 255, 255]
    # 8-bit values in a 16-bit container (a 0 / 255 mask saved as I;16) keep them: not scaled to black
    Image.frombytes("I;16", (4, 2), np.array([[0, 255, 255, 0]] * 2, dtype="<u2").tobytes()).save(mask)
    assert np.asarray(read_mask(str(mask), expected_size=(4, 2)))[0].tolist() == [0, 255, 255, 0]
    # the depths that have no one 8-bit reading are refused, naming the file
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 1 << 20]], dtype=np.int32)).save(wide)
    with pytest.raises(DatasetError, match=r"unsupported image: .*wide\.tif has 32-bit samples"):
        read_image(str(wide))
    negative = tmp_path / "negative.tif"
    Image.fromarray(np.array([[-1, 255]], dtype=np.int32)).save(negative)
    with pytest.raises(DatasetError, match=r"negative\.tif has 32-bit samples \(-1\.\.255\)"):
        read_image(str(negative))
    # 32-bit containers ("I", as some Pillow versions open 16-bit PNGs) holding 16-bit values are read as 16 bits
    sixteen = tmp_path / "sixteen_in_32.tif"
    Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.int32)).save(sixteen)
    with Image.open(sixteen) as raw:
        assert raw.mode == "I"
    assert np.asarray(read_image(str(sixteen)))[0, :, 1].tolist() == [0, 1, 128, 255]
    real = tmp_path / "real.tif"
    Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)).save(real)
    with pytest.raises(DatasetError, match=r"unsupported mask: .*real\.tif has floating-point samples"):
        read_mask(str(real))


# ------------------------------------------------------------------ what a run loads (load_splits)


def run_config(root, *overrides):
    from dpm_ops.engine.config import load_config

    given = dict(text.split("=", 1) for text in (f"dataset.root={root}", "dataset.name=market1501", *overrides))
    return load_config(None, [f"{key}={value}" for key, value in given.items()])  # each key once: the last


@pytest.mark.filterwarnings("ignore::dpm_ops.data.DatasetCountWarning")
def test_a_run_decodes_every_image_it_reads_before_training(tmp_path):
    from dpm_ops.engine.splits import load_splits

    root = make_market_tree(tmp_path)
    victim = root / "query" / "0005_c3s2_000301_00.jpg"
    write_truncated_jpeg(victim)
    with pytest.raises(DatasetError, match=r"unreadable image: .*0005_c3s2_000301_00\.jpg"):
        load_splits(run_config(root))
    # tested on Occluded-REID: Market's own query is not read, so it is not checked
    make_occluded_reid_tree(tmp_path / "Occluded_REID")
    test_set = [f"dataset.test_root={tmp_path}", "dataset.test_name=occluded_reid"]
    assert load_splits(run_config(root, *test_set)).name == "market1501->occluded_reid"
    write_truncated_jpeg(tmp_path / "Occluded_REID" / "whole_body_images" / "002" / "002_03.tif")
    with pytest.raises(DatasetError, match=r"unreadable image: .*002_03\.tif"):
        load_splits(run_config(root, *test_set))
    # an evaluation never reads the train split, so it does not decode its images
    write_image(victim)
    write_truncated_jpeg(root / "bounding_box_train" / "0007_c6s4_002452_02.jpg")
    with pytest.raises(DatasetError, match=r"unreadable image: .*0007_c6s4_002452_02\.jpg"):
        load_splits(run_config(root))
    assert load_splits(run_config(root), train_split=False).train == []


@pytest.mark.filterwarnings("ignore::dpm_ops.data.DatasetCountWarning")
def test_a_test_set_without_any_match_is_refused_at_load(tmp_path):
    # Before: "no query has a match in the gallery" from evaluate_rank, after the whole training.
    from dpm_ops.engine.splits import load_splits

    train = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg"]
    one_camera = make_market_tree(
        tmp_path / "one_camera",
        {
            "bounding_box_train": train,
            "query": ["0003_c1s1_000151_00.jpg"],
            "bounding_box_test": ["0003_c1s1_000161_02.jpg", "0000_c1s1_000811_05.jpg"],
        },
    )
    with pytest.raises(DatasetError, match=r"one_camera.*no query has a match.*only on the query's own camera"):
        load_splits(run_config(one_camera))
    unknown_ids = make_market_tree(
        tmp_path / "unknown_ids",
        {
            "bounding_box_train": train,
            "query": ["0003_c1s1_000151_00.jpg"],
            "bounding_box_test": ["0004_c2s1_000161_02.jpg"],
        },
    )
    with pytest.raises(
        DatasetError, match=r"unknown_ids.*no query has a match.*none of the query ids is in the gallery"
    ):
        load_splits(run_config(unknown_ids))
    # one match is enough: evaluation skips (and counts) the queries without one
    make_market_tree(tmp_path / "one_match")
    (tmp_path / "one_match" / "Market-1501-v15.09.15" / "bounding_box_test" / "0005_c4s2_000401_01.jpg").unlink()
    assert len(load_splits(run_config(tmp_path / "one_match")).query) == 2
    # the test-only sets take their cameras from dataset.test_camids: (0, 1) and DPM's (0, 2) pass,
    # as does CUHK03-NP under its own protocol (two views of each pair)
    make_occluded_reid_tree(tmp_path / "Occluded_REID")
    test_set = [f"dataset.test_root={tmp_path}", "dataset.test_name=occluded_reid"]
    for camids in ("[0,1]", "[0,2]"):
        load_splits(run_config(one_camera, *test_set, f"dataset.test_camids={camids}"))
    cuhk = tmp_path / "cuhk03-np" / "labeled"
    for folder, name in (
        ("bounding_box_train", "0001_c1_1.png"),
        ("query", "0002_c1_1.png"),
        ("bounding_box_test", "0002_c2_1.png"),
    ):
        write_image(cuhk / folder / name)
    load_splits(run_config(tmp_path / "cuhk03-np", "dataset.name=cuhk03_np_labeled", "eval.protocol=cuhk03"))


# ------------------------------------------------------------------------------------ registry


def test_registry_names_errors_and_registration(tmp_path):
    names = available_datasets()
    for name in (
        "market1501",
        "dukemtmc",
        "occluded_duke",
        "occluded_reid",
        "partial_reid",
        "cuhk03_np_labeled",
        "cuhk03_np_detected",
        "msmt17",
        "synthetic",
        "viper",
        "prid",
    ):
        assert name in names
    with pytest.raises(DatasetError, match=r"unknown dataset 'caviar'; available: .*market1501"):
        build_dataset("caviar", tmp_path)

    def load_custom(root, **kwargs):
        return ("custom", root, kwargs)

    register_dataset("custom_set_for_test", load_custom)
    try:
        assert build_dataset("custom-set-for-test", tmp_path, flag=1) == ("custom", tmp_path, {"flag": 1})
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("custom_set_for_test", load_custom)
    finally:
        datasets_module._LOADERS.pop("custom_set_for_test")


def test_synthetic_loader_needs_a_manifest(tmp_path):
    make_market_tree(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"synthetic\.json"):
        build_dataset("synthetic", tmp_path / "Market-1501-v15.09.15")


@pytest.mark.parametrize("name", [None, 3])
def test_build_dataset_name_of_the_wrong_type(name, tmp_path):
    with pytest.raises(DatasetError, match=f"unknown dataset {name!r}"):  # was an AttributeError
        build_dataset(name, str(tmp_path))


def test_decompression_bombs_are_unreadable_images(tmp_path, monkeypatch):
    # Pillow's DecompressionBombError is no OSError: it was a traceback past the one-line error
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels: over twice the limit
    with pytest.raises(DatasetError, match=r"unreadable image: .*big\.png"):
        read_image(str(path))


def test_in_memory_images_and_masks_read_as_files_do():
    from dpm_ops.data.image_io import as_mask, as_rgb

    # uint8 mask arrays: foreground from 128, as an 8-bit mask file; bool arrays as they are
    values = np.array([[0, 127, 128, 255]], np.uint8)
    assert np.asarray(as_mask(values, "m")).tolist() == [[0, 0, 255, 255]]
    assert np.asarray(as_mask(values > 0, "m")).tolist() == [[0, 255, 255, 255]]
    # 16-bit PIL images are scaled as 16-bit files are, not clipped at 255
    ramp = np.array([[0, 257, 32768, 65535]], dtype="<u2")
    sixteen = Image.frombytes("I;16", (4, 1), ramp.tobytes())
    assert np.asarray(as_rgb(sixteen, "x"))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(as_mask(sixteen, "m")).tolist() == [[0, 0, 255, 255]]
    with pytest.raises(DatasetError, match="x has 32-bit samples"):  # negative: no 8-bit reading either
        as_rgb(Image.fromarray(np.array([[-1, 5]], np.int32)), "x")
    with pytest.raises(ValueError, match=r"x: image arrays must be .*, got \(0, 4, 3\) uint8"):
        as_rgb(np.zeros((0, 4, 3), np.uint8), "x")


# ------------------------------------------------------------------- files the loaders skipped (audit)


def test_image_extensions_in_any_case_and_their_aliases_are_read(tmp_path):
    """Market's pattern was the case-sensitive *.jpg: .JPG and .jpeg images were left out of the split silently
    (identity 9 was gone from train); Occluded-REID's .TIF / .tiff likewise."""
    root = make_market_tree(tmp_path)
    write_image(root / "bounding_box_train" / "0009_c1s1_000011_01.JPG")
    write_image(root / "bounding_box_train" / "0009_c2s1_000012_01.jpeg")
    assert sorted(r.pid for r in load_quietly("market1501", tmp_path).train) == [0, 0, 1, 2, 2]
    reid = make_occluded_reid_tree(tmp_path / "reid")
    for index, suffix in ((7, ".TIF"), (8, ".tiff")):
        Image.new("RGB", (8, 16)).save(reid / "whole_body_images" / "001" / f"001_0{index}{suffix}", format="TIFF")
    assert len(load_quietly("occluded_reid", tmp_path / "reid").gallery) == 8


def test_links_to_nothing_and_unreadable_folders_are_errors(tmp_path, monkeypatch):
    """A broken link was skipped (is_file() False), and recursive glob swallowed a PermissionError: images left
    out silently (an Occluded-REID identity's gallery gone, its queries no longer scored)."""
    root = make_market_tree(tmp_path)
    link = root / "bounding_box_train" / "0009_c1s1_000020_01.jpg"
    os.symlink(tmp_path / "nowhere.jpg", link)
    with pytest.raises(DatasetNotFoundError, match=r"image .*0009_c1s1_000020_01\.jpg is a link to .*nowhere\.jpg"):
        load_quietly("market1501", tmp_path)
    link.unlink()
    make_occluded_reid_tree(tmp_path / "reid")
    scandir = os.scandir

    def unreadable(path="."):
        if os.fspath(path).endswith(os.path.join("whole_body_images", "002")):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unreadable)
    with pytest.raises(DatasetError, match=r"cannot read the folder .*whole_body_images/002: Permission denied"):
        load_quietly("occluded_reid", tmp_path / "reid")


def test_a_file_where_a_folder_goes_is_named_as_such(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(DatasetNotFoundError, match="Market-1501: dataset root is a file, not a folder: .*afile"):
        build_dataset("market1501", tmp_path / "afile")


def test_market_distractors_belong_to_the_gallery(tmp_path):
    """pid 0 marks Market-1501's distractors: a query of pid 0 was scored with the distractors as its matches."""
    root = make_market_tree(tmp_path)
    write_image(root / "query" / "0000_c2s1_000005_00.jpg")
    with pytest.raises(
        DatasetError, match=r"market1501: pid 0 marks distractors, .*; query holds .*0000_c2s1_000005_00"
    ):
        load_quietly("market1501", tmp_path)


def test_msmt17_list_lines_that_contradict_their_images(tmp_path):
    """A list line was trusted: a label other than the image's pid gave it another identity, a line listed twice
    (or in list_train and list_val) counted it twice, an absolute path read from outside the dataset; a
    byte-order mark hid in the first path, and non-UTF-8 text was a raw UnicodeDecodeError."""
    root = make_msmt_tree(tmp_path)
    good = (root / "list_query.txt").read_text()
    for text, message in (
        ("0000/0000_000_02_0113morning_0001_0.jpg 1\n", "the label 1 must be the image's pid"),
        ("0000/0000_000_02_0113morning_0001_0.jpg -5\n", "the label -5 must be the image's pid"),
        ("0001/0000_000_02_0113morning_0001_0.jpg 0\n", "the label 0 must be the image's pid"),
        (
            good + good,
            r"list_query\.txt:2: 0000/0000_000_02_0113morning_0001_0\.jpg is listed twice \(first on line 1\)",
        ),
        (f"{root}/test/{good}", "the image path must lie under"),
        ("../test/" + good, "the image path must lie under"),
    ):
        (root / "list_query.txt").write_text(text)
        with pytest.raises(DatasetError, match=message):
            load_quietly("msmt17", tmp_path)
    (root / "list_query.txt").write_text("\ufeff" + good, encoding="utf-8")
    assert len(load_quietly("msmt17", tmp_path).query) == 1
    (root / "list_query.txt").write_bytes(good.encode() + b"caf\xe9\n")
    with pytest.raises(DatasetError, match=r"list_query\.txt is not UTF-8 text"):
        load_quietly("msmt17", tmp_path)
    (root / "list_query.txt").write_text(good)
    train = (root / "list_train.txt").read_text()
    (root / "list_val.txt").write_text(train.splitlines()[0] + "\n")
    with pytest.raises(DatasetError, match="is listed in list_train.txt and list_val.txt"):
        load_quietly("msmt17", tmp_path)


def test_masks_in_an_alpha_channel_and_label_images(tmp_path):
    """A cutout's mask is its alpha channel: its grey levels (the person's clothes) were read as the mask; a 0/1
    label PNG thresholded to all background silently."""
    cutout = Image.new("RGBA", (8, 16), (20, 20, 20, 0))
    cutout.paste((20, 20, 20, 255), (0, 0, 8, 8))  # a dark person: grey levels below the threshold
    cutout.save(tmp_path / "cutout.png")
    assert np.asarray(read_mask(str(tmp_path / "cutout.png"))).astype(bool).sum() == 64
    Image.new("RGBA", (8, 16), (255, 255, 255, 255)).save(tmp_path / "opaque.png")  # no transparency: grey levels
    assert np.asarray(read_mask(str(tmp_path / "opaque.png"))).all()
    Image.fromarray(np.eye(16, 8, dtype=np.uint8)).save(tmp_path / "labels.png")
    with pytest.raises(DatasetError, match=r"mask .*labels\.png holds values 0\.\.1: a label image\?"):
        read_mask(str(tmp_path / "labels.png"))


def test_palette_masks_cutouts_given_as_images_and_voc_label_maps(tmp_path):
    """A palette cutout's transparency and an RGBA cutout given as a PIL image were read by brightness; a VOC
    label map (the segmentation network's argmax) by its colours' brightness: car and train pixels were the
    person's foreground, a dark person was background."""
    from dpm_ops.data.image_io import VOC_PALETTE, as_mask
    from dpm_ops.data.transforms import build_transforms

    person = np.zeros((16, 8), bool)
    person[4:12, 2:6] = True
    colours = np.random.RandomState(0).randint(0, 60, (16, 8, 3)).astype(np.uint8)  # a dark person, dark ground
    cutout = Image.fromarray(np.dstack([colours, person.astype(np.uint8) * 255]), "RGBA")
    assert np.array_equal(np.asarray(as_mask(cutout, "m")) > 0, person)
    cutout.quantize(32).save(tmp_path / "palette_cutout.png")  # transparency kept as the palette's tRNS
    assert np.array_equal(np.asarray(read_mask(str(tmp_path / "palette_cutout.png"))) > 0, person)
    labels = np.where(person, 15, 0).astype(np.uint8)  # VOC: 15 person, 7 car, 19 train, 255 void
    labels[:2], labels[-2:], labels[4, 0] = 7, 19, 255
    label_map = Image.fromarray(labels, "P")
    label_map.putpalette(VOC_PALETTE)
    label_map.save(tmp_path / "voc.png")
    assert np.array_equal(np.asarray(read_mask(str(tmp_path / "voc.png"))) > 0, person)
    assert np.array_equal(np.asarray(as_mask(label_map, "m")) > 0, person)
    davis = Image.fromarray(person.astype(np.uint8), "P")  # an object mask in the same palette: index 1
    davis.putpalette(VOC_PALETTE)
    assert np.array_equal(np.asarray(as_mask(davis, "m")) > 0, person)
    short = label_map.copy()  # VOC's 21 colours, none for its void border (255): still a VOC map
    short.putpalette(VOC_PALETTE[: 3 * 21])
    assert np.array_equal(np.asarray(as_mask(short, "m")) > 0, person)
    # a crop of other classes alone (a bicycle, a car) has no person: all background (the spec's argmax == person)
    for objects in (person.astype(np.uint8) + np.eye(16, 8, dtype=np.uint8) * 2, person.astype(np.uint8) * 7):
        other = Image.fromarray(objects, "P")
        other.putpalette(VOC_PALETTE)
        assert not np.asarray(as_mask(other, "m")).any()
    void = Image.fromarray(person.astype(np.uint8) * 255, "P")  # 0 / 255 indices hold no class: grey levels
    void.putpalette(VOC_PALETTE)
    assert np.array_equal(np.asarray(as_mask(void, "m")) > 0, person)
    # a same-size 0 / 1 'L' mask given to pair() was thresholded to all background, unchecked
    with pytest.raises(DatasetError, match=r"mask given to pair\(\) holds values 0\.\.1: a label image\?"):
        build_transforms("maskreid", train=False).pair(
            Image.fromarray(colours), Image.fromarray(person.astype(np.uint8))
        )


def test_a_count_warning_points_at_the_callers_line(tmp_path):
    make_market_tree(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_dataset("market1501", tmp_path)  # a partial copy
    assert caught and all(warning.filename == __file__ for warning in caught), [w.filename for w in caught]


def test_images_are_read_upright_by_their_exif_orientation(tmp_path):
    """A phone's crop tagged "rotate 90" (orientation 6), shown 32 x 64 by viewers, was read 64 x 32: sideways."""
    image = Image.new("RGB", (64, 32), (10, 20, 30))
    image.paste((250, 0, 0), (0, 0, 8, 32))  # a red band on the stored image's left edge
    exif = image.getexif()
    exif[0x0112] = 6  # the stored pixels are to be turned 90 degrees clockwise
    image.save(tmp_path / "tagged.jpg", exif=exif)
    upright = read_image(str(tmp_path / "tagged.jpg"))
    assert upright.size == (32, 64)
    top, bottom = np.asarray(upright)[:4].mean(axis=(0, 1)), np.asarray(upright)[-4:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[0] < 50  # the left edge, turned clockwise, is the top


@pytest.mark.filterwarnings("ignore::dpm_ops.data.DatasetCountWarning")
def test_a_train_set_tested_on_another_needs_its_train_split_alone(tmp_path):
    """dataset.test_name: the train set's query and gallery folders were required (and their names parsed), though
    the run never uses them."""
    import shutil

    from dpm_ops.data.synth import generate_synthetic_dataset
    from dpm_ops.engine.splits import load_splits
    from engine_utils import tiny_synth_config

    root = make_market_tree(tmp_path)
    make_occluded_reid_tree(tmp_path / "Occluded_REID")
    for folder in ("query", "bounding_box_test"):
        shutil.rmtree(root / folder)
    test_set = [f"dataset.test_root={tmp_path}", "dataset.test_name=occluded_reid"]
    splits = load_splits(run_config(root, *test_set))
    assert splits.name == "market1501->occluded_reid" and len(splits.train) == 3
    assert {r.path for r in splits.query} == {r.path for r in build_dataset("occluded_reid", tmp_path).query}
    with pytest.raises(DatasetNotFoundError, match="lacks query, bounding_box_test"):
        load_splits(run_config(root))  # tested on its own splits: they are needed
    # every loader with a train split takes test_splits=False: the train split alone, counted as such
    msmt = make_msmt_tree(tmp_path / "msmt")
    (msmt / "list_query.txt").unlink()
    assert [
        len(build_dataset("msmt17", msmt, test_splits=False).train),
        len(build_dataset("msmt17", msmt, test_splits=False).query),
    ] == [3, 0]
    synthetic = generate_synthetic_dataset(tmp_path / "synth", tiny_synth_config(), progress=False)
    shutil.rmtree(synthetic / "query")
    alone = build_dataset("synthetic", synthetic, test_splits=False)  # its manifest's train count is exact
    assert alone.train and not alone.query and not alone.gallery
    assert all("test_splits" in datasets_module.dataset_options(name) for name in ("market1501", "cuhk03_np", "msmt17"))


def test_an_evaluation_reads_the_test_splits_alone(tmp_path):
    """`dpm-reid eval` builds its model from the checkpoint, yet a folder of query and gallery images was refused:
    the loaders required the train folder (and a non-empty one), load_splits a train split."""
    import shutil

    from dpm_ops.data.synth import generate_synthetic_dataset
    from dpm_ops.engine.splits import load_splits
    from engine_utils import tiny_synth_config

    full = load_quietly("market1501", make_market_tree(tmp_path / "full"))
    root = make_market_tree(tmp_path)
    shutil.rmtree(root / "bounding_box_train")
    with pytest.raises(DatasetNotFoundError, match="lacks bounding_box_train"):
        load_splits(run_config(root, "dataset.check_counts=off"))  # training needs it
    for train_folder in ("absent", "empty"):
        if train_folder == "empty":
            (root / "bounding_box_train").mkdir()
            with pytest.raises(DatasetError, match="no \\*.jpg images in .*bounding_box_train"):
                load_splits(run_config(root, "dataset.check_counts=off"))
        alone = load_splits(run_config(root, "dataset.check_counts=off"), train_split=False)
        assert alone.train == [] and alone.num_train_pids == 0 and alone.num_cams == 6
        assert [(r.pid, r.camid) for r in alone.query + alone.gallery] == [
            (r.pid, r.camid) for r in full.query + full.gallery
        ]
        # the counts checked are those of the splits read: query first, never train
        with pytest.raises(DatasetError, match=r"^market1501 query: found 2 ids / 2 images"):
            load_splits(run_config(root, "dataset.check_counts=error"), train_split=False)
    # a test-only set as the dataset itself: scored, not trained on
    make_occluded_reid_tree(tmp_path / "Occluded_REID")
    occluded = run_config(tmp_path / "Occluded_REID", "dataset.name=occluded_reid", "dataset.check_counts=off")
    assert len(load_splits(occluded, train_split=False).query) == 6
    with pytest.raises(DatasetError, match="has no training images .*dpm-reid eval scores"):
        load_splits(occluded)
    # dataset.test_name: the train set is not read (here it is not there at all), nor the test set's own train split
    test_set = [f"dataset.test_root={tmp_path}", "dataset.test_name=occluded_reid", "dataset.check_counts=off"]
    tested = load_splits(run_config(tmp_path / "nowhere", "dataset.name=market", *test_set), train_split=False)
    assert tested.name == "market1501->occluded_reid" and tested.train == [] and len(tested.gallery) == 6
    test_only = make_market_tree(tmp_path / "test_only")
    shutil.rmtree(test_only / "bounding_box_train")
    other = [f"dataset.test_root={test_only}", "dataset.test_name=market1501", "dataset.check_counts=off"]
    trained = load_splits(run_config(make_market_tree(tmp_path / "train"), *other))
    assert len(trained.train) == 3 and trained.query[0].path.startswith(str(test_only))
    # every loader with a train split takes train_split=False: the test splits alone, counted as such
    msmt = make_msmt_tree(tmp_path / "msmt")
    for name in ("list_train.txt", "list_val.txt"):
        (msmt / name).unlink()
    assert [len(getattr(load_quietly("msmt17", msmt, train_split=False), s)) for s in ("train", "gallery")] == [0, 2]
    synthetic = generate_synthetic_dataset(tmp_path / "synth", tiny_synth_config(), progress=False)
    shutil.rmtree(synthetic / "bounding_box_train")
    alone = build_dataset("synthetic", synthetic, train_split=False)  # its manifest's test counts are exact
    assert not alone.train and alone.query and alone.gallery
    assert all("train_split" in datasets_module.dataset_options(n) for n in ("market1501", "cuhk03_np", "msmt17"))
    for options, needle in (
        (dict(train_split=False, test_splits=False), "leave nothing to load"),
        (dict(train_split="no"), "train_split must be True or False, got 'no'"),
    ):
        with pytest.raises(DatasetError, match=needle):
            build_dataset("synthetic", synthetic, **options)
