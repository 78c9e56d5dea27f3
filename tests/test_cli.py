"""The dpm-reid command end to end on a tiny synthetic set, and its one-line errors (exit code 2)."""

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from dpm_ops.cli import main
from engine_utils import scored, synth_argv, tiny_config, write_config
from test_engine_train import record_logged_steps


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


def test_train_then_eval(tmp_path, tiny_set, capsys, monkeypatch):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(run), "solver.epochs=1"]) == 0
    out = capsys.readouterr().out
    for column in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP", "occluded", "clean"):
        assert column in out
    assert out.splitlines()[-1] == f"run folder: {run}"
    for name in (
        "train.log",
        "train_log.jsonl",
        "config.yaml",
        "metrics.json",
        "checkpoints/final.pt",
        "checkpoints/last.pt",
    ):
        assert (run / name).is_file(), name
    trained = json.loads((run / "metrics.json").read_text())
    assert (
        main(
            [
                "eval",
                "--config",
                str(config),
                "--weights",
                str(run / "checkpoints" / "final.pt"),
                "--output",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    assert scored(tmp_path / "eval", run / "checkpoints" / "final.pt") == trained
    assert capsys.readouterr().out.splitlines()[-1] == f"metrics written to {tmp_path / 'eval' / 'metrics.json'}"
    # without --output: <run>/eval for weights in <run>/checkpoints, else eval/ beside the weights
    loose = tmp_path / "weights" / "model.pt"
    loose.parent.mkdir()
    shutil.copy(run / "checkpoints" / "final.pt", loose)
    for weights, folder in ((run / "checkpoints" / "final.pt", run / "eval"), (loose, loose.parent / "eval")):
        assert main(["eval", "--config", str(config), "--weights", str(weights)]) == 0
        assert scored(folder, weights) == trained
    # resuming a finished run only evaluates again: no training step runs (a re-train from scratch, being
    # deterministic, also ended with the same metrics)
    (run / "metrics.json").unlink()
    logged = record_logged_steps(monkeypatch)
    assert main(["train", "--config", str(config), "--output", str(run), "--resume", "solver.epochs=1"]) == 0
    assert logged == []
    assert json.loads((run / "metrics.json").read_text()) == trained

    # a checkpoint from another model: one line
    baseline = write_config(tmp_path / "baseline.yaml", tiny_config(tiny_set, "vit_baseline"))
    capsys.readouterr()
    code = main(["eval", "--config", str(baseline), "--weights", str(run / "checkpoints" / "final.pt")])
    assert_one_line_error(capsys, code, "holds a 'dpm' model, not 'vit_baseline'")

    # a bare state dict of the config's model: torch.save(model.state_dict()) of one's own script, or
    # the official DPM release's layout (base.* / ConvLayer / attfc, its unused 1000-way base.fc)
    import torch

    weights = torch.load(run / "checkpoints" / "final.pt", weights_only=False)["model"]
    official_names = (("mask_generator.conv_stack.", "base.ConvLayer."), ("mask_generator.attfc.", "base.attfc."))
    official_names += (("backbone.", "base."),)

    def official_key(key):
        for ours, theirs in official_names:
            if key.startswith(ours):
                return theirs + key[len(ours) :]
        return key

    official = {f"module.{official_key(k)}": v for k, v in weights.items()}
    width = weights["backbone.cls_token"].shape[-1]
    official |= {"module.base.fc.weight": torch.zeros(1000, width), "module.base.fc.bias": torch.zeros(1000)}
    files = {"native.pth": weights, "transformer_150.pth": official}
    for file_name, contents in files.items():
        torch.save(contents, tmp_path / file_name)
        output = tmp_path / f"eval_{file_name}"
        code = main(["eval", "--config", str(config), "--weights", str(tmp_path / file_name), "--output", str(output)])
        assert code == 0 and scored(output, tmp_path / file_name) == trained, file_name
    capsys.readouterr()
    # ... that fits the config's model exactly: not another model's, not one with a tensor left out
    torch.save({k: v for k, v in weights.items() if k != "bottleneck.weight"}, tmp_path / "partial.pth")
    for config_path, file_name, needle in (
        (baseline, "native.pth", "does not fit the ViTBaseline of the config's model.options and input.size"),
        (config, "partial.pth", "missing: bottleneck.weight"),
    ):
        code = main(["eval", "--config", str(config_path), "--weights", str(tmp_path / file_name)])
        assert_one_line_error(capsys, code, needle)
    # an ImageNet backbone file starts a training instead
    torch.save({"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, tmp_path / "jx.pth")
    code = main(["eval", "--config", str(config), "--weights", str(tmp_path / "jx.pth")])
    assert_one_line_error(capsys, code, "timm_vit ImageNet backbone weights, not a trained re-ID model")
    torch.save([weights], tmp_path / "list.pth")
    code = main(["eval", "--config", str(config), "--weights", str(tmp_path / "list.pth")])
    assert_one_line_error(capsys, code, "neither a dpm_ops training checkpoint nor", "holds a list, not a state dict")


@pytest.mark.parametrize("model", ["dpm", "maskreid"])
def test_a_runs_config_yaml_evaluates_its_final_pt_to_its_metrics(tmp_path, tiny_set, model, capsys):
    import torch

    from dpm_ops.engine import load_checkpoint, load_config

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, model))
    run, final = tmp_path / "run", tmp_path / "run" / "checkpoints" / "final.pt"
    assert main(["train", "--config", str(config), "--output", str(run), "solver.epochs=1"]) == 0

    def round_trip(output):
        # config.yaml loads as the config the run trained and evaluated with; repr: types too (1 / 1.0 /
        # True, lists / tuples, YAML's off as the string 'off'); `eval` with it gives the run's metrics
        loaded, saved = load_config(str(run / "config.yaml")), load_checkpoint(final)["config"]
        assert loaded == saved and repr(loaded) == repr(saved)
        assert (
            main(["eval", "--config", str(run / "config.yaml"), "--weights", str(final), "--output", str(output)]) == 0
        )
        assert scored(output, final) == json.loads((run / "metrics.json").read_text())

    round_trip(tmp_path / "eval")
    # A finished run resumed with another evaluation key evaluates its weights again under it: metrics.json,
    # config.yaml and final.pt's config then all hold eval.rerank=true (training keys must match: an error).
    trained, weights = json.loads((run / "metrics.json").read_text()), load_checkpoint(final)["model"]
    assert (
        main(
            ["train", "--config", str(config), "--output", str(run), "--resume", "solver.epochs=1", "eval.rerank=true"]
        )
        == 0
    )
    assert json.loads((run / "metrics.json").read_text()) != trained
    assert load_checkpoint(final)["config"]["eval"]["rerank"] is True
    assert all(torch.equal(tensor, weights[key]) for key, tensor in load_checkpoint(final)["model"].items())
    round_trip(tmp_path / "eval_reranked")
    # GNN re-ranking through the config: MaskReID's Euclidean features re-ranked, its settings recorded;
    # DPM's masked arccos has no GNN form, refused before the extraction
    argv = ["eval", "--config", str(run / "config.yaml"), "--weights", str(final), "--output", str(tmp_path / "gnn")]
    capsys.readouterr()
    code = main([*argv, "eval.rerank=true", "eval.rerank_method=gnn"])
    if model == "dpm":
        assert_one_line_error(capsys, code, "rerank 'gnn' ranks by the cosine of the features")
    else:
        settings = json.loads((tmp_path / "gnn" / "metrics.json").read_text())["settings"]
        assert code == 0 and (settings["rerank_method"], settings["k1"], settings["k2"]) == ("gnn", 26, 7)
    # alpha query expansion and the TPR@FPR report through the config (fast-reid's TEST.AQE and TEST.ROC),
    # their settings recorded, the TPRs in the printed table
    argv[-1] = str(tmp_path / "aqe")
    capsys.readouterr()
    assert main([*argv, "eval.aqe=true", "eval.aqe_k=3", "eval.roc=true"]) == 0
    written = json.loads((tmp_path / "aqe" / "metrics.json").read_text())
    assert written["settings"]["aqe"] == dict(k=3, alpha=3.0, times=1) and written["settings"]["roc"] is True
    assert set(written["all"]["tpr_at_fpr"]) == {"1e-04", "1e-03", "1e-02"}
    assert "TPR@1e-04" in capsys.readouterr().out


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
    code = main(
        [
            "train",
            "--config",
            str(config),
            *out,
            "dataset.name=market1501",
            f"dataset.root={tmp_path / 'no_such_folder'}",
        ]
    )
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
        code = main(
            ["train", "--config", str(config), *out, f"dataset.root={corrupt}", f"dataloader.num_workers={workers}"]
        )
        assert_one_line_error(capsys, code, "unreadable image", victim.name)

    torch_file = tmp_path / "weights.pth"
    torch_file.write_bytes(b"garbage")
    code = main(["eval", "--config", str(config), "--weights", str(torch_file)])
    assert_one_line_error(capsys, code, "weights.pth")


def test_version_names_the_library_torch_and_the_backends(capsys):
    import torch

    import dpm_ops

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"dpm-reid {dpm_ops.__version__} (torch {torch.__version__}; backends: reference")
    assert ("cpp" in line) == dpm_ops.backends()["cpp"][0]


def test_module_entry_point():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dpm_ops", "configs"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and "synthetic_dpm" in result.stdout and "dpm_occluded_duke" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "dpm_ops", "train", "--config", "synthetic_dpm", "solver.nope=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "dpm-reid: error: unknown config key 'solver.nope' (override 'solver.nope=1')"
    ]


def test_eval_takes_eval_time_options_from_its_config():
    """`dpm-reid eval` builds the checkpoint's architecture, with the config's eval-only options."""
    from dpm_ops.engine.builders import eval_model_arguments

    saved = {"num_classes": 5, "num_cameras": 2, "options": {"embed_dim": 32, "neck_feat": "before"}}
    config = {"model": {"options": {"embed_dim": 64, "neck_feat": "after"}}}
    args = eval_model_arguments("dpm", saved, config)
    assert args == {"num_classes": 5, "num_cameras": 2, "options": {"embed_dim": 32, "neck_feat": "after"}}
    assert eval_model_arguments("vit_baseline", saved, config) == saved


# Every bad value fails at load time, before the data is read or a step is trained.
@pytest.mark.parametrize(
    "override, needle",
    [
        ("eval.distance=bogus", "config key eval.distance"),
        ("eval.k1=0", "config key eval.k1"),
        ("eval.lambda_value=2.0", "config key eval.lambda_value"),
        ("eval.max_rank=5", "config key eval.max_rank"),
        ("solver.base_lr=.nan", "config key solver.base_lr: expected a finite number"),
        ("train.seed=-1", "config key train.seed"),
        ("train.device=meta", "config key train.device"),
        ("sampler.kind=maskreid", "config key sampler.kind"),
        ("solver.amp=of", "config key solver.amp"),
    ],
)
def test_bad_values_fail_before_any_work(tmp_path, capsys, override, needle, monkeypatch):
    import dpm_ops.engine.builders as builders

    def no_work(*args, **kwargs):
        raise AssertionError("the data was read before the config was checked")

    monkeypatch.setattr(builders, "load_splits", no_work)
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "no_set", "dpm"))
    for command in (["train"], ["eval", "--weights", str(tmp_path / "final.pt")]):
        code = main([*command, "--config", str(config), "--output", str(tmp_path / "run"), override])
        assert_one_line_error(capsys, code, needle)


@pytest.mark.parametrize("backend", ["bogus", "triton"])
def test_a_backend_variable_that_cannot_run_fails_before_any_work(tmp_path, tiny_set, capsys, monkeypatch, backend):
    # DPM_OPS_BACKEND is read by every op call: a name it cannot run on the run's device was a traceback (or a
    # message that did not name the variable) at the first op, after the data was read and the model built.
    import dpm_ops.engine.builders as builders

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm", train={"device": "cpu"}))
    checkpoint = _fresh_checkpoint(tmp_path, config)

    def no_work(*args, **kwargs):
        raise AssertionError("the data was read before DPM_OPS_BACKEND was checked")

    monkeypatch.setattr(builders, "load_splits", no_work)
    monkeypatch.setenv("DPM_OPS_BACKEND", backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton then cannot run on the CPU
    why = "backend must be one of" if backend == "bogus" else "backend 'triton'"
    for command in (
        ["train", "--output", str(tmp_path / "run")],
        ["eval", "--weights", str(checkpoint), "--output", str(tmp_path / "run")],
        ["extract", "--weights", str(checkpoint), "--images", str(tiny_set), "--out", str(tmp_path / "f.npz")],
        ["export", "--weights", str(checkpoint), "--out", str(tmp_path / "m.onnx")],  # was a traceback
    ):
        code = main([*command, "--config", str(config)])
        assert_one_line_error(capsys, code, f"environment variable DPM_OPS_BACKEND={backend!r}: ", why)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "f.npz").exists()
    assert not (tmp_path / "m.onnx").exists()


def test_unusable_output_is_one_line(tmp_path, tiny_set, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    checkpoint = _fresh_checkpoint(tmp_path, config)
    for output, needle in ((a_file, "exists and is not a folder"), (a_file / "run", "cannot create the folder")):
        code = main(["train", "--config", str(config), "--output", str(output)])
        assert_one_line_error(capsys, code, f"--output {output}: {needle}")
        code = main(["eval", "--config", str(config), "--weights", str(checkpoint), "--output", str(output)])
        assert_one_line_error(capsys, code, f"--output {output}: {needle}")


def test_a_non_zero_rank_says_what_it_finds(tmp_path, capsys, monkeypatch):
    """Under torchrun (RANK set) every rank that finds a mistake prints it: a config mistake, every rank's alike,
    was rank 0's alone to print, and a silent rank 1 that exited first had torchrun stop rank 0 before it said
    anything. A dataset error may be one rank's shard's alone. Both exit 2."""
    monkeypatch.setenv("RANK", "1")
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "absent", "dpm", dataset={"generate": False}))
    code = main(["train", "--config", str(config), "--output", str(tmp_path / "run"), "solver.base_lr=-1"])
    assert_one_line_error(capsys, code, "solver.base_lr: expected a value > 0")
    code = main(["train", "--config", str(config), "--output", str(tmp_path / "run")])
    assert_one_line_error(capsys, code, "dataset root not found")


def _fresh_checkpoint(tmp_path, config_path, edit=None, name="final.pt"):
    """An untrained checkpoint of the config's model on its data (what `train` would write)."""
    import torch

    from dpm_ops.engine import load_config
    from dpm_ops.engine.checkpoint import make_checkpoint
    from dpm_ops.engine.builders import build_model_from_args, model_arguments
    from dpm_ops.engine.splits import load_splits

    config = load_config(str(config_path))
    args = model_arguments(config, load_splits(config))
    state = make_checkpoint(
        config["model"]["name"], args, config, build_model_from_args(config["model"]["name"], args).state_dict()
    )
    if edit is not None:
        edit(state)
    torch.save(state, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("model", ["dpm", "vit_baseline", "maskreid"])
def test_a_bare_state_dict_is_the_configs_model(tmp_path, tiny_set, model):
    # what export / extract / eval build from torch.save(model.state_dict()): the classes and cameras
    # come from its tensors (MaskReID's classifier is head.classifier)
    import torch

    from dpm_ops.engine import checkpoint_model, load_config

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, model))
    state = torch.load(_fresh_checkpoint(tmp_path, config), weights_only=False)
    torch.save(state["model"], tmp_path / "bare.pth")
    rebuilt = checkpoint_model(load_config(str(config)), tmp_path / "bare.pth")
    assert not rebuilt.training and rebuilt.state_dict().keys() == state["model"].keys()
    for key, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, state["model"][key]), key


@pytest.mark.parametrize("model", ["dpm", "vit_baseline", "maskreid"])
def test_a_test_time_state_dict_without_its_classifier_is_the_configs_model(tmp_path, tiny_set, model):
    # released weights often leave out the classifier, which eval mode never reads: the model is built with
    # the fewest classes it takes and computes what the full checkpoint's model computes
    import torch

    from dpm_ops.engine import checkpoint_model, load_config

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, model))
    weights = _fresh_checkpoint(tmp_path, config)
    full = torch.load(weights, weights_only=False)["model"]
    stripped = {key: tensor for key, tensor in full.items() if ".classifier." not in f".{key}"}
    assert len(stripped) < len(full) or model == "maskreid"  # MaskReID trains its softmax head only in pre-training
    torch.save(stripped, tmp_path / "test_time.pth")
    loaded = load_config(str(config))
    rebuilt = checkpoint_model(loaded, tmp_path / "test_time.pth")
    reference = checkpoint_model(loaded, weights)
    for key, tensor in stripped.items():
        assert torch.equal(rebuilt.state_dict()[key], tensor), key
    height, width = loaded["input"]["size"]
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    inputs = (images, images * (images > 0.5)) if model == "maskreid" else (images, torch.tensor([0, 1]))
    with torch.no_grad():
        for got, expected in zip(rebuilt(*inputs), reference(*inputs)):
            assert torch.equal(got, expected)


def test_checkpoint_model_of_a_training_checkpoint(tmp_path, tiny_set):
    # what export / extract run: the checkpoint's model in eval mode, at the config's input.size only
    from dpm_ops.engine import checkpoint_model, load_config
    from dpm_ops.engine.config import ConfigError

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    path = _fresh_checkpoint(tmp_path, config)
    assert not checkpoint_model(load_config(str(config)), path).training
    with pytest.raises(ConfigError, match=r"takes 64x32 images but config key input.size is \[128, 64\]"):
        checkpoint_model(load_config(str(config), ["input.size=[128,64]"]), path)


def _drop_first_tensor(state):
    state["model"].pop(next(iter(state["model"])))


def _reshape_a_tensor(state):
    state["model"]["classifier.weight"] = state["model"]["classifier.weight"][:, :5]


def _set_option(key, value):
    return lambda state: state["model_args"]["options"].update({key: value})


def _set_cameras(count):
    """A model trained on `count` cameras: its model_args and its SIE embedding's rows."""

    def edit(state):
        state["model_args"].update(num_cameras=count)
        state["model"]["backbone.sie_embed"] = state["model"]["backbone.sie_embed"][:count]

    return edit


@pytest.mark.parametrize(
    "edit, overrides, needles",
    [
        (_drop_first_tensor, [], ["does not fit the DPM", "missing: backbone.cls_token"]),
        (_reshape_a_tensor, [], ["shape differs: classifier.weight (10, 5) vs the model's (10, 32)"]),
        (lambda state: state.pop("model_args"), [], ["no model_args"]),
        (_set_option("depth", 3), [], ["missing: backbone.blocks.2."]),
        (_set_cameras(2), [], ["has 2 camera embeddings (SIE", "camera ids up to 2 (3 cameras)"]),
        (None, ["input.size=[128,64]"], ["takes 64x32 images but config key input.size is [128, 64]"]),
    ],
)
def test_eval_checkpoint_that_does_not_fit(tmp_path, tiny_set, capsys, edit, overrides, needles):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    checkpoint = _fresh_checkpoint(tmp_path, config, edit)
    code = main(
        ["eval", "--config", str(config), "--weights", str(checkpoint), "--output", str(tmp_path / "ev"), *overrides]
    )
    assert_one_line_error(capsys, code, str(checkpoint), *needles)


def _diverged(state):
    """The checkpoint of a run that diverged: every weight NaN."""
    for tensor in state["model"].values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))


def test_non_finite_weights_are_named_before_any_image_is_read(tmp_path, tiny_set, capsys):
    # they were found as the first op's non-finite input, after the test set had been read
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    checkpoint = _fresh_checkpoint(tmp_path, config, _diverged)
    code = main(["eval", "--config", str(config), "--weights", str(checkpoint), "--output", str(tmp_path / "ev")])
    assert_one_line_error(capsys, code, "final.pt does not fit the DPM of its model_args (NaN or inf values: backbone.")


def test_pretrained_that_cannot_be_used_is_one_line(tmp_path, tiny_set, capsys):
    import torch

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    fresh = _fresh_checkpoint(tmp_path, config)
    partial = tmp_path / "partial.pth"
    torch.save(
        {k: v for k, v in torch.load(fresh, weights_only=False)["model"].items() if "blocks.1." not in k}, partial
    )
    out = ["--output", str(tmp_path / "run")]
    for path, needle in (
        (text, "is not a PyTorch file"),
        (other, "no tensor fits DPM"),
        (partial, "leaves 12 backbone tensors of DPM at their init"),
    ):
        code = main(["train", "--config", str(config), *out, f"model.pretrained={path}"])
        assert_one_line_error(capsys, code, f"config key model.pretrained: {path}", needle)
    code = main(
        [
            "train",
            "--config",
            str(config),
            *out,
            f"model.pretrained={partial}",
            "model.pretrained_partial=true",
            "train.stop_after_iters=1",
        ]
    )
    assert code == 0 and "layout native, 48 tensors loaded" in capsys.readouterr().out


def test_stale_temporaries_are_removed_on_start_and_resume(tmp_path, tiny_set, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    run = tmp_path / "run"

    def plant():
        stale = [run / "checkpoints" / ".last.pt.k1ll3d.tmp", run / ".metrics.json.k1ll3d.tmp"]
        for path in stale:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half a file")
        return stale

    stale = plant()
    args = ["train", "--config", str(config), "--output", str(run)]
    assert main([*args, "train.checkpoint_every_iters=1", "train.stop_after_iters=1"]) == 0
    assert not any(path.exists() for path in stale) and (run / "checkpoints" / "last.pt").is_file()
    stale = plant()
    assert main([*args, "--resume", "train.checkpoint_every_iters=1", "train.stop_after_iters=2"]) == 0
    assert not any(path.exists() for path in stale)
    assert "a temporary left by an interrupted write" in (run / "train.log").read_text()


def test_a_stopped_runs_config_yaml_resumes_it_to_its_end(tmp_path, tiny_set):
    """train.stop_after_iters is a kill, not a setting of the run: config.yaml and last.pt kept it, and
    `--config <run>/config.yaml --resume` stopped at the same step again."""
    import yaml

    from dpm_ops.engine import load_checkpoint

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    run = tmp_path / "run"
    stopped = ["train.checkpoint_every_iters=1", "train.stop_after_iters=1", "solver.epochs=1"]
    assert main(["train", "--config", str(config), "--output", str(run), *stopped]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["stop_after_iters"] is None
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["train"]["stop_after_iters"] is None
    assert main(["train", "--config", str(run / "config.yaml"), "--output", str(run), "--resume"]) == 0
    assert (run / "checkpoints" / "final.pt").is_file() and (run / "metrics.json").is_file()


def test_a_run_folder_is_never_overwritten_by_accident(tmp_path, tiny_set, capsys):
    # Before: a rerun without --resume silently replaced the earlier run's checkpoints and logs.
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    run = tmp_path / "run"
    args = ["train", "--config", str(config), "--output", str(run)]
    assert main([*args, "train.checkpoint_every_iters=1", "train.stop_after_iters=1", "train.checkpoint_period=1"]) == 0
    last = (run / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    code = main([*args, "train.checkpoint_every_iters=1", "train.stop_after_iters=1"])
    assert_one_line_error(capsys, code, f"{run} already holds a run (checkpoints/", "--resume", "--overwrite")
    assert (run / "checkpoints" / "last.pt").read_bytes() == last and (run / "train_log.jsonl").stat().st_size
    # --overwrite that fails on bad input (before any training) keeps them
    code = main([*args, "--overwrite", "model.options.num_heads=0"])
    assert code == 2 and (run / "checkpoints" / "last.pt").read_bytes() == last
    # --overwrite starts over: the earlier run's checkpoints (epoch_001.pt included) are gone
    assert main([*args, "--overwrite", "train.checkpoint_every_iters=1", "train.stop_after_iters=1"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["last.pt"]


def test_one_run_at_a_time_in_a_folder(tmp_path, tiny_set, capsys):
    from dpm_ops.engine.checkpoint import RunFolder

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(  # another process holds the folder, as a live run does
        [
            sys.executable,
            "-c",
            f"import fcntl, sys; f = open({str(run / RunFolder.LOCK)!r}, 'a+'); "
            "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    # A lock that waits (no LOCK_NB) would wait for the holder forever: it goes after 60 s, and the run
    # then trains instead of being refused (a failure, not a hung CI).
    watchdog = threading.Timer(60, holder.kill)
    watchdog.start()
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["train", "--config", str(config), "--output", str(run), "train.stop_after_iters=1"])
        assert_one_line_error(capsys, code, f"{run} is in use by another training run")
    finally:
        watchdog.cancel()
        holder.communicate("")
    assert main(["train", "--config", str(config), "--output", str(run), "train.stop_after_iters=1"]) == 0


def test_a_failed_write_is_one_line(tmp_path, tiny_set, capsys):
    # metrics.json a folder: the write at the end of the run fails (before: an IsADirectoryError traceback)
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    run = tmp_path / "run"
    (run / "metrics.json").mkdir(parents=True)
    code = main(["train", "--config", str(config), "--output", str(run), "solver.epochs=1"])
    assert_one_line_error(capsys, code, "metrics.json")


def test_config_files_that_cannot_be_read_are_one_line(tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe bad")
    code = main(["train", "--config", str(binary)])
    assert_one_line_error(capsys, code, f"config {binary} is not UTF-8 text")
    code = main(["train", "--config", "x" * 5000])
    assert_one_line_error(capsys, code, "config not found: xxx")


def test_default_run_folder_is_named_after_the_config(tmp_path, tiny_set, capsys, monkeypatch):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", str(config), "--resume"])
    assert_one_line_error(capsys, code, "no checkpoint to resume from: ", os.path.join("runs", "tiny", ""))
    (tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt").mkdir(parents=True)  # it said "no checkpoint" too
    code = main(["train", "--config", str(config), "--resume"])
    assert_one_line_error(capsys, code, os.path.join("checkpoints", "last.pt is not a file"))


def test_one_line_is_the_original_error_of_a_worker_traceback():
    from dpm_ops.cli import _one_line

    worker = ValueError(
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "loader.py", line 9, in read\n    raise DatasetError(message)\n'
        "dpm_ops.data.errors.DatasetError: unreadable image: a.jpg (broken data)\n"
    )
    assert _one_line(worker) == "unreadable image: a.jpg (broken data)"
    assert _one_line(ValueError("input.size: must be two integers")) == "input.size: must be two integers"
    assert _one_line(ValueError("")) == "ValueError"


def test_interrupt_and_a_failed_onnx_check_have_their_own_exit_codes(tmp_path, monkeypatch, capsys):
    import dpm_ops.cli as cli
    from dpm_ops.engine import distributed
    from dpm_ops.export import OnnxCheckError

    cleanups = []
    monkeypatch.setattr(distributed, "cleanup", lambda: cleanups.append(1))

    def interrupted(args):
        raise KeyboardInterrupt

    def mismatch(args):
        raise OnnxCheckError("onnxruntime's outputs differ")

    monkeypatch.setattr(cli, "_train", interrupted)
    monkeypatch.setattr(cli, "_export", mismatch)
    # the hint only where there is a checkpoint to resume (not while the synthetic set was being generated)
    assert main(["train", "--config", "synthetic_dpm", "--output", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "dpm-reid: interrupted"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    assert main(["train", "--config", "synthetic_dpm", "--output", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "dpm-reid: interrupted (resume with --resume)"
    # not the user's input: the exported graph computes something else
    assert main(["export", "--config", "c", "--weights", "w", "--out", "m.onnx"]) == 1
    assert capsys.readouterr().err.strip() == "dpm-reid: error: onnxruntime's outputs differ"
    assert len(cleanups) == 3  # the process group is torn down either way


def test_warnings_are_shown_once(monkeypatch):
    # A command's warnings are shown, each once per place it is raised, a DeprecationWarning too (which
    # Python's default filters hide outside __main__, so a dpm_ops deprecation would go unseen).
    import dpm_ops.cli as cli

    def warns(args):
        for _ in range(2):
            warnings.warn("a deprecated option", DeprecationWarning)
            warnings.warn("max_rank exceeds the gallery size", UserWarning)
        return 0

    monkeypatch.setattr(cli, "_train", warns)
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        warnings.simplefilter("ignore", DeprecationWarning)  # Python's default filters (no -W) outside __main__
        assert main(["train", "--config", "synthetic_dpm"]) == 0
    assert [(w.category, str(w.message)) for w in shown] == [
        (DeprecationWarning, "a deprecated option"),
        (UserWarning, "max_rank exceeds the gallery size"),
    ]


def test_warnings_are_one_line():
    # Python's format put the file, line number and source line under the message (two lines each); in a
    # process of its own, since pytest records warnings instead of printing them
    script = (
        "import sys, warnings; import dpm_ops.cli as cli; "
        "cli._train = lambda args: warnings.warn('max_rank exceeds the gallery size') or 0; "
        "code = cli.main(['train', '--config', 'synthetic_dpm']); "
        "assert warnings.formatwarning is not cli._one_line_warning; sys.exit(code)"  # restored
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "dpm-reid: warning: max_rank exceeds the gallery size\n", done


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "the following arguments are required: {train,eval,export,extract,rank,summary,synth,configs}"),
        (["train"], "the following arguments are required: --config"),
        (["eval", "--weights", "w"], "the following arguments are required: --config"),
        (["export", "--weights", "w", "--out", "m.onnx"], "the following arguments are required: --config"),
        (
            ["train", "--config", "c", "--resume", "--overwrite"],
            "argument --overwrite: not allowed with argument --resume",
        ),
        (
            ["train", "--config", "c", "--auto-resume", "--resume"],
            "argument --resume: not allowed with argument --auto-resume",
        ),
        (["eval", "--config", "c"], "the following arguments are required: --weights"),
        (["export", "--config", "c", "--weights", "w"], "the following arguments are required: --out"),
        (["extract", "--config", "c", "--weights", "w", "--out", "f.npz"], "required: --images"),
        (["export", "--config", "c", "--weights", "w", "--out", "m.onnx", "--batch", "x"], "--batch: invalid int"),
        # a mistyped option: the command's help lists its options (was "see dpm-reid --help")
        (["train", "--config", "c", "--bogus"], "unrecognized arguments: --bogus"),
        (["rank", "--query", "q.npz", "--gallery", "g.npz", "--k3", "2"], "unrecognized arguments: --k3 2"),
        # before the files are read (missing here), named as the flag
        (["rank", "--query", "q.npz", "--gallery", "g.npz", "--distance", "foo"], "--distance: invalid choice: 'foo'"),
        (["configs", "--all"], "unrecognized arguments: --all"),
    ],
)
def test_usage_mistakes_are_argparse_errors(capsys, argv, needle):
    # argparse's own checks: one error line (not its usage block, which buried it) pointing at --help, exit
    # code 2, before any config is read
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    command = f"dpm-reid {argv[0]}" if argv else "dpm-reid"
    assert len(err.splitlines()) == 1 and err.startswith("dpm-reid: error: ") and needle in err, err
    assert err.endswith(f" (see {command} --help)\n"), err


def test_configs_lists_each_built_in_config_file(capsys):
    from dpm_ops.engine.config import available_configs

    assert main(["configs"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [name for name, _ in rows] == available_configs() and "synthetic_dpm" in available_configs()
    for name, path in rows:
        assert Path(path).is_file() and Path(path).name == f"{name}.yaml", path


def _record_calls(monkeypatch, module, name, result=None):
    """The keyword arguments of each call of ``module.name``; the call goes through unless a ``result``
    (a function of them) stands in for it."""
    real, calls = getattr(module, name), []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs) if result is None else result(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_export_passes_its_options_and_their_defaults(tmp_path, tiny_set, capsys, monkeypatch):
    # the graph is traced at --batch (default 2) with --opset (default 18), checked unless --no-check
    import dpm_ops.export as export

    def exported(model, path, **kwargs):
        return export.ExportResult(
            Path(path), "dpm", ["images", "camids"], ["feature", "mask"], kwargs["opset"], (64, 32)
        )

    calls = _record_calls(monkeypatch, export, "export_onnx", exported)
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    common = ["export", "--config", str(config), "--weights", str(_fresh_checkpoint(tmp_path, config))]
    assert main([*common, "--out", str(tmp_path / "m.onnx")]) == 0
    assert main([*common, "--out", str(tmp_path / "n.onnx"), "--batch", "5", "--opset", "20", "--no-check"]) == 0
    assert [(c["batch"], c["opset"], c["check"], c["image_size"]) for c in calls] == [
        (2, 18, True, (64, 32)),
        (5, 20, False, (64, 32)),
    ]
    assert f"wrote {tmp_path / 'n.onnx'} (opset 20)" in capsys.readouterr().out


def test_extract_passes_its_options_and_the_configs(tmp_path, tiny_set, monkeypatch):
    # --camera, and the config's eval.batch_size / eval.num_workers / train.progress (overrides included)
    import dpm_ops.feature_files as feature_files

    calls = _record_calls(monkeypatch, feature_files, "extract_folder")
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    common = ["extract", "--config", str(config), "--weights", str(_fresh_checkpoint(tmp_path, config))]
    common += ["--images", str(tiny_set / "query")]
    assert main([*common, "--out", str(tmp_path / "a.npz")]) == 0
    overrides = ["eval.batch_size=5", "eval.num_workers=1", "eval.flip=true"]
    assert main([*common, "--out", str(tmp_path / "b.npz"), "--camera", "0", *overrides]) == 0
    assert [(c["camid"], c["batch_size"], c["num_workers"], c["progress"], c["flip"]) for c in calls] == [
        (None, 64, 0, False, False),
        (0, 5, 1, False, True),
    ]


def test_extract_checks_out_first_and_writes_to_the_expanded_path(tmp_path, tiny_set, capsys, monkeypatch):
    import dpm_ops.feature_files as feature_files

    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    common = ["extract", "--config", str(config), "--weights", str(_fresh_checkpoint(tmp_path, config))]
    common += ["--images", str(tiny_set / "query")]
    # --out ~/...: the file goes under the home folder, as the printed path says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main([*common, "--out", "~/features/query.npz"]) == 0
    written = tmp_path / "home" / "features" / "query.npz"
    assert written.is_file() and not (tmp_path / "~").exists()
    assert capsys.readouterr().out.startswith(f"wrote {written}: ")
    # an --out that cannot be written is refused before the images are read

    def no_work(*args, **kwargs):
        raise AssertionError("the images were read before --out was checked")

    monkeypatch.setattr(feature_files, "extract_folder", no_work)
    (tmp_path / "a_file").write_text("x")
    code = main([*common, "--out", str(tmp_path / "a_file" / "f.npz")])
    assert_one_line_error(capsys, code, "--out", "cannot create its folder")


def test_an_out_that_is_an_input_is_refused(tmp_path, tiny_set, capsys):
    """extract --out w.pt (the checkpoint), export --out tiny.yaml (the config), rank --out q.npz (a feature
    file) each replaced the file the command had just read, with exit code 0; an --out also replaced any
    other file (another run's checkpoint, an input image): it must now end in the command's own suffix."""
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    weights = _fresh_checkpoint(tmp_path, config)
    features = tmp_path / "q.npz"
    common = ["--config", str(config), "--weights", str(weights)]
    assert main(["extract", *common, "--images", str(tiny_set / "query"), "--out", str(features)]) == 0
    capsys.readouterr()
    image = next((tiny_set / "query").glob("*.jpg"))
    weights_npz = tmp_path / "w.npz"  # a checkpoint under the output's suffix
    weights_npz.write_bytes(weights.read_bytes())
    kept = {path: path.read_bytes() for path in (config, weights, features, image, weights_npz)}
    images = ["--images", str(tiny_set / "query")]
    for argv, message in [
        (["extract", *common, *images, "--out", str(weights)], f"--out {weights}: must be a file name ending in .npz"),
        (["extract", *common, *images, "--out", str(image)], f"--out {image}: must be a file name ending in .npz"),
        (
            ["extract", "--config", str(config), "--weights", str(weights_npz), *images, "--out", str(weights_npz)],
            f"--out {weights_npz} is the --weights file this command reads",
        ),
        (
            ["export", *common, "--no-check", "--out", str(config)],
            f"--out {config}: must be a file name ending in .onnx",
        ),
        (
            ["rank", "--query", str(features), "--gallery", str(features), "--out", str(features)],
            f"--out {features}: must be a file name ending in .json",
        ),
    ]:
        code = main(argv)
        assert_one_line_error(capsys, code, message)
    assert {path: path.read_bytes() for path in kept} == kept


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["export", "--out", "m.onnx", "--batch", "1"], "--batch must be an integer in [2, 256], got 1"),
        (["export", "--out", "m.onnx", "--batch", "100000000000"], "--batch must be an integer in [2, 256], got 1000"),
        (["export", "--out", "m.onnx", "--opset", "17"], "--opset must be an integer in 18..23, got 17"),
        (["export", "--out", "m.onnx", "--opset", "24"], "--opset must be an integer in 18..23, got 24"),
        (
            ["extract", "--images", "imgs", "--out", "f.npz", "--camera", "-1"],
            "--camera must be an integer >= 0, got -1",
        ),
    ],
)
def test_export_and_extract_flags_are_checked_first(tmp_path, capsys, monkeypatch, argv, needle):
    # A bad flag is named as the user typed it, before the config or the checkpoint is read (before:
    # export_onnx's "batch must be ...", extract_folder's "camid must be ...", after the checkpoint).
    monkeypatch.chdir(tmp_path)
    code = main([argv[0], "--config", str(tmp_path / "none.yaml"), "--weights", str(tmp_path / "none.pt"), *argv[1:]])
    assert_one_line_error(capsys, code, needle)
    assert os.listdir(tmp_path) == []


def test_a_process_group_failure_is_one_line(monkeypatch, capsys):
    """A rank whose peer ended (rank 0's own error line says why) printed gloo's multi-line traceback."""
    import torch.distributed

    import dpm_ops.cli as cli

    def peer_left(args):
        raise torch.distributed.DistBackendError(
            "[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500\nException raised from ..."
        )

    monkeypatch.setattr(cli, "_train", peer_left)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", "synthetic_dpm"]) == 1
    assert capsys.readouterr().err.strip() == (
        "dpm-reid: error: rank 1: the run's process group failed, another process of the run ended first "
        "([gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500)"
    )
