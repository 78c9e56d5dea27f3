"""Several datasets trained on as one (``dataset.name`` a list) and ``dataset.combineall``: labels and cameras of
each dataset after the previous ones', distractors left out, the test set's cameras numbered as trained, and a
run of them trained and evaluated end to end."""

import json
import os
import shutil
import warnings

import pytest
from PIL import Image
from dpm_ops.data import (
    DatasetCountWarning,
    DatasetError,
    DatasetNotFoundError,
    ReIDSplits,
    build_dataset,
    combine_datasets,
)
from dpm_ops.data.synth import generate_synthetic_dataset
from dpm_ops.engine import ConfigError, load_checkpoint, load_config, train
from dpm_ops.engine.builders import evaluate_checkpoint
from dpm_ops.engine.splits import load_splits
from engine_utils import scored, tiny_config, tiny_synth_config, write_config
from test_data_layouts import make_duke_tree, make_market_tree, make_occluded_reid_tree, write_mask


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetCountWarning)
        return function(*args, **kwargs)


@pytest.fixture
def market_and_duke(tmp_path):
    make_market_tree(tmp_path)
    make_duke_tree(tmp_path / "DukeMTMC-reID")
    market, duke = (quietly(build_dataset, name, tmp_path) for name in ("market1501", "dukemtmc"))
    return tmp_path, market, duke


def triples(records):
    return sorted((os.path.basename(r.path), r.pid, r.camid) for r in records)


def test_sources_follow_each_other_in_labels_and_cameras(market_and_duke):
    root, market, duke = market_and_duke
    combined = combine_datasets([market, duke])
    assert combined.name == "market1501+dukemtmc" and combined.root == str(root)
    assert combined.num_cams == 6 + 8 and combined.num_train_pids == 4
    assert combined.query == [] and combined.gallery == [] and combined.mask_paths is None
    # Market's train ids 2, 7 are labels 0, 1; Duke's 1, 4 are 2, 3, its cameras 1..8 are 6..13
    assert triples(combined.train) == [
        ("0001_c1_f0046985.jpg", 2, 6),
        ("0001_c8_f0047105.jpg", 2, 13),
        ("0002_c1s1_000451_03.jpg", 0, 0),
        ("0002_c2s1_000551_01.jpg", 0, 1),
        ("0004_c2_f0001234.jpg", 3, 7),
        ("0007_c6s4_002452_02.jpg", 1, 5),
    ]
    assert combined.junk_dropped == market.junk_dropped + duke.junk_dropped == 2


def test_combineall_trains_on_the_query_and_gallery_identities_but_not_the_distractors(market_and_duke):
    _, market, duke = market_and_duke
    combined = combine_datasets([market, duke], combineall=True)
    assert combined.name == "market1501_all+dukemtmc_all" and combined.num_cams == 14
    labels = {name: (pid, camid) for name, pid, camid in triples(combined.train)}
    assert "0000_c1s1_000811_05.jpg" not in labels  # Market's pid 0: gallery images of no identity
    # Market: train ids 2, 7 (labels 0, 1), then its test ids 3, 5 (2, 3) over query and gallery alike
    assert labels["0003_c1s1_000151_00.jpg"] == labels["0003_c1s1_000161_02.jpg"] == (2, 0)
    assert labels["0003_c2s1_000201_01.jpg"] == (2, 1) and labels["0005_c4s2_000401_01.jpg"] == (3, 3)
    # Duke: train ids 1, 4 (4, 5), then test ids 5, 9, 12 (6, 7, 8): its pid 5 is not Market's
    assert labels["0001_c1_f0046985.jpg"] == (4, 6) and labels["0004_c2_f0001234.jpg"] == (5, 7)
    assert labels["0005_c2_f0046985.jpg"] == labels["0005_c3_f0047225.jpg"][:1] + (7,)
    assert [
        labels[f"{pid:04d}_c{cam}_f{frame}.jpg"][0] for pid, cam, frame in ((5, 3, "0047225"), (9, 8, "0100120"))
    ] == [
        6,
        7,
    ]
    assert labels["0012_c1_f0000120.jpg"] == (8, 6)
    assert combined.num_train_pids == 9 and len(combined.train) == 3 + 5 + 3 + 5
    assert combine_datasets([market], combineall=True).num_train_pids == 4  # one dataset's combineall


def test_a_test_only_set_adds_its_identities_with_combineall_alone(market_and_duke):
    root, market, _ = market_and_duke
    make_occluded_reid_tree(root)
    occluded = quietly(build_dataset, "occluded_reid", root)
    with pytest.raises(DatasetError, match="occluded_reid adds no training images"):
        combine_datasets([market, occluded])
    combined = combine_datasets([market, occluded], combineall=True)
    assert combined.num_train_pids == 4 + 2 and combined.num_cams == 6 + occluded.num_cams


def test_combine_datasets_refuses_what_it_cannot_combine(market_and_duke, tmp_path):
    root, market, duke = market_and_duke
    with pytest.raises(DatasetError, match="market1501 is given twice"):
        combine_datasets([market, duke, market])
    with pytest.raises(DatasetError, match="non-empty list of ReIDSplits"):
        combine_datasets([])
    with pytest.raises(DatasetError, match="non-empty list of ReIDSplits"):
        combine_datasets(market)
    train_only = quietly(build_dataset, "dukemtmc", root, test_splits=False)
    with pytest.raises(DatasetError, match="dukemtmc was loaded without its query and gallery"):
        combine_datasets([market, train_only], combineall=True)
    for path in (r.path for r in (*duke.train, *duke.query, *duke.gallery)):
        write_mask(path, root / "DukeMTMC-reID")
    masked = quietly(build_dataset, "dukemtmc", root, with_masks=True)
    with pytest.raises(DatasetError, match="some sources were loaded with masks and some without"):
        combine_datasets([market, masked])
    assert isinstance(combine_datasets([masked]), ReIDSplits)


def config(root, *overrides):
    return load_config(None, ["dataset.check_counts=off", f"dataset.root={root}", *overrides])


def test_the_test_set_is_numbered_as_trained_where_it_is_a_source(market_and_duke):
    """Duke tested after training on Market + Duke: its cameras are the model's embeddings 6..13, in the run's
    evaluation and in dpm-reid eval's (which lists Market's train folder to count its cameras); Market's keep
    0..5, and a set not trained on keeps its own."""
    root, _, _ = market_and_duke
    sources = "dataset.name=[market1501, dukemtmc]"
    cameras = {}
    for test, train_split in ((t, s) for t in ("dukemtmc", "market1501") for s in (True, False)):
        splits = load_splits(config(root, sources, f"dataset.test_name={test}"), train_split=train_split)
        assert splits.name == f"market1501+dukemtmc->{test}"
        assert len(splits.train) == (6 if train_split else 0)
        cameras[test, train_split] = sorted({r.camid for r in (*splits.query, *splits.gallery)})
    assert cameras["dukemtmc", True] == cameras["dukemtmc", False] == [6 + 0, 6 + 1, 6 + 2, 6 + 6, 6 + 7]
    assert cameras["market1501", True] == cameras["market1501", False] == [0, 1, 2, 3]
    shutil.rmtree(root / "Market-1501-v15.09.15" / "bounding_box_train")
    assert load_splits(config(root, sources, "dataset.test_name=market"), train_split=False).query
    with pytest.raises(DatasetNotFoundError, match="dataset.test_name dukemtmc follows market1501 in dataset.name: "):
        load_splits(config(root, sources, "dataset.test_name=dukemtmc"), train_split=False)
    make_duke_tree(root / "Occluded_Duke")
    splits = load_splits(config(root, sources, "dataset.test_name=occluded_duke"), train_split=False)
    assert sorted({r.camid for r in splits.query}) == [1, 6]


def test_combineall_config_trains_on_the_test_identities_and_is_tested_elsewhere(market_and_duke):
    root, _, _ = market_and_duke
    splits = load_splits(config(root, "dataset.name=market1501", "dataset.combineall=true", "dataset.test_name=duke"))
    assert splits.name == "market1501_all->dukemtmc" and splits.num_train_pids == 4
    assert (
        load_splits(
            config(root, "dataset.name=market", "dataset.combineall=true", "dataset.test_name=duke"), train_split=False
        ).name
        == "market1501_all->dukemtmc"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["dataset.name=[market1501, dukemtmc]"],
            "dataset.name: a run trained on 2 datasets is tested on the set \\(or the list of sets\\) dataset.test_name names",
        ),
        (
            ["dataset.combineall=true", "dataset.name=market1501"],
            "dataset.combineall: a run that trains on its datasets' query and gallery is tested on another set",
        ),
        (
            ["dataset.name=[market1501, market]", "dataset.test_name=duke"],
            "dataset.name: 'market1501' is listed twice \\('market'\\)",
        ),
        (
            ["dataset.name=[dukemtmc, synth]", "dataset.test_name=market"],
            "dataset.name: the synthetic set trains alone",
        ),
        (
            ["dataset.name=[market1501, dukemtmc]", "dataset.test_name=Market-1501", "dataset.combineall=true"],
            "dataset.test_name: 'Market-1501' is trained on with dataset.combineall",
        ),
        (["dataset.name=[]"], "dataset.name: expected a dataset name or a list of 1 to 16, got \\[\\]"),
        (["dataset.name=[market1501, 3]"], "dataset.name: expected str, got 3"),
        (["dataset.name=[market1501, {a: 1}]"], "dataset.name: expected str"),
    ],
)
def test_config_mistakes_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_several_datasets_with_masks_read_them_from_each_dataset_folder():
    base = ["model.name=maskreid", "model.options={}", "input.recipe=maskreid", "sampler.kind=maskreid"]
    several = ["dataset.name=[market1501, dukemtmc]", "dataset.test_name=occluded_duke"]
    with pytest.raises(ConfigError, match="dataset.mask_root: with several datasets each one's masks sit in its own"):
        load_config(None, [*base, *several, "dataset.mask_root=/masks"])
    assert load_config(None, [*base, *several])["dataset"]["name"] == ["market1501", "dukemtmc"]
    assert load_config(None, [*base, "dataset.name=[market1501]", "dataset.mask_root=/masks"])["dataset"]["name"] == (
        "market1501"
    )  # a list of one is its name


@pytest.fixture(scope="module")
def two_synthetic_sets(tmp_path_factory):
    """Two tiny synthetic sets (Market's layout) as Market-1501 (3 cameras used) and DukeMTMC-reID (4)."""
    base = tmp_path_factory.mktemp("combined")
    for folder, seed, cameras in (("Market-1501-v15.09.15", 3, 3), ("DukeMTMC-reID", 11, 4)):
        generate_synthetic_dataset(base / folder, tiny_synth_config(seed=seed, cameras=cameras), progress=False)
    return base


def test_a_run_on_two_datasets_trains_and_evaluates_as_dpm_reid_eval_scores_it(tmp_path, two_synthetic_sets):
    """DPM with its camera embeddings trained on both sets, tested on the second: the model has both sets' classes
    and cameras, and the run's metrics are dpm-reid eval's of its final.pt (the test cameras numbered alike)."""
    settings = tiny_config(two_synthetic_sets)
    settings["dataset"] = {
        "name": ["market1501", "dukemtmc"],
        "root": str(two_synthetic_sets),
        "test_name": "dukemtmc",
        "check_counts": "off",
    }
    settings["solver"]["epochs"] = 1
    run_config = load_config(str(write_config(tmp_path / "two.yaml", settings)))
    result = train(run_config, tmp_path / "run")
    splits = load_splits(run_config)
    args = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")["model_args"]
    assert (args["num_classes"], args["num_cameras"]) == (splits.num_train_pids, 6 + 8)
    assert splits.num_train_pids == len({r.pid for r in splits.train}) > 20 // 2  # ids of both sets
    saved = load_config(str(tmp_path / "run" / "config.yaml"))
    assert saved["dataset"]["name"] == ["market1501", "dukemtmc"]
    metrics, output = evaluate_checkpoint(saved, tmp_path / "run" / "checkpoints" / "final.pt")
    record = scored(output, tmp_path / "run" / "checkpoints" / "final.pt")
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["settings"]["dataset"] == trained["settings"]["dataset"] == "market1501+dukemtmc->dukemtmc"
    assert record["all"] == trained["all"] and record["all"] == result["metrics"]["all"]
    assert 0 < record["all"]["mAP"] <= 100


def test_several_test_sets_each_with_its_own_cameras_and_checks(market_and_duke):
    """dataset.test_name a list (fast-reid's DATASETS.TESTS): the first is the splits' query and gallery, the others
    more_tests, each checked and numbered as the model trained (Duke after Market's cameras)."""
    root, _, _ = market_and_duke
    make_duke_tree(root / "Occluded_Duke")
    sources = "dataset.name=[market1501, dukemtmc]"
    for train_split in (True, False):
        splits = load_splits(
            config(root, sources, "dataset.test_name=[occluded_duke,dukemtmc]"), train_split=train_split
        )
        (duke,) = splits.more_tests
        assert (splits.name, duke.name) == ("market1501+dukemtmc->occluded_duke", "market1501+dukemtmc->dukemtmc")
        assert sorted({r.camid for r in splits.query}) == [1, 6] and duke.more_tests == ()
        assert sorted({r.camid for r in duke.query}) == [6 + 1, 6 + 6] and duke.train == splits.train
        assert "and market1501+dukemtmc->dukemtmc" in splits.summary()
    with pytest.raises(ConfigError, match="dataset.test_name: 'dukemtmc' is listed twice \\('duke'\\)"):
        config(root, sources, "dataset.test_name=[dukemtmc, occluded_duke, duke]")
    (root / "Occluded_Duke" / "query" / "0005_c2_f0046985.jpg").unlink()
    (root / "Occluded_Duke" / "query" / "0009_c7_f0100000.jpg").unlink()
    with pytest.raises(
        DatasetError, match="no \\*.jpg images in .*Occluded_Duke.query"
    ):  # the second test set is loaded and checked too
        load_splits(config(root, sources, "dataset.test_name=[dukemtmc, occluded_duke]"))


def test_two_names_of_one_test_set_are_refused(tmp_path):
    for variant in ("labeled", "detected"):
        for folder in ("bounding_box_train", "query", "bounding_box_test"):
            name = {"query": "0001_c1_00.png"}.get(folder, "0001_c2_01.png")
            image = tmp_path / "cuhk03-np" / variant / folder / name
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 16)).save(image)
    overrides = [f"dataset.root={tmp_path}", "dataset.check_counts=off", "dataset.name=cuhk03_np_detected"]
    overrides.append("dataset.test_name=[cuhk03_np, cuhk03_np_labeled]")
    with pytest.raises(DatasetError, match="test_name: cuhk03_np and cuhk03_np_labeled are the same test set, cuhk"):
        load_splits(load_config(None, overrides))


def test_a_run_tested_on_two_sets_writes_each_and_their_metrics_json(tmp_path, two_synthetic_sets):
    """Each set evaluated into test_<set>/ (metrics.json, pictures); the run's metrics.json holds them by name,
    as final.pt and train() do; dpm-reid eval gives the same; a later evaluation on one set, and --overwrite,
    leave no earlier test_<set>/ folder to pass for theirs."""
    settings = tiny_config(two_synthetic_sets)
    settings["dataset"] = {
        "name": ["market1501", "dukemtmc"],
        "root": str(two_synthetic_sets),
        "test_name": ["dukemtmc", "market1501"],
        "check_counts": "off",
    }
    settings["solver"]["epochs"] = 1
    settings["eval"]["pictures"] = True
    run_config = load_config(str(write_config(tmp_path / "two.yaml", settings)))
    run = tmp_path / "run"
    result = train(run_config, run)
    record = json.loads((run / "metrics.json").read_text())
    assert list(record) == list(result["metrics"]) == ["dukemtmc", "market1501"]
    for name in record:
        own = json.loads((run / f"test_{name}" / "metrics.json").read_text())
        assert record[name] == own and own["settings"]["dataset"] == f"market1501+dukemtmc->{name}"
        assert own["all"] == result["metrics"][name]["all"] and (run / f"test_{name}" / "ranked_best.png").is_file()
    assert load_checkpoint(run / "checkpoints" / "final.pt")["metrics"] == result["metrics"]
    metrics, output = evaluate_checkpoint(load_config(str(run / "config.yaml")), run / "checkpoints" / "final.pt")
    scored_twice = json.loads((output / "metrics.json").read_text())
    assert {name: scored_twice[name]["all"] for name in scored_twice} == {n: record[n]["all"] for n in record}
    assert metrics == result["metrics"]
    alone = load_config(str(run / "config.yaml"), ["dataset.test_name=market1501"])
    evaluate_checkpoint(alone, run / "checkpoints" / "final.pt")
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == []  # the two test_<set>/ of the earlier one
    assert json.loads((output / "metrics.json").read_text())["all"] == record["market1501"]["all"]
    assert (output / "cmc.png").is_file()  # one set's pictures beside its metrics.json ...
    evaluate_checkpoint(load_config(str(run / "config.yaml")), run / "checkpoints" / "final.pt")
    assert not (output / "cmc.png").exists() and (output / "test_market1501" / "cmc.png").is_file()  # ... or theirs
    again = train(load_config(str(run / "config.yaml"), ["dataset.test_name=market1501"]), run, resume=True)
    assert again["metrics"]["all"] == record["market1501"]["all"] and not list(run.glob("test_*"))  # evaluated again
    assert json.loads((run / "metrics.json").read_text())["settings"]["dataset"] == "market1501+dukemtmc->market1501"
    train(run_config, run, overwrite=True)
    assert sorted(p.name for p in run.glob("test_*")) == ["test_dukemtmc", "test_market1501"]
    (run / "test_notes").mkdir()
    (run / "test_notes.txt").write_text("mine")
    stopped = load_config(str(run / "config.yaml"), ["train.stop_after_iters=1"])
    assert not train(stopped, run, overwrite=True)["finished"]  # the earlier run's test_<set>/ go with its checkpoints
    assert sorted(p.name for p in run.glob("test_*")) == ["test_notes", "test_notes.txt"]
