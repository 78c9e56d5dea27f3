"""torchreid's small datasets (dpm_ops.data.torchreid_sets) against torchreid 0.2.5's own loaders, run from its
files: a split file torchreid draws is read here into its train / query / gallery lists, split by split, and a
split file drawn here is read by torchreid into the lists loaded here. Folders as torchreid reads them, with
one small image linked under every name."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.reference import peers
from dpm_ops.data import DatasetError, DatasetNotFoundError, build_dataset
from dpm_ops.data import torchreid_sets

PEER_CLASSES = {"viper": "VIPeR", "grid": "GRID", "ilids": "iLIDS", "prid": "PRID", "cuhk01": "CUHK01"}


def _images(root, names, suffix):
    """An image under each of ``names`` (relative to ``root``), hard links of one small file: fast for GRID's and
    PRID's thousand names."""
    source = root / f"_image{suffix}"
    if not source.exists():
        root.mkdir(parents=True, exist_ok=True)
        colours = np.random.default_rng(0).integers(0, 255, (8, 4, 3), dtype=np.uint8)
        Image.fromarray(colours).save(source)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(source, root / name)


def make_set(root, name: str):
    """The folder torchreid reads for ``name`` under ``root`` (small, but with the counts torchreid asserts)."""
    if name == "viper":
        _images(
            root, [f"viper/VIPeR/cam_{c}/{p:03d}_{a}.bmp" for p in range(12) for c, a in (("a", 0), ("b", 90))], ".bmp"
        )
    elif name == "grid":
        # 250 persons in probe and gallery (torchreid asserts 125 train persons per partition), 5 of no one (pid 0)
        names = [f"grid/underground_reid/probe/{p:04d}_{1 + p % 8}_{p}_1_2_3.jpeg" for p in range(1, 251)]
        names += [f"grid/underground_reid/gallery/{p:04d}_{1 + (p + 3) % 8}_{p}_1_2_3.jpeg" for p in range(1, 251)]
        names += [f"grid/underground_reid/gallery/0000_{1 + n}_{900 + n}_1_2_3.jpeg" for n in range(5)]
        _images(root, names, ".jpeg")
        _grid_partitions(root / "grid/underground_reid/features_and_partitions.mat")
    elif name == "ilids":  # torchreid asserts 476 images of 119 persons; 2 to 6 images each here
        counts = [4 + (p % 3) - 1 if p < 117 else 4 for p in range(119)]
        counts[-1] += 476 - sum(counts)
        _images(
            root,
            [
                f"ilids/i-LIDS_Pedestrian/Persons/{p + 1:04d}{n + 1:03d}.jpg"
                for p in range(119)
                for n in range(counts[p])
            ],
            ".jpg",
        )
    elif name == "prid":  # persons 1..200 on both cameras, 201..749 on camera B, 201..230 also on camera A
        folder = "prid2011/prid_2011/single_shot"
        _images(root, [f"{folder}/cam_a/person_{p:04d}.png" for p in range(1, 231)], ".png")
        _images(root, [f"{folder}/cam_b/person_{p:04d}.png" for p in range(1, 750)], ".png")
    elif name == "cuhk01":
        _images(root, [f"cuhk01/campus/{p:04d}{n:03d}.png" for p in range(1, 11) for n in range(1, 5)], ".png")
    elif name == "cuhksysu":  # torchreid's folder; fast-reid's is cuhk_sysu
        _images(
            root,
            [f"cuhksysu/cropped_images/p{p}_s{1000 + 3 * p + n}_{n}.jpg" for p in (7, 12, 31) for n in (1, 2)],
            ".jpg",
        )
    elif name == "cuhk02":
        names = [
            f"cuhk02/Dataset/P{pair}/cam{c}/{pair * 100 + p:04d}_{n}.png"
            for pair in range(1, 6)
            for p in range(3 + pair)
            for c in (1, 2)
            for n in (1, 2)
        ]
        _images(root, names, ".png")
    return root


def _grid_partitions(path):
    """features_and_partitions.mat as torchreid reads it: trainIdxAll, a 1 x 10 cell of structs whose third field
    holds a partition's 125 train persons."""
    savemat = pytest.importorskip("scipy.io").savemat  # as torchreid's GRID reads it: not there without scipy

    rng = np.random.default_rng(1)
    cell = np.empty((1, 10), dtype=object)
    for draw in range(10):
        train = np.sort(rng.choice(np.arange(1, 251), 125, replace=False)).reshape(1, -1)
        cell[0, draw] = {"testIdx": np.zeros((1, 1)), "probeIdx": np.zeros((1, 1)), "trainIdx": train.astype(float)}
    savemat(path, {"trainIdxAll": cell})


def torchreid_lists(name: str, root, split_id: int):
    """(train, query, gallery) of torchreid's loader, each a list of (path, pid, camid)."""
    module = peers.torchreid_dataset(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = getattr(module, PEER_CLASSES[name])(root=str(root), split_id=split_id, verbose=False)
    return [
        [(path, pid, camid) for path, pid, camid, *_ in split]
        for split in (dataset.train, dataset.query, dataset.gallery)
    ]


def our_lists(name: str, root, split_id: int = 0, **options):
    splits = build_dataset(name, str(root), split_id=split_id, check_counts="off", **options)
    return [[tuple(record) for record in split] for split in (splits.train, splits.query, splits.gallery)]


def split_count(name: str, root) -> int:
    folder = {"viper": "viper", "grid": "grid", "ilids": "ilids", "prid": "prid2011", "cuhk01": "cuhk01"}[name]
    file = "splits_single_shot.json" if name == "prid" else "splits.json"
    return len(json.loads((root / folder / file).read_text()))


@pytest.mark.parametrize("name", sorted(PEER_CLASSES))
def test_a_split_file_torchreid_drew_is_read_as_torchreid_reads_it(tmp_path, name):
    root = make_set(tmp_path, name)
    expected = torchreid_lists(name, root, 0)  # torchreid draws and writes its split file
    for split_id in range(split_count(name, root)):
        if split_id:
            expected = torchreid_lists(name, root, split_id)
        assert our_lists(name, root, split_id) == expected, split_id


@pytest.mark.parametrize("name", sorted(PEER_CLASSES))
def test_a_split_file_drawn_here_is_torchreids_format(tmp_path, name):
    root = make_set(tmp_path, name)
    ours = our_lists(name, root, 0)  # no split file: drawn here, seeded, and written
    assert split_count(name, root) == (20 if name in ("viper", "cuhk01") else 10)
    for split_id in range(split_count(name, root)):
        lists = ours if not split_id else our_lists(name, root, split_id)
        assert torchreid_lists(name, root, split_id) == lists, split_id


def test_drawn_splits_follow_torchreids_protocols(tmp_path):
    root = make_set(tmp_path, "viper")
    first = build_dataset("viper", str(root), check_counts="off")
    swapped = build_dataset("viper", str(root), split_id=1, check_counts="off")
    assert first.train == swapped.train and (first.query, first.gallery) == (swapped.gallery, swapped.query)
    assert {r.camid for r in first.query} == {0} and {r.camid for r in first.gallery} == {1}
    assert {r.pid for r in first.train} == set(range(6)) and {r.pid for r in first.query} == set(range(6))
    # the draw is seeded: a copy of the folder draws the same splits
    shutil.copytree(root / "viper" / "VIPeR", tmp_path / "copy" / "viper" / "VIPeR")
    copy = build_dataset("viper", str(tmp_path / "copy"), check_counts="off")
    assert [os.path.basename(r.path) for r in copy.train] == [os.path.basename(r.path) for r in first.train]
    ilids = build_dataset("ilids", str(make_set(tmp_path / "i", "ilids")), check_counts="off")
    assert len(ilids.query) == len(ilids.gallery) == 60 and len(ilids.train_pid_map) == 59
    assert all(q.pid == g.pid and q.path != g.path for q, g in zip(ilids.query, ilids.gallery))
    prid = build_dataset("prid", str(make_set(tmp_path / "p", "prid")), check_counts="error")  # the published counts
    assert prid.distractor_pids == frozenset(range(201, 750)) and len(prid.gallery) == 649


def test_cuhk02_is_torchreids_split_with_labels_in_pid_order(tmp_path):
    root = make_set(tmp_path, "cuhk02")
    ours = build_dataset("cuhk02", str(root), check_counts="off")
    module = peers.torchreid_dataset("cuhk02")
    theirs = module.CUHK02(root=str(root), verbose=False)
    assert sorted(map(tuple, ours.query)) == sorted(r[:3] for r in theirs.query)
    assert sorted(map(tuple, ours.gallery)) == sorted(r[:3] for r in theirs.gallery)
    # torchreid numbers each pair's persons in a set's order of strings (hash-seeded): the same persons, labels apart
    train = [r[:3] for r in theirs.train]  # (path, label, camera, dataset id)
    persons = {tuple(sorted(p for p, label, _ in train if label == n)) for n in {r[1] for r in train}}
    assert persons == {tuple(sorted(r.path for r in ours.train if r.pid == n)) for n in range(ours.num_train_pids)}
    assert sorted((p, c) for p, _, c in train) == sorted((r.path, r.camid) for r in ours.train)
    first_pair = sorted({int(os.path.basename(r.path)[:4]) for r in ours.train if r.camid < 2})
    assert [ours.train_pid_map[n] for n in range(len(first_pair))] == list(range(len(first_pair)))
    assert ours.num_cams == 10 and {r.camid for r in ours.query} == {8} and {r.camid for r in ours.gallery} == {9}


def test_a_moved_folder_reads_torchreids_split_file(tmp_path):
    root = make_set(tmp_path / "before", "viper")
    expected = our_lists("viper", root, 3)
    shutil.move(root / "viper", tmp_path / "after")  # the file's absolute paths name the old folder
    moved = our_lists("viper", tmp_path / "after", 3)
    assert [[(os.path.basename(p), *rest) for p, *rest in split] for split in moved] == [
        [(os.path.basename(p), *rest) for p, *rest in split] for split in expected
    ]
    assert all(p.startswith(str(tmp_path / "after")) for split in moved for p, *_ in split)


def test_an_existing_split_file_is_never_replaced(tmp_path):
    root = make_set(tmp_path, "prid")
    path = root / "prid2011" / "splits_single_shot.json"
    mine = [{"train": list(range(101, 201)), "test": list(range(1, 101))}]
    path.write_text(json.dumps(mine))
    splits = build_dataset("prid", str(root), check_counts="off")
    assert json.loads(path.read_text()) == mine
    assert sorted({r.pid for r in splits.query}) == list(range(1, 101))
    torchreid_sets._write_new(str(path), [{"train": [], "test": []}])
    assert json.loads(path.read_text()) == mine and not list(path.parent.glob("*.tmp"))


def test_a_folder_not_writable_draws_the_same_splits_each_load(tmp_path, monkeypatch):
    root = make_set(tmp_path, "cuhk01")
    written = our_lists("cuhk01", make_set(tmp_path / "w", "cuhk01"), 5)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torchreid_sets.tempfile, "NamedTemporaryFile", refused)
    with pytest.warns(UserWarning, match="cannot write the split file .*drawn again, the same"):
        again = our_lists("cuhk01", root, 5)
    assert not (root / "cuhk01" / "splits.json").exists()
    assert [[(os.path.basename(p), *r) for p, *r in s] for s in again] == [
        [(os.path.basename(p), *r) for p, *r in s] for s in written
    ]


def _edit_split(root, name, edit):
    """Edit split 0 of ``name``'s split file (drawn here first)."""
    our_lists(name, root)
    path = (
        root / {"prid": "prid2011"}.get(name, name) / ("splits_single_shot.json" if name == "prid" else "splits.json")
    )
    splits = json.loads(path.read_text())
    edit(splits[0])
    path.write_text(json.dumps(splits))


def _move_to_test(split):
    split["query"].append(split["train"][0])


@pytest.mark.parametrize(
    "name, edit, error, message",
    [
        (
            "viper",
            lambda s: s["train"][0].__setitem__(2, 1),
            DatasetError,
            r"puts .*cam_a/[0-9]+_0.bmp on camera 1, not 0",
        ),
        (
            "viper",
            lambda s: s["train"][0].__setitem__(0, "/elsewhere/other/000_0.bmp"),
            DatasetError,
            "expected an image of VIPeR/cam_a or VIPeR/cam_b",
        ),
        (
            "viper",
            lambda s: s["query"][0].__setitem__(0, "/old/VIPeR/cam_a/999_0.bmp"),
            DatasetNotFoundError,
            "is not here: no image .*999_0.bmp",
        ),
        (
            "viper",
            lambda s: s["train"][0].__setitem__(1, -1),
            DatasetError,
            r"train entries must be \[path, pid, camera\]",
        ),
        ("viper", _move_to_test, DatasetError, "is in the train split and tested"),
        ("viper", lambda s: s["gallery"].append(s["gallery"][0]), DatasetError, "gallery lists an image twice"),
        ("ilids", lambda s: s.pop("gallery"), DatasetError, "expected a list 'gallery', got None"),
        ("prid", lambda s: s["test"].append(300), DatasetError, r"test holds 300, not one of the persons 1..200"),
    ],
)
def test_a_bad_split_file_is_named(tmp_path, name, edit, error, message):
    root = make_set(tmp_path, name)
    _edit_split(root, name, edit)
    with pytest.raises(error, match=message) as caught:
        our_lists(name, root)
    assert "split 0" in str(caught.value)


def test_bad_folders_and_split_ids_are_named(tmp_path):
    root = make_set(tmp_path, "viper")
    with pytest.raises(DatasetError, match=r"split_id 20 is past the splits of .*splits.json \(0..19\)"):
        our_lists("viper", root, 20)
    with pytest.raises(DatasetError, match="split_id must be an integer >= 0, got -1"):
        our_lists("viper", root, -1)
    os.unlink(root / "viper/VIPeR/cam_b/011_90.bmp")
    (root / "viper/splits.json").unlink()
    with pytest.raises(DatasetError, match=r"do not pair up by name .*\(12 and 11 images\)"):
        our_lists("viper", root)
    grid = make_set(tmp_path / "g", "grid")
    (grid / "grid/underground_reid/features_and_partitions.mat").unlink()
    with pytest.raises(DatasetNotFoundError, match="GRID: neither the split file .* nor the partitions"):
        our_lists("grid", grid)
    (grid / "grid/underground_reid/features_and_partitions.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="expected GRID's ten partitions"):
        our_lists("grid", grid)
    cuhk01 = make_set(tmp_path / "c", "cuhk01")
    _images(cuhk01, ["cuhk01/campus/0011005.png"], ".png")
    with pytest.raises(DatasetError, match="camera / image 5 outside 1..4 in .*0011005.png"):
        our_lists("cuhk01", cuhk01)
    with pytest.raises(DatasetNotFoundError, match="i-LIDS: no folder with i-LIDS_Pedestrian/Persons"):
        our_lists("ilids", tmp_path)


def test_masks_of_the_images_no_split_reads_are_not_orphans(tmp_path):
    root = make_set(tmp_path, "prid")  # camera A's persons 201..230 are in no split
    for path in (root / "prid2011/prid_2011/single_shot").rglob("*.png"):
        mask = root / "prid2011/prid_2011_seg" / path.relative_to(root / "prid2011/prid_2011")
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 4), 255, np.uint8)).save(mask)
    splits = build_dataset("prid", str(root), with_masks=True, check_counts="off")
    assert len(splits.mask_paths) == 200 + 100 + 649
    train_only = build_dataset("prid", str(root), with_masks=True, test_splits=False, check_counts="off")
    assert not train_only.query and len(train_only.mask_paths) == 200


def test_a_run_trains_and_tests_on_the_split_dataset_split_id_names(tmp_path, capsys):
    """A DPM run on VIPeR's split 3 (drawn here and written) trains on its train persons and is tested on its
    query and gallery; dpm-reid eval of the run gives the same metrics, and refuses another split (whose test
    persons it trained on). dataset.split_id on sets without random splits is an error line."""
    from dpm_ops.engine import train
    from dpm_ops.engine.builders import evaluate_checkpoint
    from dpm_ops.engine.config import ConfigError, load_config
    from engine_utils import tiny_config, write_config

    root = make_set(tmp_path / "data", "viper")
    settings = tiny_config(tmp_path, "dpm", solver={"epochs": 1, "warmup_epochs": 0})
    settings["dataset"] = {"name": "viper", "root": str(root), "split_id": 3, "check_counts": "off"}
    result = train(load_config(str(write_config(tmp_path / "viper.yaml", settings))), tmp_path / "run")
    expected = build_dataset("viper", str(root), split_id=3, check_counts="off")
    assert result["finished"] and result["metrics"]["all"]["num_valid"] == len(expected.query) == 6
    run = tmp_path / "run"
    metrics, _ = evaluate_checkpoint(load_config(str(run / "config.yaml")), run / "checkpoints" / "final.pt")
    assert metrics == result["metrics"]
    assert torch.load(run / "checkpoints" / "final.pt", weights_only=True)["model_args"]["num_classes"] == 6
    other = load_config(str(run / "config.yaml"), ["dataset.split_id=4"])  # split 4's test persons trained on in 3
    with pytest.raises(DatasetError, match=r"final.pt trained on split 3 of viper: testing it on split 4 scores"):
        evaluate_checkpoint(other, run / "checkpoints" / "final.pt")
    from dpm_ops.cli import main

    argv = ["eval", "--config", str(run / "config.yaml"), "--weights", str(run / "checkpoints" / "final.pt")]
    assert main([*argv, "dataset.split_id=0"]) == 2
    assert "dpm-reid: error: checkpoint" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="dataset.split_id: the test set dukemtmc has no random splits to pick"):
        load_config(None, ["dataset.name=viper", "dataset.test_name=dukemtmc", "dataset.split_id=1"])
    load_config(None, ["dataset.name=market1501", "dataset.test_name=viper", "dataset.split_id=1"])  # the test set's


def test_cuhksysu_trains_only_and_joins_a_combineall_run(tmp_path):
    root = make_set(tmp_path, "cuhksysu")
    splits = build_dataset("cuhksysu", str(root), check_counts="off")
    assert splits.train_only and not splits.query and splits.num_cams == 1 and {r.camid for r in splits.train} == {0}
    assert [splits.train_pid_map[p] for p in (7, 12, 31)] == [0, 1, 2] and len(splits.train) == 6
    module = peers.torchreid_dataset("cuhksysu")
    theirs = module.CUHKSYSU(root=str(root), verbose=False)  # labels in a set's order of strings: compared as groups
    groups = {tuple(sorted(p for p, label, *_ in theirs.train if label == n)) for n in {r[1] for r in theirs.train}}
    assert groups == {tuple(sorted(r.path for r in splits.train if r.pid == n)) for n in range(3)}
    with pytest.raises(DatasetError, match="CUHK-SYSU has no test split"):
        build_dataset("cuhksysu", str(root), train_split=False)
    (root / "cuhksysu").rename(root / "cuhk_sysu")  # fast-reid's folder name
    moved = build_dataset("cuhksysu", str(root), check_counts="off")
    assert [os.path.basename(r.path) for r in moved.train] == [os.path.basename(r.path) for r in splits.train]


def test_the_domain_generalization_protocol(tmp_path, capsys):
    """Train once on every image of several sets (combineall, CUHK-SYSU's train-only crops among them), then test on
    the small sets' splits, each evaluated and summarized (dpm-reid eval --splits), as the domain-generalization
    papers' protocol does."""
    from dpm_ops.cli import main
    from dpm_ops.engine import load_config, train
    from dpm_ops.engine.splits import _build_dataset
    from engine_utils import tiny_config, write_config

    root = tmp_path / "data"
    for name in ("cuhk01", "cuhksysu", "viper", "prid"):
        make_set(root, name)
    settings = tiny_config(tmp_path, "vit_baseline", solver={"epochs": 1, "warmup_epochs": 0})
    settings["dataset"] = {
        "name": ["cuhk01", "cuhksysu"],
        "combineall": True,
        "test_name": ["viper", "prid"],
        "root": str(root),
        "split_id": 1,
        "check_counts": "off",
    }
    config = load_config(str(write_config(tmp_path / "dg.yaml", settings)))
    result = train(config, tmp_path / "dg")
    assert list(result["metrics"]) == ["viper", "prid"] and result["finished"]
    args = torch.load(tmp_path / "dg" / "checkpoints" / "final.pt", weights_only=True)["model_args"]
    assert args["num_classes"] == 10 + 3  # every CUHK01 person (train, query and gallery ones) and CUHK-SYSU's
    # split_id is the test sets': a source not tested keeps its first split (CUHK01's split file has 20)
    source = _build_dataset(config["dataset"], "cuhk01", str(root), False, check_counts="off")
    assert source.train == build_dataset("cuhk01", str(root), split_id=0, check_counts="off").train

    argv = [
        "eval",
        "--config",
        str(tmp_path / "dg" / "config.yaml"),
        "--weights",
        str(tmp_path / "dg/checkpoints/final.pt"),
    ]
    assert main([*argv, "--splits", "0-2", "--output", str(tmp_path / "splits")]) == 0
    assert "viper, all queries:" in capsys.readouterr().out
    summary = json.loads((tmp_path / "splits" / "summary.json").read_text())
    assert summary["split_ids"] == [0, 1, 2] and list(summary["sets"]) == ["viper", "prid"]
    split_1 = json.loads((tmp_path / "splits" / "split_1" / "metrics.json").read_text())
    assert {name: split_1[name]["all"] for name in split_1} == {name: m["all"] for name, m in result["metrics"].items()}
    assert summary["sets"]["prid"]["all"]["mAP"]["values"][1] == result["metrics"]["prid"]["all"]["mAP"]
    assert main(["summary", *(str(tmp_path / "splits" / f"split_{s}") for s in (2, 0))]) == 0  # ids from the names
    assert "split_0 (split 0)" in capsys.readouterr().out
    for splits, message in (
        ("3", "two or more different splits"),
        ("0-25", "PRID2011: split_id 10 is past the splits of"),
    ):
        assert main([*argv, "--splits", splits, "--output", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "split_0").exists()  # every split loaded before any is scored
    for text in ("a-b", "3-1", "0-1000"):
        with pytest.raises(SystemExit) as stopped:
            main([*argv, "--splits", text])
        assert stopped.value.code == 2 and "argument --splits: expected" in capsys.readouterr().err


def test_an_evaluation_tests_only_splits_whose_persons_the_model_never_trained_on():
    """A source the run did not test trained on its first split, a tested one on dataset.split_id's."""
    from dpm_ops.engine.config import load_config
    from dpm_ops.engine.splits import check_split_untrained

    def config(*overrides):
        return load_config(None, list(overrides))

    untested = config("dataset.name=[viper,cuhk01]", "dataset.test_name=prid", "dataset.split_id=4")
    check_split_untrained(config("dataset.name=viper"), untested, "ckpt")
    with pytest.raises(DatasetError, match="ckpt trained on split 0 of viper: testing it on split 4 scores persons"):
        check_split_untrained(config("dataset.name=viper", "dataset.split_id=4"), untested, "ckpt")
    tested = config("dataset.name=viper", "dataset.split_id=4")
    check_split_untrained(config("dataset.name=viper", "dataset.split_id=4"), tested, "ckpt")
    check_split_untrained(config("dataset.name=prid"), tested, "ckpt")  # a set it never trained on: any split
    with pytest.raises(DatasetError, match="trained on split 4 of viper: testing it on split 0"):
        check_split_untrained(config("dataset.name=market1501", "dataset.test_name=viper"), tested, "ckpt")
    whole = config("dataset.name=[viper,cuhk01]", "dataset.combineall=true", "dataset.test_name=prid")
    check_split_untrained(config("dataset.name=prid", "dataset.split_id=7"), whole, "ckpt")
    with pytest.raises(DatasetError, match=r"ckpt trained on every image of cuhk01 \(dataset.combineall\)"):
        check_split_untrained(config("dataset.name=cuhk01"), whole, "ckpt")


def test_batches_balanced_over_the_datasets_trained_on(tmp_path):
    """sampler.balance_sources: each P x K batch takes num_ids / 2 identities of CUHK01 and of CUHK-SYSU."""
    from dpm_ops.data import SourceBalancedBatchSampler, combine_datasets
    from dpm_ops.engine import load_config, train
    from dpm_ops.engine.builders import build_sampler
    from dpm_ops.engine.config import ConfigError
    from engine_utils import tiny_config, write_config

    root = tmp_path / "data"
    for name in ("cuhk01", "cuhksysu", "viper"):
        make_set(root, name)
    loaded = [build_dataset(name, str(root), check_counts="off", test_splits=False) for name in ("cuhk01", "cuhksysu")]
    combined = combine_datasets(loaded)
    assert combined.source_labels == (0, 5)  # CUHK01's split 0 trains 5 persons
    settings = tiny_config(tmp_path, "vit_baseline", solver={"epochs": 1, "warmup_epochs": 0})
    settings["dataset"] = {
        "name": ["cuhk01", "cuhksysu"],
        "test_name": "viper",
        "root": str(root),
        "check_counts": "off",
    }
    settings["sampler"] = {"kind": "pk", "num_ids": 4, "num_instances": 2, "balance_sources": True}
    config = load_config(str(write_config(tmp_path / "balanced.yaml", settings)))
    sampler = build_sampler("pk", config, [r.pid for r in combined.train], 0, 1, combined.source_labels)
    assert isinstance(sampler, SourceBalancedBatchSampler)
    for batch in sampler:
        assert sorted(combined.train[ref.index].pid >= 5 for ref in batch) == [False] * 4 + [True] * 4
    assert train(config, tmp_path / "run")["finished"]
    with pytest.raises(ConfigError, match="sampler.balance_sources: read only by P x K batches of several datasets"):
        load_config(None, ["dataset.name=viper", "sampler.balance_sources=true"])
