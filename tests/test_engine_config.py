"""Configs: built-ins load and validate, overrides are type-checked, unknown keys are one clear error."""

import pytest

from dpm_ops.engine.config import (ConfigError, apply_overrides, available_configs, defaults, load_config,
                                   resolve_config_path)

PAPER_CONFIGS = ["dpm_occluded_duke", "dpm_market_occluded_reid", "dpm_dukemtmc", "maskreid_market1501",
                 "maskreid_dukemtmc", "vit_baseline_occluded_duke", "vit_baseline_dukemtmc", "synthetic_dpm",
                 "synthetic_vit_baseline"]


def test_builtin_configs_are_shipped_and_valid():
    assert set(PAPER_CONFIGS) <= set(available_configs())
    for name in available_configs():
        config = load_config(name)
        assert config["model"]["name"] in ("dpm", "vit_baseline", "maskreid", "maskreid_resnet50")


def test_paper_values():
    occ = load_config("dpm_occluded_duke")
    assert occ["model"]["options"]["stride"] == 11 and occ["model"]["options"]["arcface_margin"] == 0.5
    assert occ["solver"]["epochs"] == 150 and occ["solver"]["base_lr"] == 0.008
    assert occ["solver"]["bias_lr_factor"] == 2.0 and occ["solver"]["weight_decay"] == 1e-4
    assert occ["loss"]["hem_weight"] == 0.1 and occ["sampler"]["num_ids"] * occ["sampler"]["num_instances"] == 64
    reid = load_config("dpm_market_occluded_reid")
    assert reid["model"]["options"]["stride"] == 12 and reid["model"]["options"]["arcface_margin"] == 0.3
    assert reid["loss"]["hem_weight"] == 0.01 and reid["input"]["color_jitter"] is True
    assert reid["solver"]["epochs"] == 50 and reid["dataset"]["test_name"] == "occluded_reid"
    assert reid["dataset"]["test_camids"] == [0, 2]  # the official Rename.py cameras (datasets.md §6)
    for name in ("dpm_occluded_duke", "dpm_market_occluded_reid", "dpm_dukemtmc"):
        assert load_config(name)["eval"]["amp"] == "off"  # fp32 test, whatever the training precision
    duke = load_config("dpm_dukemtmc")
    assert duke["model"]["options"]["stride"] == 12 and duke["model"]["options"]["arcface_margin"] == 0.3
    mr = load_config("maskreid_market1501")
    assert mr["sampler"]["kind"] == "maskreid" and (mr["sampler"]["num_positives"], mr["sampler"]["num_negatives"]) == (10, 54)
    assert mr["loss"]["ranking_alpha"] == 0.15 and mr["loss"]["ranking_lambda"] == 2.0
    assert mr["pretrain"]["epochs"] > 0 and mr["input"]["size"] == [144, 56]


def test_overrides_are_typed():
    config = load_config("synthetic_dpm", ["solver.base_lr=1", "solver.epochs=3", "input.size=[64,32]",
                                           "model.options.depth=2", "eval.rerank=true", "dataset.synth.ids=40"])
    assert config["solver"]["base_lr"] == 1.0 and isinstance(config["solver"]["base_lr"], float)
    assert config["solver"]["epochs"] == 3 and config["input"]["size"] == [64, 32]
    assert config["model"]["options"]["depth"] == 2 and config["eval"]["rerank"] is True
    assert config["dataset"]["synth"]["ids"] == 40


@pytest.mark.parametrize("override, needle", [
    ("solver.lrr=0.1", "solver.lrr"),
    ("nosection.x=1", "nosection.x"),
    ("solver.epochs=many", "solver.epochs"),
    ("solver.epochs=2.5", "solver.epochs"),
    ("solver.amp=fp8", "solver.amp"),
    ("solver.optimizer=rmsprop", "solver.optimizer"),
    ("input.size=[1]", "input.size"),
    ("model.options.depthh=2", "model.options.depthh"),
    ("model.options.depth=two", "model.options.depth"),
    ("dataset.synth.idz=3", "dataset.synth.idz"),
    ("solver", "key=value"),
    ("eval.amp=fp8", "eval.amp"),
    ("eval.protocol=cuhk", "eval.protocol"),
    ("eval.cuhk03_repeats=0", "eval.cuhk03_repeats"),
    ("eval.cuhk03_seed=-1", "eval.cuhk03_seed"),
    ("eval.multi_query=mean", "eval.multi_query"),
    ("dataset.test_camids=[0,0]", "dataset.test_camids"),
    ("dataset.test_camids=[0,-2]", "dataset.test_camids"),
    ("dataset.test_camids=2", "dataset.test_camids"),
    ("dataset.test_camids=[0,2]", "dataset.test_name"),
    ("eval.multi_query=avg", "eval.multi_query"),
    ("loss.ranking_pos_mode=eq5", "loss.ranking_pos_mode"),
    ("loss.ranking_pos_mode=all", "'all' was renamed 'all_eq5' (choices: hardest, all_eq5, eq4)"),
])
def test_bad_override_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config("synthetic_dpm", [override])
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("solver:\n  base_lr: 0.1\n  warmpu_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'solver.warmpu_epochs' in .*bad.yaml"):
        load_config(str(path))


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("solver: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="config not found"):
        resolve_config_path(str(tmp_path / "nope.yaml"))


def test_base_chain(tmp_path):
    (tmp_path / "child.yaml").write_text("base: synthetic_dpm\nsolver: {epochs: 1}\nmodel: {options: {depth: 2}}\n")
    config = load_config(str(tmp_path / "child.yaml"))
    parent = load_config("synthetic_dpm")
    assert config["solver"]["epochs"] == 1 and config["model"]["options"]["depth"] == 2
    # mappings merge key by key over the base
    assert config["model"]["options"]["embed_dim"] == parent["model"]["options"]["embed_dim"]
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "loop.yaml"))


def test_evaluation_keys():
    config = load_config(None, ["eval.amp=bf16", "eval.protocol=cuhk03", "eval.cuhk03_repeats=3", "eval.cuhk03_seed=7",
                                "solver.amp=off", "eval.multi_query=off"])
    assert (config["eval"]["amp"], config["eval"]["protocol"]) == ("bf16", "cuhk03")
    assert (config["eval"]["cuhk03_repeats"], config["eval"]["cuhk03_seed"]) == (3, 7)
    assert config["solver"]["amp"] == "off" and config["eval"]["multi_query"] == "off"  # YAML's bare off
    assert load_config(None)["eval"]["amp"] == "off"
    config = load_config(None, ["dataset.name=market1501", "eval.multi_query=max"])
    assert config["eval"]["multi_query"] == "max"
    config = load_config(None, ["dataset.name=market1501", "dataset.test_name=partial_reid",
                                "dataset.test_camids=[1,0]"])
    assert config["dataset"]["test_camids"] == [1, 0]
    with pytest.raises(ConfigError, match="dataset.test_camids: the test set occluded_duke"):
        load_config(None, ["dataset.test_name=occluded_duke", "dataset.test_camids=[0,2]"])
    with pytest.raises(ConfigError, match="eval.multi_query: the test set occluded_reid"):
        load_config(None, ["dataset.name=market1501", "dataset.test_name=occluded_reid", "eval.multi_query=avg"])


def test_ranking_modes_are_the_ops():
    from dpm_ops.engine.config import SCHEMA
    from dpm_ops.ops.maskreid_ranking_loss_reference import NEG_MODES, POS_MODES, RENAMED_POS_MODES

    loss = SCHEMA["loss"]
    assert loss["ranking_neg_mode"].choices == NEG_MODES and loss["ranking_pos_mode"].choices == POS_MODES
    assert loss["ranking_pos_mode"].renamed == RENAMED_POS_MODES
    assert load_config(None, ["loss.ranking_pos_mode=eq4"])["loss"]["ranking_pos_mode"] == "eq4"


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="ranking_neg_mode: does not apply to ranking_pos_mode eq4"):
        load_config(None, ["loss.ranking_pos_mode=eq4", "loss.ranking_neg_mode=violating_only"])
    with pytest.raises(ConfigError, match="input.recipe"):
        load_config(None, ["model.name=maskreid"])
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        load_config(None, ["pretrain.epochs=3"])
    config = apply_overrides(defaults(), ["train.stop_after_iters=5"])
    assert config["train"]["stop_after_iters"] == 5
