"""dpm-reid summary: the mean and sample std of several runs' metrics (a dataset's splits, a run each)."""

import json

import numpy as np
import pytest
import yaml

from dpm_ops.cli import main
from dpm_ops.engine.summary import METRICS, SummaryError, format_summary, summarize_runs

SETTINGS = {"model": "dpm", "dataset": "viper", "distance": "masked_arccos", "rerank": False, "num_query": 316}


def write_run(folder, values, split_id=None, settings=None, sets=None):
    """A run folder: metrics.json (one set, or ``sets`` {name: values}) and config.yaml with its split."""
    folder.mkdir(parents=True)

    def scored(numbers, name="viper"):
        subset = {**dict(zip(METRICS, numbers)), "num_query": 316, "num_valid": 316, "cmc": []}
        return {"all": subset, "settings": {**SETTINGS, "dataset": name, **(settings or {})}}

    metrics = scored(values) if sets is None else {name: scored(numbers, name) for name, numbers in sets.items()}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.yaml").write_text(yaml.safe_dump({"dataset": {"name": "viper", "split_id": split_id}}))
    return folder


def test_the_mean_and_sample_std_of_each_metric(tmp_path, capsys):
    values = np.array([[40.0, 60.0, 70.0, 45.0, 20.0], [44.0, 62.0, 71.0, 47.0, 22.0], [39.0, 58.0, 69.0, 44.0, 19.0]])
    runs = [write_run(tmp_path / f"split{i}", row, split_id=i) for i, row in enumerate(values)]
    summary = summarize_runs(runs)
    assert summary["split_ids"] == [0, 1, 2] and list(summary["sets"]) == ["viper"]
    for index, metric in enumerate(METRICS):
        entry = summary["sets"]["viper"]["all"][metric]
        assert entry["mean"] == pytest.approx(values[:, index].mean())
        assert entry["std"] == pytest.approx(values[:, index].std(ddof=1))
        assert entry["values"] == list(values[:, index])
    table = format_summary(summary)
    assert f"{runs[2]} (split 2)" in table and table.splitlines()[0] == "viper, all queries:"
    assert table.splitlines()[-2].split() == ["mean", *(f"{v:.1f}" for v in values.mean(0))]
    out = tmp_path / "summary.json"
    assert main(["summary", *map(str, runs), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sets"] == json.loads(json.dumps(summary["sets"]))
    assert "mean" in capsys.readouterr().out


def test_several_test_sets_and_evaluation_folders(tmp_path):
    sets = [{"a": [1, 2, 3, 4, 5], "b": [5, 4, 3, 2, 1]}, {"a": [3, 4, 5, 6, 7], "b": [7, 6, 5, 4, 3]}]
    runs = [write_run(tmp_path / f"r{i}", None, split_id=i, sets=s) for i, s in enumerate(sets)]
    (runs[1] / "eval").mkdir()
    (runs[1] / "metrics.json").rename(runs[1] / "eval" / "metrics.json")  # dpm-reid eval's folder, in the run's
    summary = summarize_runs([runs[0], runs[1] / "eval"])
    assert summary["split_ids"] == [0, 1] and summary["sets"]["b"]["all"]["rank1"]["mean"] == 6.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: [write_run(t / "a", [1] * 5, 0)], "give two or more runs to summarize"),
        (lambda t: [write_run(t / "a", [1] * 5, 0), t / "missing"], "missing: no metrics.json"),
        (
            lambda t: [write_run(t / "a", [1] * 5, 0), write_run(t / "b", [1] * 5, 1, {"distance": "cosine"})],
            "were scored differently on viper: distance 'masked_arccos' and 'cosine'",
        ),
        (lambda t: [write_run(t / "a", [1] * 5, 3), write_run(t / "b", [2] * 5, 3)], "both tested split 3"),
        (
            lambda t: [write_run(t / "a", [1] * 5, 0), write_run(t / "b", None, 1, sets={"prid": [1] * 5})],
            "is tested on viper, .*b on prid",
        ),
        (lambda t: [write_run(t / "a", [1] * 5, 0), write_run(t / "b", [1, 2, 3, None, 5], 1)], "lack mAP"),
    ],
)
def test_runs_that_cannot_be_summarized_are_named(tmp_path, capsys, make, message):
    runs = make(tmp_path)
    with pytest.raises(SummaryError, match=message):
        summarize_runs(runs)
    if len(runs) > 1:
        assert main(["summary", *map(str, runs)]) == 2
        assert capsys.readouterr().err.startswith("dpm-reid: error: ")


def test_a_summary_never_overwrites_a_runs_metrics(tmp_path, capsys):
    runs = [write_run(tmp_path / f"r{i}", [i] * 5, i) for i in range(2)]
    before = (runs[0] / "metrics.json").read_text()
    for out in (runs[0] / "metrics.json", tmp_path / "elsewhere" / "metrics.json"):
        assert main(["summary", *map(str, runs), "--out", str(out)]) == 2
        assert "--out" in capsys.readouterr().err
    assert (runs[0] / "metrics.json").read_text() == before


def test_the_splits_of_real_runs(tmp_path):
    """Two tiny DPM runs on two VIPeR splits, summarized from their folders."""
    from dpm_ops.engine import load_config, train
    from engine_utils import tiny_config, write_config
    from test_data_torchreid_sets import make_set

    root = make_set(tmp_path / "data", "viper")
    results = []
    for split in (0, 2):
        settings = tiny_config(tmp_path, "dpm", solver={"epochs": 1, "warmup_epochs": 0})
        settings["dataset"] = {"name": "viper", "root": str(root), "split_id": split, "check_counts": "off"}
        config = load_config(str(write_config(tmp_path / f"viper{split}.yaml", settings)))
        results.append(train(config, tmp_path / f"run{split}")["metrics"]["all"])
    summary = summarize_runs([tmp_path / "run0", tmp_path / "run2"])
    assert summary["split_ids"] == [0, 2]
    assert summary["sets"]["viper"]["all"]["mAP"]["mean"] == pytest.approx((results[0]["mAP"] + results[1]["mAP"]) / 2)
