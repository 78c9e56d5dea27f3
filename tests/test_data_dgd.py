"""DGD's uniform format (the JSTL datasets MaskReID's softmax stage trains on): folders written as DGD's
data/format_*.py scripts write them, read into DGD's train / probe / gallery lists, every inconsistency named."""

import json
import os

import pytest
import torch
from PIL import Image

from dpm_ops.data import DatasetError, DatasetNotFoundError, build_dataset, combine_datasets
from dpm_ops.data.masks import mask_path_for
from dpm_ops.engine import ConfigError, load_config
from dpm_ops.engine.splits import load_splits


def write_dgd(folder, name, identities, split, *, num_cameras=2, suffix=".bmp", masks=False, shot="multiple"):
    """A dataset in DGD's format: ``identities[person][camera]`` is that camera's image count; files
    ``cam_<c>/<person:05d>_<n:05d><suffix>`` numbered per camera, as format_viper.py / format_prid.py name them."""
    listed = []
    for person, cameras in enumerate(identities):
        listed.append([])
        for camera, count in enumerate(cameras):
            files = [f"cam_{camera}/{person:05d}_{n:05d}{suffix}" for n in range(count)]
            for n, file in enumerate(files):
                path = folder / file
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 16), (40 * camera, 10 * person % 256, 7 * n)).save(path)
                if masks:
                    mask = mask_path_for(str(path), str(folder))
                    os.makedirs(os.path.dirname(mask), exist_ok=True)
                    Image.new("L", (8, 16), 255).save(mask)
            listed[-1].append(files)
    meta = {"name": name, "shot": shot, "num_cameras": num_cameras, "identities": listed}
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "split.json").write_text(json.dumps(split))
    return folder


def viper(root, **options):
    """Six persons, one image per camera; DGD's random half: trainval 0, 2, 4, test 1, 3, 5."""
    split = {"trainval": [0, 2, 4], "test_probe": [1, 3, 5], "test_gallery": [1, 3, 5]}
    return write_dgd(root / "viper", "VIPeR", [[1, 1]] * 6, split, **options)


def prid(root):
    """format_prid.py's shape: probe persons 0, 1 (one image a camera); trainval 2 (both cameras, multi-shot) and
    3 (camera A only); gallery-only persons 4, 5 (camera B alone)."""
    identities = [[1, 1], [1, 1], [3, 2], [2, 0], [0, 1], [0, 1]]
    split = {"trainval": [2, 3], "test_probe": [0, 1], "test_gallery": [0, 1, 4, 5]}
    return write_dgd(root / "prid", "PRID", identities, split, suffix=".png")


def listing(records):
    return sorted((os.path.relpath(r.path, os.path.dirname(os.path.dirname(r.path))), r.pid, r.camid) for r in records)


def test_viper_splits_as_dgd_lists_them(tmp_path):
    viper(tmp_path)
    data = build_dataset(
        "dgd_viper", tmp_path, val_ratio=0
    )  # the folder holding viper/, as DGD's external/exp/datasets
    assert data.name == "dgd_viper" and data.num_cams == 2 and data.root == str(tmp_path / "viper")
    assert listing(data.train) == [
        ("cam_0/00000_00000.bmp", 0, 0),
        ("cam_0/00002_00000.bmp", 1, 0),
        ("cam_0/00004_00000.bmp", 2, 0),
        ("cam_1/00000_00000.bmp", 0, 1),
        ("cam_1/00002_00000.bmp", 1, 1),
        ("cam_1/00004_00000.bmp", 2, 1),
    ]
    assert data.train_pid_map == {0: 0, 2: 1, 4: 2}
    # the probe: the first half of a person's cameras (camera 0); the gallery: the other half
    assert listing(data.query) == [(f"cam_0/{p:05d}_00000.bmp", p, 0) for p in (1, 3, 5)]
    assert listing(data.gallery) == [(f"cam_1/{p:05d}_00000.bmp", p, 1) for p in (1, 3, 5)]
    assert build_dataset("dgd_viper", tmp_path / "viper").query == data.query  # the folder itself


def test_prid_gallery_only_persons_and_one_camera_persons(tmp_path):
    prid(tmp_path)
    data = build_dataset("dgd_prid", tmp_path, val_ratio=0)
    assert sorted((r.pid, r.camid) for r in data.train) == [(0, 0)] * 3 + [(0, 1)] * 2 + [(1, 0)] * 2
    assert sorted((r.pid, r.camid) for r in data.query) == [(0, 0), (1, 0)]
    assert sorted((r.pid, r.camid) for r in data.gallery) == [(0, 1), (1, 1), (4, 1), (5, 1)]
    alone = build_dataset("dgd_prid", tmp_path, train_split=False)
    assert alone.train == [] and alone.query == data.query and alone.gallery == data.gallery
    assert build_dataset("dgd_prid", tmp_path, test_splits=False, val_ratio=0).train == data.train


def test_shinpuhkan_trains_only(tmp_path):
    split = {"trainval": [0, 1], "test_probe": [], "test_gallery": []}
    write_dgd(tmp_path / "shinpuhkan", "Shinpuhkan", [[2] * 16, [1, 0, 3]], split, num_cameras=16, suffix=".jpg")
    with pytest.raises(DatasetError, match=r"Shinpuhkan \(DGD's format\) has no test split \(it trains only\)"):
        build_dataset("dgd_shinpuhkan", tmp_path, train_split=False)
    data = build_dataset("dgd_shinpuhkan", tmp_path, val_ratio=0)  # no query or gallery to read
    assert (
        data.num_cams == 16 and len(data.train) == 32 + 4 and sorted({r.camid for r in data.train}) == list(range(16))
    )
    assert data.train_only and not data.query
    assert build_dataset("dgd_shinpuhkan", tmp_path, test_splits=False, val_ratio=0) == data


def test_masks_mirror_the_camera_folders(tmp_path):
    """Masks in ``cam_<c>_seg/``; those of a person in no split are no orphans (DGD's PRID leaves none out, a
    hand-made split may)."""
    split = {"trainval": [0, 2, 4], "test_probe": [1, 3], "test_gallery": [1, 3]}
    folder = write_dgd(tmp_path / "viper", "VIPeR", [[1, 1]] * 6, split, masks=True)
    data = build_dataset("dgd_viper", tmp_path, with_masks=True, val_ratio=0)
    assert data.mask_paths[data.train[0].path] == str(folder / "cam_0_seg" / "00000_00000.png")
    assert len(data.mask_paths) == 10 and not any("00005_" in path for path in data.mask_paths)
    # a load of some splits alone: the others' masks, in the same camera folders, are no orphans either
    tested = build_dataset("dgd_viper", tmp_path, with_masks=True, train_split=False)
    assert len(tested.mask_paths) == 4 and tested.mask_paths[data.query[0].path] == data.mask_paths[data.query[0].path]
    assert len(build_dataset("dgd_viper", tmp_path, with_masks=True, test_splits=False, val_ratio=0).mask_paths) == 6
    os.remove(data.mask_paths[data.query[0].path])
    with pytest.raises(DatasetNotFoundError, match="1 image\\(s\\) have no mask"):
        build_dataset("dgd_viper", tmp_path, with_masks=True)


def edit(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(name="PRID"), "expected the meta file of VIPeR \\(its name\\), got 'PRID'"),
        (lambda m: m.update(num_cameras=3), "expected num_cameras 2 and a list of identities"),
        (lambda m: m.update(identities={}), "expected num_cameras 2 and a list of identities"),
        (lambda m: m["identities"].append([[], [], []]), "identity 6 must list at most 2 cameras' files"),
        (lambda m: m["identities"][1].__setitem__(0, "cam_0/00001_00000.bmp"), "identity 1, view 0: expected a list"),
        (lambda m: m["identities"][1].__setitem__(0, ["cam_2/00001_00000.bmp"]), "expected 'cam_<camera below 2>/"),
        (
            lambda m: m["identities"][1].__setitem__(0, ["cam_0/00002_00000.bmp"]),
            "cam_0/00002_00000.bmp is named for identity 2",
        ),
        (
            lambda m: m["identities"][1].__setitem__(0, ["cam_0/x_00000.bmp"]),
            "identity 1, view 0: expected 'cam_<camera below 2>/<person>_<n>.<ext>', got 'cam_0/x_00000.bmp'",
        ),
        (
            lambda m: m["identities"][1].__setitem__(1, ["cam_1/00001_00000.bmp"] * 2),
            "cam_1/00001_00000.bmp is listed twice",
        ),
        (
            lambda m: m["identities"][1].__setitem__(0, ["cam_0/00001_00007.bmp"]),
            "image not found: .*cam_0/00001_00007.bmp",
        ),
        (lambda m: m["identities"][1].__setitem__(0, [3]), "expected 'cam_<camera below 2>/<person>_<n>.<ext>', got 3"),
    ],
)
def test_a_meta_file_that_does_not_describe_the_folder_is_named(tmp_path, change, message):
    folder = viper(tmp_path)
    edit(folder / "meta.json", change)
    with pytest.raises(DatasetError, match=message):
        build_dataset("dgd_viper", tmp_path)


def test_the_cameras_are_the_folders_and_each_view_one_camera(tmp_path):
    """Shinpuhkan's script lists a person's cameras in the order it meets them: the camera is the cam_<c>/ folder, not
    the view's place in the list. A view of two cameras, or two views of one, is refused."""
    split = {"trainval": [0], "test_probe": [1], "test_gallery": [1]}
    folder = write_dgd(tmp_path / "viper", "VIPeR", [[1, 1], [1, 1]], split)
    Image.new("RGB", (8, 16)).save(folder / "cam_1" / "00000_00001.bmp")
    edit(folder / "meta.json", lambda m: m["identities"].__setitem__(0, [["cam_1/00000_00000.bmp"]]))
    assert [(r.camid, os.path.basename(r.path)) for r in build_dataset("dgd_viper", tmp_path).train] == [
        (1, "00000_00000.bmp")
    ]
    for views in (
        [["cam_0/00000_00000.bmp", "cam_1/00000_00000.bmp"]],
        [["cam_1/00000_00000.bmp"], ["cam_1/00000_00001.bmp"]],
    ):
        edit(folder / "meta.json", lambda m: m["identities"].__setitem__(0, views))
        with pytest.raises(DatasetError, match="identity 0: each view must hold the files of one camera of its own"):
            build_dataset("dgd_viper", tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("test_probe"), "expected lists trainval, test_probe, test_gallery"),
        (lambda s: s["trainval"].append(6), "trainval holds 6, not an identity of meta.json \\(0..5\\)"),
        (lambda s: s["trainval"].append(True), "trainval holds True"),
        (lambda s: s["trainval"].append(0), "trainval lists an identity twice"),
        (lambda s: s["trainval"].append(1), "identity 1 is in trainval and in the test split"),
        (lambda s: s["test_gallery"].remove(3), "every test_probe identity must be in test_gallery"),
    ],
)
def test_a_split_file_dgd_would_not_have_written_is_named(tmp_path, change, message):
    folder = viper(tmp_path)
    edit(folder / "split.json", change)
    with pytest.raises(DatasetError, match=message):
        build_dataset("dgd_viper", tmp_path)


def test_missing_or_unreadable_files_are_named(tmp_path):
    folder = viper(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="VIPeR \\(DGD's format\\): no folder with meta.json, split.json"):
        build_dataset("dgd_viper", folder / "cam_0")
    with pytest.raises(DatasetError, match="expected the meta file of PRID \\(its name\\), got 'VIPeR'"):
        build_dataset("dgd_prid", folder)  # another dataset's folder
    (folder / "split.json").write_text("{")
    with pytest.raises(DatasetError, match="corrupt DGD split file .*split.json: Expecting"):
        build_dataset("dgd_viper", tmp_path)
    (folder / "split.json").unlink()
    (folder / "split.json").mkdir()
    with pytest.raises(DatasetError, match="cannot read the DGD split file .*split.json: Is a directory"):
        build_dataset("dgd_viper", tmp_path)


def test_the_jstl_merge_trains_on_every_dataset_and_tests_on_one(tmp_path):
    """DGD's JSTL order (3DPeS, CUHK01, CUHK03, i-LIDS, PRID, VIPeR, Shinpuhkan) as one training set, tested on
    VIPeR: its cameras follow the 2 x 5 cameras of the datasets before it."""
    viper(tmp_path)
    prid(tmp_path)
    split = {"trainval": [0], "test_probe": [1], "test_gallery": [1]}
    for name, title in (("3dpes", "3DPeS"), ("cuhk01", "cuhk01"), ("cuhk03", "cuhk03"), ("ilids", "i-LIDS")):
        write_dgd(tmp_path / name, title, [[2, 2], [1, 1]], split, suffix=".jpg")
    write_dgd(
        tmp_path / "shinpuhkan",
        "Shinpuhkan",
        [[1] * 16],
        {"trainval": [0], "test_probe": [], "test_gallery": []},
        num_cameras=16,
    )
    names = ["dgd_3dpes", "dgd_cuhk01", "dgd_cuhk03", "dgd_ilids", "dgd_prid", "dgd_viper", "dgd_shinpuhkan"]
    overrides = [f"dataset.name=[{','.join(names)}]", f"dataset.root={tmp_path}", "dataset.test_name=dgd_viper"]
    config = load_config(None, [*overrides, "eval.protocol=cuhk03"])
    splits = load_splits(config)
    assert splits.name == "+".join(names) + "->dgd_viper"
    assert splits.num_train_pids == 4 * 1 + 2 + 3 + 1 and splits.num_cams == 6 * 2 + 16
    assert sorted({r.camid for r in splits.query}) == [10] and sorted({r.camid for r in splits.gallery}) == [11]
    loaded = [build_dataset(name, tmp_path, test_splits=False) for name in names]
    assert combine_datasets(loaded).train == splits.train
    with pytest.raises(
        ConfigError, match="dataset.name: a run trained on 7 datasets is tested on the set \\(or the list"
    ):
        load_config(None, [f"dataset.name=[{','.join(names)}]"])


def test_maskreid_trains_on_a_jstl_merge_with_masks_and_tests_on_each_set(tmp_path):
    """The maskreid_jstl pipeline in small: MaskReID's softmax stage alone on two DGD-format sets with their masks,
    tested on both (each set's test split, its masks read alone), then dpm-reid eval gives the same metrics."""
    from dpm_ops.engine import train
    from dpm_ops.engine.builders import evaluate_checkpoint
    from engine_utils import tiny_config, write_config

    split = {"trainval": [0, 1, 2, 3], "test_probe": [4, 5, 6], "test_gallery": [4, 5, 6]}
    for name, title in (("viper", "VIPeR"), ("cuhk01", "cuhk01")):
        write_dgd(tmp_path / name, title, [[2, 2]] * 7, split, masks=True)
    settings = tiny_config(tmp_path, "maskreid")
    settings["dataset"] = {
        "name": ["dgd_cuhk01", "dgd_viper"],
        "root": str(tmp_path),
        "test_name": ["dgd_cuhk01", "dgd_viper"],
    }
    settings["sampler"] = {"kind": "pk", "num_ids": 4, "num_instances": 2}
    settings["solver"] = {"epochs": 0}
    settings["eval"].update(protocol="cuhk03", cuhk03_repeats=100)
    result = train(load_config(str(write_config(tmp_path / "jstl.yaml", settings))), tmp_path / "run")
    assert result["finished"] and list(result["metrics"]) == ["dgd_cuhk01", "dgd_viper"]
    run = tmp_path / "run"
    metrics, _ = evaluate_checkpoint(load_config(str(run / "config.yaml")), run / "checkpoints" / "final.pt")
    assert metrics == result["metrics"]
    args = torch.load(run / "checkpoints" / "final.pt", weights_only=True)["model_args"]
    assert args["num_classes"] == 8  # four trainval persons of each set


def test_the_validation_part_dgd_keeps_apart(tmp_path):
    """make_lists_id_training.py's --val-ratio 0.2: of a single-shot set, int(0.2 x 10) x 2 = 4 of the 10 trainval
    persons give one of their two views (all 10 still train); of a multi-shot set, int(0.2 x 20) = 4 of its 20
    images. Drawn seeded (DGD's is unseeded): the same each load; their masks are no orphans; 0 keeps none apart."""
    split = {"trainval": list(range(10)), "test_probe": [10, 11], "test_gallery": [10, 11]}
    write_dgd(tmp_path / "viper", "VIPeR", [[1, 1]] * 12, split, shot="single", masks=True)
    single = build_dataset("dgd_viper", tmp_path, with_masks=True)
    assert len(single.train) == 20 - 4 and single.num_train_pids == 10
    assert sum(1 for pid in range(10) if sum(r.pid == pid for r in single.train) == 1) == 4
    assert build_dataset("dgd_viper", tmp_path, with_masks=True).train == single.train
    assert len(build_dataset("dgd_viper", tmp_path, val_ratio=0).train) == 20
    split = {"trainval": list(range(5)), "test_probe": [5], "test_gallery": [5]}
    write_dgd(tmp_path / "ilids", "i-LIDS", [[2, 2]] * 6, split, suffix=".jpg")
    assert len(build_dataset("dgd_ilids", tmp_path).train) == 20 - 4
    assert len(build_dataset("dgd_ilids", tmp_path, val_ratio=0.5).train) == 20 - 10
    for bad in (1.0, -0.1, "0.2", float("nan")):
        with pytest.raises(DatasetError, match="i-LIDS: val_ratio must be a number in \\[0, 1\\)"):
            build_dataset("dgd_ilids", tmp_path, val_ratio=bad)
    edit(tmp_path / "ilids" / "meta.json", lambda meta: meta.pop("shot"))
    with pytest.raises(DatasetError, match="meta.json: expected shot 'single' or 'multiple', got None"):
        build_dataset("dgd_ilids", tmp_path)


def test_dataset_val_ratio_reaches_the_dgd_sources(tmp_path):
    from dpm_ops.engine.splits import load_splits

    split = {"trainval": list(range(5)), "test_probe": [5], "test_gallery": [5]}
    write_dgd(tmp_path / "ilids", "i-LIDS", [[2, 2]] * 6, split, suffix=".jpg")
    overrides = ["dataset.name=dgd_ilids", f"dataset.root={tmp_path}", "eval.protocol=cuhk03"]
    assert len(load_splits(load_config(None, overrides)).train) == 16
    assert len(load_splits(load_config(None, [*overrides, "dataset.val_ratio=0"])).train) == 20
    with pytest.raises(ConfigError, match="dataset.val_ratio: read only with a DGD-format set .*keeps a validation"):
        load_config(None, ["dataset.name=market1501", "dataset.val_ratio=0"])
