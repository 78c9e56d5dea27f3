"""The dpm-reid command end to end on a tiny synthetic set, and its one-line errors (exit code 2)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dpm_ops.cli import main
from engine_utils import synth_argv, tiny_config, write_config


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "set"
    assert main(synth_argv(out)) == 0
    return out


def assert_one_line_error(capsys, code, *needles):
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dpm-reid: error: "), captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_then_eval(tmp_path, tiny_set, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(run), "solver.epochs=1"]) == 0
    out = capsys.readouterr().out
    for column in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP", "occluded", "clean"):
        assert column in out
    for name in ("train.log", "train_log.jsonl", "config.yaml", "metrics.json", "checkpoints/final.pt",
                 "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    trained = json.loads((run / "metrics.json").read_text())
    assert main(["eval", "--config", str(config), "--weights", str(run / "checkpoints" / "final.pt"),
                 "--output", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == trained
    # resuming a finished run only evaluates again
    assert main(["train", "--config", str(config), "--output", str(run), "--resume", "solver.epochs=1"]) == 0
    assert json.loads((run / "metrics.json").read_text()) == trained

    # a checkpoint from another model: one line
    baseline = write_config(tmp_path / "baseline.yaml", tiny_config(tiny_set, "vit_baseline"))
    capsys.readouterr()
    code = main(["eval", "--config", str(baseline), "--weights", str(run / "checkpoints" / "final.pt")])
    assert_one_line_error(capsys, code, "holds a 'dpm' model, not 'vit_baseline'")


def test_train_generates_a_missing_synthetic_set(tmp_path, capsys):
    root = tmp_path / "generated"
    config = write_config(tmp_path / "tiny.yaml", tiny_config(root, "vit_baseline"))
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run"), "solver.epochs=1"]) == 0
    assert (root / "synthetic.json").is_file()
    assert "generating the synthetic dataset" in capsys.readouterr().err


def test_bad_inputs_are_one_line(tmp_path, tiny_set, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    out = ["--output", str(tmp_path / "run")]

    assert_one_line_error(capsys, main(["train", "--config", str(config), *out, "solver.lrr=1"]), "solver.lrr")
    assert_one_line_error(capsys, main(["train", "--config", str(tmp_path / "nope.yaml")]), "config not found")
    code = main(["train", "--config", str(config), *out, "dataset.name=market1501",
                 f"dataset.root={tmp_path / 'no_such_folder'}"])
    assert_one_line_error(capsys, code, "no_such_folder")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_set, broken)
    shutil.rmtree(broken / "query")
    code = main(["train", "--config", str(config), *out, f"dataset.root={broken}"])
    assert_one_line_error(capsys, code, "query")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_set, corrupt)
    victim = sorted((corrupt / "bounding_box_train").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    for workers in (0, 1):
        code = main(["train", "--config", str(config), *out, f"dataset.root={corrupt}",
                     f"dataloader.num_workers={workers}"])
        assert_one_line_error(capsys, code, "unreadable image", victim.name)

    torch_file = tmp_path / "weights.pth"
    torch_file.write_bytes(b"garbage")
    code = main(["eval", "--config", str(config), "--weights", str(torch_file)])
    assert_one_line_error(capsys, code, "weights.pth")


def test_module_entry_point():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "dpm_ops", "configs"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0 and "synthetic_dpm" in result.stdout and "dpm_occluded_duke" in result.stdout
    result = subprocess.run([sys.executable, "-m", "dpm_ops", "train", "--config", "synthetic_dpm", "solver.nope=1"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "dpm-reid: error: unknown config key 'solver.nope' (override 'solver.nope=1')"]


def test_eval_takes_eval_time_options_from_its_config():
    """`dpm-reid eval` builds the checkpoint's architecture, with the config's eval-only options."""
    from dpm_ops.engine.trainer import eval_model_arguments

    saved = {"num_classes": 5, "num_cameras": 2, "options": {"embed_dim": 32, "neck_feat": "before"}}
    config = {"model": {"options": {"embed_dim": 64, "neck_feat": "after"}}}
    args = eval_model_arguments("dpm", saved, config)
    assert args == {"num_classes": 5, "num_cameras": 2, "options": {"embed_dim": 32, "neck_feat": "after"}}
    assert eval_model_arguments("vit_baseline", saved, config) == saved
