"""Configs: built-ins load and validate, overrides are type-checked, unknown keys are one clear error."""

import pytest

from dpm_ops.engine.config import (
    ConfigError,
    check_config,
    apply_overrides,
    available_configs,
    current_choice,
    defaults,
    load_config,
    parse_override,
    resolve_config_path,
)

PAPER_CONFIGS = [
    "dpm_occluded_duke",
    "dpm_market_occluded_reid",
    "dpm_dukemtmc",
    "dpm_market1501",
    "maskreid_market1501",
    "maskreid_dukemtmc",
    "maskreid_jstl",
    "vit_baseline_occluded_duke",
    "vit_baseline_dukemtmc",
    "vit_baseline_market1501",
    "synthetic_dpm",
    "synthetic_vit_baseline",
]


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
    market = load_config("dpm_market1501")  # configs/Market/dpm.yml with the code's HEM and jitter defaults
    assert market["model"]["options"]["stride"] == 12 and market["model"]["options"]["arcface_margin"] == 0.3
    assert market["loss"]["hem_weight"] == 0.1 and market["input"]["color_jitter"] is False
    assert market["solver"]["epochs"] == 50 and market["dataset"]["test_name"] is None
    for name in ("dpm_occluded_duke", "dpm_market_occluded_reid", "dpm_dukemtmc", "dpm_market1501"):
        assert load_config(name)["eval"]["amp"] == "off"  # fp32 test, whatever the training precision
    for name in (name for name in PAPER_CONFIGS if not name.startswith("synthetic")):
        config = load_config(name)  # the official test loaders decode with DATALOADER.NUM_WORKERS, as training does
        assert config["eval"]["num_workers"] == config["dataloader"]["num_workers"] == 8, name
    duke = load_config("dpm_dukemtmc")
    assert duke["model"]["options"]["stride"] == 12 and duke["model"]["options"]["arcface_margin"] == 0.3
    mr = load_config("maskreid_market1501")
    assert mr["sampler"]["kind"] == "maskreid" and (mr["sampler"]["num_positives"], mr["sampler"]["num_negatives"]) == (
        10,
        54,
    )
    assert mr["loss"]["ranking_alpha"] == 0.15 and mr["loss"]["ranking_lambda"] == 2.0
    assert mr["pretrain"]["epochs"] > 0 and mr["input"]["size"] == [144, 56]
    jstl = load_config("maskreid_jstl")  # stage 1: softmax alone on DGD's JSTL merge, in its order (maskreid.md §5)
    assert jstl["dataset"]["name"] == [f"dgd_{name}" for name in "3dpes cuhk01 cuhk03 ilids prid viper".split()] + [
        "dgd_shinpuhkan"
    ]
    assert jstl["solver"]["epochs"] == 0 and jstl["pretrain"]["epochs"] > 0 and jstl["pretrain"]["base_lr"] == 0.1
    assert jstl["solver"]["weight_decay"] == 5e-4 and jstl["eval"]["protocol"] == "cuhk03"
    assert jstl["eval"]["cuhk03_repeats"] == 100 and jstl["input"] == {**mr["input"]}
    assert jstl["dataset"]["test_name"] == [f"dgd_{name}" for name in "viper prid 3dpes ilids cuhk01 cuhk03".split()]
    # stage 2 from its weights: the Market config without its own pre-training takes them as they are
    second = load_config("maskreid_market1501", ["pretrain.epochs=0", "model.pretrained=runs/maskreid_jstl/final.pt"])
    assert second["model"]["options"] == jstl["model"]["options"]


def test_overrides_are_typed():
    config = load_config(
        "synthetic_dpm",
        [
            "solver.base_lr=1",
            "solver.epochs=3",
            "input.size=[64,32]",
            "model.options.depth=2",
            "eval.rerank=true",
            "dataset.synth.ids=40",
        ],
    )
    assert config["solver"]["base_lr"] == 1.0 and isinstance(config["solver"]["base_lr"], float)
    assert config["solver"]["epochs"] == 3 and config["input"]["size"] == [64, 32]
    assert config["model"]["options"]["depth"] == 2 and config["eval"]["rerank"] is True
    assert config["dataset"]["synth"]["ids"] == 40


@pytest.mark.parametrize(
    "override, needle",
    [
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
        ("solver=5", "config key 'solver' is a section; set one of its keys"),
        ("model.options=5", "config key model.options: expected a mapping, got 5"),
        ("eval.amp=fp8", "eval.amp"),
        ("eval.protocol=cuhk", "eval.protocol"),
        ("eval.cuhk03_repeats=0", "eval.cuhk03_repeats"),
        ("eval.cuhk03_seed=-1", "eval.cuhk03_seed"),
        ("eval.multi_query=mean", "eval.multi_query"),
        ("train.compile=reduce-overhead", "train.compile"),
        ("dataset.test_camids=[0,0]", "dataset.test_camids"),
        ("dataset.test_camids=[0,-2]", "dataset.test_camids"),
        ("dataset.test_camids=2", "dataset.test_camids"),
        ("dataset.test_camids=[0,2]", "dataset.test_name"),
        ("eval.multi_query=avg", "eval.multi_query"),
        ("loss.ranking_pos_mode=eq5", "loss.ranking_pos_mode"),
        ("loss.ranking_pos_mode=all", "'all' was renamed 'all_eq5' (choices: hardest, all_eq5, eq4)"),
    ],
)
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
    path.write_text("solver:\n  base_lr: [1, 2\n  warmup_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*broken\.yaml line 3: expected ',' or ']'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="config not found"):
        resolve_config_path(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("- model\n- solver\n", r"config .*shape\.yaml must be a mapping of sections, got list$"),
        ("model: 3\n", r"^config key model: expected a section \(mapping\), got 3$"),
        # ~ and an empty value are YAML's null too: dataset.root=~ meant the home folder
        (
            "model:\n  name: null\n",
            r"^config key model.name: null \(YAML's reading of a bare ~ or null, or of no value",
        ),
        (
            "dataset:\n  root: ~\n",
            r"^config key dataset.root: null .* is not allowed; a path's home folder is written ~/$",
        ),
        ("solver:\n  epochs:\n", r"^config key solver.epochs: null \(YAML's reading .*\) is not allowed$"),
        ("solver:\n  base_lr: abc\n", r"^config key solver.base_lr: expected float, got 'abc'$"),
    ],
)
def test_a_file_of_the_wrong_shape_is_named(tmp_path, text, message):
    path = tmp_path / "shape.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_an_empty_file_is_the_defaults_with_the_overrides(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert load_config(str(path)) == load_config()  # load_config() is the defaults
    assert load_config(str(path), ["model.name=vit_baseline"])["model"]["name"] == "vit_baseline"


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
    config = load_config(
        None,
        [
            "eval.amp=bf16",
            "eval.protocol=cuhk03",
            "eval.cuhk03_repeats=3",
            "eval.cuhk03_seed=7",
            "solver.amp=off",
            "eval.multi_query=off",
        ],
    )
    assert (config["eval"]["amp"], config["eval"]["protocol"]) == ("bf16", "cuhk03")
    assert (config["eval"]["cuhk03_repeats"], config["eval"]["cuhk03_seed"]) == (3, 7)
    assert config["solver"]["amp"] == "off" and config["eval"]["multi_query"] == "off"  # YAML's bare off
    assert load_config(None)["eval"]["amp"] == "off"
    config = load_config(None, ["dataset.name=market1501", "eval.multi_query=max"])
    assert config["eval"]["multi_query"] == "max"
    config = load_config(
        None, ["dataset.name=market1501", "dataset.test_name=partial_reid", "dataset.test_camids=[1,0]"]
    )
    assert config["dataset"]["test_camids"] == [1, 0]
    with pytest.raises(ConfigError, match="dataset.test_camids: the test set occluded_duke"):
        load_config(None, ["dataset.test_name=occluded_duke", "dataset.test_camids=[0,2]"])
    with pytest.raises(ConfigError, match="eval.multi_query: the test set occluded_reid"):
        load_config(None, ["dataset.name=market1501", "dataset.test_name=occluded_reid", "eval.multi_query=avg"])
    config = load_config(None, ["eval.rerank=true", "eval.rerank_method=gnn"])
    assert (config["eval"]["rerank_method"], config["eval"]["k1"], config["eval"]["k2"]) == ("gnn", None, None)
    with pytest.raises(ConfigError, match="eval.rerank_method"):
        load_config(None, ["eval.rerank_method=jaccard"])
    with pytest.raises(ConfigError, match="eval.k1"):
        load_config(None, ["eval.k1=0"])
    eval_section = load_config(None, [])["eval"]  # alpha query expansion: fast-reid's TEST.AQE defaults
    assert {k: eval_section[k] for k in ("aqe", "aqe_k", "aqe_alpha", "aqe_times")} == dict(
        aqe=False, aqe_k=5, aqe_alpha=3.0, aqe_times=1
    )
    assert eval_section["roc"] is False and eval_section["flip"] is False  # fast-reid's TEST.ROC / TEST.FLIP
    bad = (
        "eval.aqe_k=0",
        "eval.aqe_times=0",
        "eval.aqe_alpha=.nan",
        "eval.aqe_alpha=-1",
        "eval.aqe=maybe",
        "eval.roc=2",
    )
    for override in bad:
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            load_config(None, [override])


def test_the_command_lines_rerank_methods_distances_and_aqe_defaults_are_the_librarys():
    from dpm_ops import cli_rank as cli
    from dpm_ops.engine.scoring import DISTANCES
    from dpm_ops.evaluation import RERANK_METHODS
    from dpm_ops.evaluation.query_expansion import AQE_DEFAULTS

    assert cli.RERANK_METHODS == RERANK_METHODS and cli.AQE_DEFAULTS == AQE_DEFAULTS and cli.DISTANCES == DISTANCES


def test_ranking_modes_are_the_ops():
    from dpm_ops.engine.config import SCHEMA
    from dpm_ops.ops.maskreid_ranking_loss_reference import NEG_MODES, POS_MODES, RENAMED_POS_MODES

    loss = SCHEMA["loss"]
    assert loss["ranking_neg_mode"].choices == NEG_MODES and loss["ranking_pos_mode"].choices == POS_MODES
    assert loss["ranking_pos_mode"].renamed == RENAMED_POS_MODES
    assert load_config("maskreid_market1501", ["loss.ranking_pos_mode=eq4"])["loss"]["ranking_pos_mode"] == "eq4"


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="ranking_neg_mode: read only by the ranking loss's Eq. 5 .*, and it is eq4"):
        load_config("maskreid_market1501", ["loss.ranking_pos_mode=eq4", "loss.ranking_neg_mode=violating_only"])
    with pytest.raises(ConfigError, match="input.recipe"):
        load_config(None, ["model.name=maskreid"])
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        load_config(None, ["pretrain.epochs=3"])
    config = apply_overrides(defaults(), ["train.stop_after_iters=5"])
    assert config["train"]["stop_after_iters"] == 5
    with pytest.raises(ConfigError, match="dataset.with_masks: model maskreid needs foreground masks"):
        load_config("maskreid_market1501", ["dataset.with_masks=false"])


def test_override_values_and_shorthands():
    assert parse_override("dataset.mask_root=") == ("dataset.mask_root", "")  # empty, not null
    assert parse_override("dataset.root=[a,") == ("dataset.root", "[a,")  # not YAML: the text itself
    assert load_config(None, ["input.size=64"])["input"]["size"] == [64, 64]  # one side: a square
    assert load_config(None, ["input.size=[4096,4096]"])["input"]["size"] == [4096, 4096]  # the largest
    with pytest.raises(ConfigError, match="input.size"):
        load_config(None, ["input.size=[4097,128]"])
    # inside a free-form mapping the rest of the key is one entry, never a shorter one
    with pytest.raises(ConfigError, match=r"model\.options\.depth\.x"):
        load_config(None, ["model.options.depth.x=2"])
    with pytest.raises(ConfigError, match=r"model\.options\.depth: expected a value like"):
        load_config(None, ["model.options.depth=2.0"])  # an int option takes no float


def test_an_option_whose_default_is_none_takes_a_value():
    config = load_config("maskreid_market1501", ["model.options.level_norm=bn"])  # default None: off
    assert config["model"]["options"]["level_norm"] == "bn"


def test_a_renamed_choice_in_a_saved_config_reads_as_its_new_name():
    assert current_choice("loss", "ranking_pos_mode", "all") == "all_eq5"
    assert current_choice("loss", "ranking_pos_mode", "hardest") == "hardest"
    assert current_choice("solver", "epochs", 3) == 3


def test_a_builtin_name_is_never_taken_for_a_missing_path(tmp_path):
    assert resolve_config_path("synthetic_dpm").name == "synthetic_dpm.yaml"
    with pytest.raises(ConfigError, match="config not found"):
        resolve_config_path(str(tmp_path / "synthetic_dpm.yaml"))


# Ranges, not just types: every bad value fails at load time, before any training, one line naming
# the key and what was expected.
@pytest.mark.parametrize(
    "override, needle",
    [
        ("eval.distance=bogus", "eval.distance: 'bogus' is not one of auto, euclidean, cosine, masked_arccos"),
        ("eval.k1=0", "eval.k1: expected a value >= 1"),
        ("eval.k2=-1", "eval.k2: expected a value >= 1"),
        ("eval.lambda_value=2.0", "eval.lambda_value: expected a value in [0, 1]"),
        ("eval.max_rank=5", "eval.max_rank: expected a value >= 10"),
        ("eval.batch_size=0", "eval.batch_size: expected a value in [1, 65536]"),
        ("eval.num_workers=-1", "eval.num_workers: expected a value in [0, 1024]"),
        ("solver.base_lr=-1", "solver.base_lr: expected a value > 0, got -1.0"),
        ("solver.base_lr=0", "solver.base_lr: expected a value > 0"),
        ("solver.base_lr=.nan", "solver.base_lr: expected a finite number, got nan"),
        ("solver.base_lr=nan", "solver.base_lr: expected a finite number, got nan"),
        ("solver.base_lr=.inf", "solver.base_lr: expected a finite number, got inf"),
        ("solver.momentum=1.0", "solver.momentum: expected a value in [0, 1)"),
        ("solver.warmup_factor=0", "solver.warmup_factor: expected a value in (0, 1]"),
        ("solver.mask_lr=-0.1", "solver.mask_lr: expected a value > 0"),
        ("solver.epochs=-1", "solver.epochs: expected a value >= 0"),
        ("solver.epochs=0", "solver.epochs: 0 trains nothing; it is for MaskReID's softmax pre-training alone"),
        ("pretrain.base_lr=-1", "pretrain.base_lr: expected a value > 0"),
        ("loss.hem_weight=.nan", "loss.hem_weight: expected a finite number"),
        ("loss.triplet_weight=-1", "loss.triplet_weight: expected a value >= 0"),
        ("input.padding=-5", "input.padding: expected a value in [0, 4096], got -5"),
        ("input.padding=100000", "input.padding: expected a value in [0, 4096], got 100000"),  # was the OOM killer
        ("input.size=[100000,128]", "input.size: expected [height, width] of ints in [1, 4096], got [100000, 128]"),
        ("input.size=[0,128]", "input.size: expected [height, width] of ints in [1, 4096], got [0, 128]"),
        ("input.flip=2.0", "input.flip: expected a value in [0, 1], got 2.0"),
        ("input.erasing=-1.0", "input.erasing: expected a value in [0, 1], got -1.0"),
        ("train.seed=-1", "train.seed: expected a value in [0, 9223372036854775807], got -1"),
        ("train.seed=18446744073709551616", "train.seed: expected a value in [0, 9223372036854775807]"),
        ("train.device=bogus", "train.device: expected auto, cpu, cuda or cuda:N, got 'bogus'"),
        ("train.device=meta", "train.device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
        ("train.device=cuda:x", "train.device: expected auto, cpu, cuda or cuda:N"),
        ("train.device=3", "train.device: expected auto, cpu, cuda or cuda:N, got 3"),
        ("train.log_period=0", "train.log_period: expected a value >= 1"),
        ("train.stop_after_iters=0", "train.stop_after_iters: expected a value >= 1"),
        ("dataloader.num_workers=-1", "dataloader.num_workers: expected a value in [0, 1024], got -1"),
        ("sampler.num_ids=0", "sampler.num_ids: expected a value in [1, 4096]"),
        ("sampler.num_positives=1", "sampler.num_positives: expected a value in [2, 4096]"),
        ("sampler.num_instances=1000000", "sampler.num_instances: expected a value in [1, 4096]"),
        ("sampler.kind=maskreid", "sampler.kind: model dpm trains on P x K batches ('pk')"),
        (
            "model.name=vit_baseline model.options={} eval.distance=masked_arccos",
            "eval.distance: distance='masked_arccos' needs DPM's",
        ),
        ("model.options.drop_path_rate=.nan", "model.options.drop_path_rate: expected a finite number"),
        ("dataset.synth.junk=.nan", "dataset.synth.junk: expected a finite number"),
        ("dataset.synth.junk=-1.0", "dataset.synth.junk: must be a finite non-negative share"),
        ("dataset.synth.seed=-1", "dataset.synth.seed: must be an integer >= 0"),
        ("dataset.synth.query_occlusion=1.5", "dataset.synth.query_occlusion: must be a probability in [0, 1]"),
        ("dataset.synth.train_images=[3,1]", "dataset.synth.train_images: must be integers LOW,HIGH"),
        # past float32 (the training maths): lr 1e308 crashed the optimizer after --overwrite had begun
        ("solver.base_lr=1e308", "solver.base_lr: expected a number of magnitude <= 3.403e+38, got 1e+308"),
        ("solver.base_lr=1" + "0" * 400, "solver.base_lr: expected a number of magnitude <= 3.403e+38, got an integer"),
        ("dataset.root=", "dataset.root: expected a non-empty string, got ''"),  # was the current folder
        ("dataset.test_root=/data/x", "dataset.test_root: set dataset.test_name"),  # was ignored
        ("eval.k1=" + "9" * 25, "eval.k1: expected a value that fits in 64 bits, got 9999999999999999999999999"),
        ("eval.batch_size=100000000000000000000", "eval.batch_size: expected a value in [1, 65536]"),
        ("eval.cuhk03_repeats=1000000", "eval.cuhk03_repeats: expected a value in [1, 10000]"),  # hung
        ("eval.aqe_times=1000000000", "eval.aqe_times: expected a value in [1, 10], got 1000000000"),  # ran for days
        ("eval.aqe_k=257", "eval.aqe_k: expected a value in [1, 256], got 257"),  # the GPU k-NN kernels' most
        ("dataloader.num_workers=100000", "dataloader.num_workers: expected a value in [0, 1024]"),
        (
            "solver.amp=on",
            "solver.amp: True (YAML's reading of a bare on / off / yes / no / true / false) is not one of",
        ),
        ("dataset.root=a\x00b", "dataset.root: a NUL character is not allowed"),
        ("dataset.root=a\udc80b", "dataset.root: not valid Unicode text"),
    ],
)
def test_values_are_range_checked_at_load_time(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config("synthetic_dpm", override.split())
    message = str(info.value)
    assert needle in message and "\n" not in message, message


def test_a_key_written_twice_or_nesting_past_the_stack_is_one_error(tmp_path):
    """YAML keeps the last of two equal keys: a second `solver:` section silently dropped the first."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("base: synthetic_dpm\nsolver: {epochs: 1}\nsolver: {base_lr: 0.5}\n")
    with pytest.raises(ConfigError, match=r"line 3: key 'solver' is written twice in one mapping$"):
        load_config(twice)
    twice.write_text("solver:\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"line 3: key 'epochs' is written twice"):
        load_config(twice)
    deep = tmp_path / "deep.yaml"
    deep.write_text("model:\n  options:\n    mask_tap_blocks: " + "[" * 10000 + "]" * 10000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.yaml: nested too deeply$"):  # was a RecursionError
        load_config(deep)


@pytest.mark.parametrize("given", ["", 0, False, {"model": {"name": "dpm"}}])
def test_a_config_that_is_no_name_or_path_is_refused(given):
    """ "", 0 and False returned the defaults silently; a dict was "config not found"."""
    with pytest.raises(
        ConfigError, match=r"^config must be a built-in name or a YAML file's path \(None: the defaults\)"
    ):
        load_config(given)


def test_maskreid_ranking_lambda_zero_is_the_papers_ablation():
    """Table 4 of MaskReID trains with lambda = 0 (no positive pull): the config takes it, not a negative one."""
    assert load_config("maskreid_market1501", ["loss.ranking_lambda=0"])["loss"]["ranking_lambda"] == 0.0
    with pytest.raises(ConfigError, match=r"loss.ranking_lambda: expected a value >= 0, got -0.5"):
        load_config("maskreid_market1501", ["loss.ranking_lambda=-0.5"])


@pytest.mark.parametrize("override", ["input.resize=[176,72]", "input.resize=[160,64]"])
def test_maskreid_trains_at_its_test_resize(override):
    """MaskReID tests by resizing to input.size + (16, 8) and centre-cropping input.size: a training resize
    other than that is refused at load time (a crop larger than it also failed only at the first batch), and
    it is the default, following input.size."""
    with pytest.raises(ConfigError, match=r"^config key input.resize: model maskreid tests by resizing to input.size"):
        load_config("maskreid_market1501", ["input.size=[256,128]", override])
    assert load_config("maskreid_market1501")["input"]["resize"] == [160, 64]
    assert load_config("maskreid_market1501", ["input.size=[256,128]"])["input"]["resize"] == [272, 136]
    config = load_config("maskreid_market1501", ["input.size=[256,128]", "input.resize=[272,136]"])
    assert config["input"]["resize"] == [272, 136]


def test_the_train_transform_keys_are_the_recipes(tmp_path):
    """input.padding / erasing / color_jitter / resize default to the model's recipe's values (a MaskReID config
    that left erasing out trained with DPM's 0.5), and one its transforms never read is refused (it was
    accepted and ignored)."""
    minimal = tmp_path / "maskreid.yaml"
    minimal.write_text(
        "model: {name: maskreid}\ninput: {recipe: maskreid, size: [144, 56]}\nsampler: {kind: maskreid}\n"
    )
    maskreid = load_config(str(minimal))["input"]
    assert (maskreid["erasing"], maskreid["resize"], maskreid["padding"], maskreid["color_jitter"]) == (
        0.0,
        [160, 64],
        None,
        None,
    )
    dpm = load_config(None)["input"]
    assert (dpm["erasing"], dpm["resize"], dpm["padding"], dpm["color_jitter"]) == (0.5, None, 10, False)
    assert load_config(str(minimal), ["input.erasing=0.25"])["input"]["erasing"] == 0.25
    for key, value in (("padding", "4"), ("color_jitter", "true")):
        with pytest.raises(
            ConfigError,
            match=rf"^config key input.{key}: model maskreid's train transforms do not use it \(they take "
            r"input.resize, input.erasing\); remove it$",
        ):
            load_config(str(minimal), [f"input.{key}={value}"])
    with pytest.raises(ConfigError, match=r"^config key input.resize: model dpm's train transforms do not use it"):
        load_config(None, ["input.resize=[176,72]"])
    # a run folder's config.yaml from before holds the former schema defaults for the unused keys: taken as unset
    assert load_config(None, ["input.resize=[160,64]"])["input"]["resize"] is None
    former = load_config(str(minimal), ["input.padding=10", "input.color_jitter=false"])["input"]
    assert (former["padding"], former["color_jitter"]) == (None, None)
    # the resolved config checks again as it is (a checkpoint's, an edited one)
    assert check_config(load_config(str(minimal)))["input"] == maskreid


def test_every_number_declares_its_range():
    """A constraint beside every numeric field: a new key cannot skip the range check."""
    from dpm_ops.engine.config import SCHEMA

    unbounded = [
        f"{section}.{key}"
        for section, fields in SCHEMA.items()
        for key, field in fields.items()
        if field.type in (int, float) and field.bounds is None
    ]
    assert unbounded == []
    for section, fields in SCHEMA.items():
        for key, field in fields.items():
            if field.bounds is not None and field.default is not None:
                assert field.default in field.bounds, f"{section}.{key}"


def test_yaml_off_is_the_documented_string_in_files(tmp_path):
    path = tmp_path / "off.yaml"
    path.write_text("solver: {amp: off}\ndataset: {check_counts: off}\neval: {amp: off, multi_query: off}\n")
    config = load_config(str(path))
    assert (config["solver"]["amp"], config["dataset"]["check_counts"]) == ("off", "off")
    assert (config["eval"]["amp"], config["eval"]["multi_query"]) == ("off", "off")


def test_cuda_device_without_cuda_is_named(monkeypatch):
    import torch

    from dpm_ops.engine.builders import resolve_device

    assert load_config(None, ["train.device=cuda:1"])["train"]["device"] == "cuda:1"  # checked when the run starts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.device: cuda:1 requested but CUDA is not available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"train.device: cuda:1 requested but this machine has 1 CUDA device"):
        resolve_device("cuda:1")


def test_load_config_api_arguments():
    # Before: TypeError / AttributeError; None means no overrides.
    assert load_config("synthetic_dpm", None) == load_config("synthetic_dpm")
    with pytest.raises(ConfigError, match="overrides must be a list of key=value strings, got 'solver.epochs=2'"):
        load_config("synthetic_dpm", "solver.epochs=2")
    with pytest.raises(ConfigError, match="override 5 is not a key=value string"):
        load_config("synthetic_dpm", [5])


@pytest.mark.parametrize("config", [None, {}])
def test_train_refuses_what_is_not_a_config(config, tmp_path):
    from dpm_ops.engine import train

    with pytest.raises(ConfigError, match="train: config must be a dict from load_config"):  # was TypeError / KeyError
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def nested_aliases(levels: int) -> str:
    """YAML's "billion laughs": a list of ten 1s, then `levels` lists of ten aliases of the one before."""
    lists = ["&a0 [1,1,1,1,1,1,1,1,1,1]"] + [f"&a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(lists)}]"


def test_a_value_nested_through_aliases_is_refused_in_a_short_message_at_once(tmp_path):
    """A 363-byte override of lists aliased eight deep made a 358 MB error line after 18 s (one more level: OOM)."""
    import time

    start = time.perf_counter()
    for override, message in (
        # past MAX_YAML_VALUES values, aliases counted at each use: refused as the YAML is read
        (
            "solver.epochs=" + nested_aliases(8),
            r"^override 'solver.epochs=\[&a0 .*\.\.\..*\]': its value holds more than 100000 values \(",
        ),
        ("solver.epochs=" + nested_aliases(9), r"YAML aliases count at each use\)$"),
        # within it (11,111 ones): the value is quoted cut short
        (
            "solver.epochs=" + nested_aliases(3),
            r"^config key solver.epochs: expected int, got \[\[1, 1, 1, 1, \.\.\.\]",
        ),
        (
            "model.options.mask_tap_blocks=" + nested_aliases(3),
            r"mask_tap_blocks: expected a list like \[1, 3, 9, 11\]",
        ),
        ("dataset.synth.hidden_range=" + nested_aliases(3), r"hidden_range: expected a list like \[0.25, 0.6\]"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            load_config("synthetic_dpm", [override])
        assert len(str(info.value)) < 300, str(info.value)
    aliased = tmp_path / "aliased.yaml"  # a file the same, and merges of merges (which PyYAML copies pair by pair)
    aliased.write_text(f"solver:\n  epochs: {nested_aliases(8)}\n")
    with pytest.raises(ConfigError, match=r"aliased.yaml line 2: more than 100000 values \(YAML aliases count"):
        load_config(aliased)
    merges = "".join(f"  m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}\n" for i in range(1, 9))
    aliased.write_text("description:\n  m0: &m0 {epochs: 1}\n" + merges + "solver: *m8\n")
    with pytest.raises(ConfigError, match=r"more than 100000 values"):
        load_config(aliased)
    assert time.perf_counter() - start < 5


def test_error_messages_quote_values_cut_short():
    from dpm_ops.ops._checks import QUOTE_CHARS, quote

    assert quote("abc") == "'abc'" and quote([1, 2.5, None]) == "[1, 2.5, None]" and quote(2**63) == str(2**63)
    assert quote(10**400) == "an integer of 401 digits" and quote(10**5000) == "an integer of over 600 digits"
    cut = quote(["x" * 10**6, {"k": [[[[1]]]]}] * 10**5)
    assert len(cut) == QUOTE_CHARS and cut.endswith("...")
    with pytest.raises(ConfigError) as info:
        load_config(None, ["dataset.root=" + "x" * 10**6 + "\x00"])
    assert len(str(info.value)) < 200
    with pytest.raises(ConfigError, match=r"^unknown config key 'model.options.xxx+\.\.\.x+' \(valid: "):
        load_config(None, ["model.options." + "x" * 10**6 + "=1"])
    # an integer past Python's 4300 digits is no YAML integer: read as text, refused by type
    with pytest.raises(ConfigError, match=r"^config key solver.epochs: expected int, got '1111.*\.\.\..*1'$"):
        load_config(None, ["solver.epochs=" + "1" * 5000])


def test_e_notation_floats_are_read_in_the_free_form_sections():
    """YAML 1.1 reads 5e-1 (no dot) as a string: the schema's keys took it, model.options and dataset.synth did not."""
    overrides = [
        "model.options.arcface_margin=5e-1",
        "model.options.norm_eps=1e-5",
        "dataset.synth.distractors=1e-1",
        "dataset.synth.hidden_range=[2.5e-1, 6E-1]",
    ]
    config = load_config("synthetic_dpm", overrides)
    options, synth = config["model"]["options"], config["dataset"]["synth"]
    assert (options["arcface_margin"], options["norm_eps"]) == (0.5, 1e-5)
    assert (synth["distractors"], synth["hidden_range"]) == (0.1, [0.25, 0.6])
    for override, message in (
        ("model.options.depth=4e0", r"model.options.depth: expected a value like 12, got '4e0'$"),  # an int option
        ("model.options.arcface_margin=5e-1x", r"arcface_margin: expected a value like 0.5, got '5e-1x'$"),
        ("model.options.arcface_margin=1e999", r"arcface_margin: expected a finite number, got '1e999'$"),
        (
            "dataset.synth.hidden_range=[1e-1, abc]",
            r"hidden_range: expected a list like \[0.25, 0.6\], of at most 64 items, got \['1e-1', 'abc'\]$",
        ),
        (
            "dataset.synth.train_images=[1.5, 3]",
            r"train_images: expected a list like \[6, 12\], of at most 64 items, got",
        ),
        # a model's own message would quote every item
        (
            f"model.options.mask_tap_blocks={list(range(65))}",
            r"mask_tap_blocks: expected a list like \[1, 3, 9, 11\], of",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config("synthetic_dpm", [override])


def test_yaml_merge_keys_work_and_the_mappings_own_key_wins(tmp_path):
    """A merge key failed: the duplicate check constructed keys before PyYAML took the merges out."""
    path = tmp_path / "merge.yaml"
    path.write_text("solver:\n  <<: {epochs: 1}\n  base_lr: 0.1\n")
    assert (load_config(path)["solver"]["epochs"], load_config(path)["solver"]["base_lr"]) == (1, 0.1)
    # a key merged and also written: YAML's rule, the mapping's own one wins; of merged mappings, the first
    path.write_text(
        "description: &base {epochs: 3, base_lr: 0.5}\n"
        "solver:\n  <<: [*base, {base_lr: 0.2, warmup_epochs: 2}]\n  epochs: 2\n"
        "eval:\n  <<: {aqe_k: 4, aqe_times: 1}\n  aqe_times: 2\n  aqe: true\n"
    )
    config = load_config(path)
    assert [config["solver"][key] for key in ("epochs", "base_lr", "warmup_epochs")] == [2, 0.5, 2]
    assert (config["eval"]["aqe_k"], config["eval"]["aqe_times"]) == (4, 2)
    for text, line in (
        ("solver:\n  <<: {epochs: 1}\n  base_lr: 0.1\n  base_lr: 0.2\n", 4),  # still refused beside a merge
        ("solver:\n  <<: {epochs: 1, epochs: 2}\n", 2),  # and in a merged mapping
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"merge.yaml line {line}: key '\w+' is written twice in one mapping$"):
            load_config(path)
    assert load_config(None, ["model.options={<<: {depth: 2}, embed_dim: 64}"])["model"]["options"] == dict(
        depth=2, embed_dim=64
    )


def test_the_aqe_bounds_are_the_evaluations():
    from dpm_ops.engine.config import SCHEMA
    from dpm_ops.evaluation.query_expansion import MAX_AQE_K, MAX_AQE_TIMES

    assert (SCHEMA["eval"]["aqe_k"].bounds.high, SCHEMA["eval"]["aqe_times"].bounds.high) == (MAX_AQE_K, MAX_AQE_TIMES)
    config = load_config(None, ["eval.aqe=true", f"eval.aqe_k={MAX_AQE_K}", f"eval.aqe_times={MAX_AQE_TIMES}"])
    assert (config["eval"]["aqe_k"], config["eval"]["aqe_times"]) == (MAX_AQE_K, MAX_AQE_TIMES)


def test_sampler_keys_of_an_unused_sampler_and_a_triplet_without_negatives_are_refused():
    """sampler.batches_per_epoch (MaskReID's sampler) was accepted and ignored for DPM; sampler.num_ids of one
    identity trained DPM's triplet term as a silent 0 (no anchor had a negative). Under DDP the triplet mines over
    the whole batch: one identity per process is enough."""
    from dpm_ops.engine.builders import build_sampler

    with pytest.raises(ConfigError, match=r"^config key sampler.batches_per_epoch: read only by MaskReID's batches"):
        load_config("synthetic_dpm", ["sampler.batches_per_epoch=3"])
    assert load_config("maskreid_market1501", ["sampler.batches_per_epoch=3"])["sampler"]["batches_per_epoch"] == 3
    pids = [i // 4 for i in range(40)]
    for world_size in (1, 2):
        with pytest.raises(
            ConfigError,
            match=r"^config key sampler.num_ids: 1 identity per batch, and the triplet loss \(loss.triplet_weight "
            r"1.0\) .*: set sampler.num_ids >= 2, or loss.triplet_weight=0$",
        ):
            build_sampler("pk", load_config("synthetic_dpm", ["sampler.num_ids=1"]), pids, 0, world_size)
    assert len(build_sampler("pk", load_config("synthetic_dpm", ["sampler.num_ids=2"]), pids, 1, 2)) > 0
    no_triplet = load_config("synthetic_dpm", ["sampler.num_ids=1", "loss.triplet_weight=0"])
    assert len(build_sampler("pk", no_triplet, pids, 0, 1)) > 0
    maskreid = load_config("maskreid_market1501", ["sampler.num_ids=1"])  # its P x K stage has no triplet term
    assert len(build_sampler("pk", maskreid, pids, 0, 1)) > 0


def test_a_mining_loss_without_positives_is_refused():
    """sampler.num_instances of 1 gave the triplet no positive (each anchor its own, pushing the negatives alone) and
    MaskReID's ranking loss on P x K batches no anchor (a silent 0); ID losses alone take it."""
    from dpm_ops.engine.builders import build_sampler

    pids = [i // 4 for i in range(240)]
    for name, overrides, loss, otherwise in (
        ("synthetic_dpm", [], r"the triplet loss \(loss.triplet_weight 1.0\)", "loss.triplet_weight=0"),
        ("maskreid_market1501", ["sampler.kind=pk"], r"the ranking loss \(sampler.kind pk\)", "sampler.kind=maskreid"),
    ):
        config = load_config(name, [*overrides, "sampler.num_instances=1"])
        with pytest.raises(
            ConfigError,
            match=rf"^config key sampler.num_instances: 1 image per identity, and {loss} takes each anchor's positive "
            rf"from another image of its identity: set sampler.num_instances >= 2, or {otherwise}$",
        ):
            build_sampler("pk", config, pids, 0, 1)
    id_losses_only = load_config("synthetic_dpm", ["sampler.num_instances=1", "loss.triplet_weight=0"])
    assert {len(batch) for batch in build_sampler("pk", id_losses_only, pids, 0, 1)} == {16}


def test_sync_bn_is_a_flag():
    assert (
        load_config(None)["train"]["sync_bn"] is False and load_config(None, ["train.sync_bn=true"])["train"]["sync_bn"]
    )
    with pytest.raises(ConfigError, match=r"^config key train.sync_bn: expected bool, got 'syncBN'$"):
        load_config(None, ["train.sync_bn=syncBN"])


def test_a_ranking_stage_on_pk_batches_of_one_identity_is_refused():
    """MaskReID's ranking loss on P x K batches of one identity had no negative: its ranking term a silent 0 (Eq. 4's
    whole loss). Under DDP it mines over the whole batch, as the triplet: one identity per process is enough."""
    from dpm_ops.engine.builders import build_sampler

    pids = [i // 4 for i in range(240)]
    one_id = load_config("maskreid_market1501", ["sampler.kind=pk", "sampler.num_ids=1"])
    for world_size in (1, 2):
        with pytest.raises(
            ConfigError,
            match=r"^config key sampler.num_ids: 1 identity per batch, and the ranking loss \(sampler.kind pk\) "
            r"takes each anchor's negative from another: set sampler.num_ids >= 2, or sampler.kind=maskreid$",
        ):
            build_sampler("pk", one_id, pids, 0, world_size)
    ranking_on_pk = load_config("maskreid_market1501", ["sampler.kind=pk", "sampler.num_ids=2"])
    assert len(build_sampler("pk", ranking_on_pk, pids, 1, 2)) > 0  # one identity per process


def test_an_override_is_given_once():
    """A key given twice took the last value silently."""
    from dpm_ops.engine import ConfigError, load_config

    one_key = load_config("synthetic_dpm", ["model.options.drop_path_rate=0.0"])["model"]["options"]
    assert one_key == {**load_config("synthetic_dpm")["model"]["options"], "drop_path_rate": 0.0}
    with pytest.raises(ConfigError, match="config key 'solver.epochs' is given twice: 'solver.epochs=5' and"):
        load_config("synthetic_dpm", ["solver.epochs=5", "solver.epochs=7"])


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (
            "synthetic_dpm",
            ["solver.momentum=0.5"],
            "solver.momentum: read only with solver.optimizer sgd, and it is adamw",
        ),
        (
            "dpm_market1501",
            ["solver.poly_power=2"],
            "solver.poly_power: read only by the poly schedule .*, and the schedules here are warmup_cosine",
        ),
        (
            "maskreid_market1501",
            ["solver.warmup_epochs=2"],
            "solver.warmup_epochs: read only by the warmup_cosine schedule .*, and the schedules here are poly",
        ),
        (
            "maskreid_market1501",
            ["pretrain.epochs=0", "pretrain.base_lr=0.5"],
            "pretrain.base_lr: .*pretrain.epochs is 0",
        ),
        (
            "maskreid_market1501",
            ["pretrain.epochs=0", "sampler.num_ids=8"],
            "sampler.num_ids: .*batches here are maskreid",
        ),
        ("dpm_market1501", ["sampler.num_positives=4"], "sampler.num_positives: .*the batches here are pk"),
        (
            "dpm_market1501",
            ["eval.k1=30"],
            r"eval.k1: read only with eval.rerank true, and it is false: .*default, null\)$",
        ),
        ("dpm_market1501", ["eval.aqe_alpha=1"], "eval.aqe_alpha: read only with eval.aqe true"),
        ("dpm_market1501", ["eval.cuhk03_seed=3"], "eval.cuhk03_seed: read only with eval.protocol cuhk03"),
        (
            "dpm_market1501",
            ["loss.ranking_lambda=1"],
            "loss.ranking_lambda: read only by the maskreid, maskreid_resnet50 models",
        ),
        (
            "vit_baseline_market1501",
            ["loss.hem_weight=0.5"],
            "loss.hem_weight: read only by the dpm model, and model.name is",
        ),
        ("maskreid_market1501", ["solver.mask_lr=0.1"], "solver.mask_lr: read only by the dpm model"),
        (
            "dpm_market1501",
            ["model.pretrained=null", "model.pretrained_partial=true"],
            r"model.pretrained_partial: read only with model.pretrained, and it is null: .*its default, false\)$",
        ),
        (
            "dpm_market1501",
            ["dataset.mask_root=/masks"],
            r"dataset.mask_root: read only with masks \(dataset.with_masks",
        ),
        (
            "maskreid_market1501",
            ["loss.ranking_pos_mode=eq4", "loss.ranking_alpha=0.3"],
            r"loss.ranking_alpha: read only by the ranking loss's Eq. 5 \(loss.ranking_pos_mode hardest or all_eq5\), "
            "and it is eq4",
        ),
        (
            "maskreid_market1501",
            ["loss.triplet_weight=0.5"],
            "loss.triplet_weight: read only by the dpm, vit_baseline models",
        ),
    ],
)
def test_a_key_no_choice_of_the_config_reads_is_refused(config, overrides, message):
    """Set away from its default, it was accepted and ignored (the run trained without it)."""
    with pytest.raises(ConfigError, match=rf"^config key {message}"):
        load_config(config, overrides)


def test_keys_read_by_the_configs_choices_are_taken():
    taken = [
        ("synthetic_dpm", ["solver.optimizer=sgd", "solver.momentum=0.5"]),
        ("dpm_market1501", ["solver.schedule=poly", "solver.poly_power=2"]),
        ("maskreid_market1501", ["pretrain.schedule=warmup_cosine", "solver.warmup_epochs=2", "sampler.num_ids=8"]),
        ("dpm_market1501", ["eval.rerank=true", "eval.k1=30", "eval.aqe=true", "eval.aqe_alpha=1"]),
        ("dpm_market1501", ["eval.protocol=cuhk03", "eval.cuhk03_seed=3", "solver.momentum=0.9"]),  # a default: taken
        ("dpm_market1501", ["dataset.with_masks=true", "dataset.mask_root=/masks"]),
        ("synthetic_dpm", ["dataset.name=market1501", "dataset.root=/data"]),  # its dataset.synth stays
    ]
    for config, overrides in taken:
        loaded = load_config(config, overrides)
        for override in overrides:
            key, value = override.split("=")
            section, name = key.split(".")
            assert str(loaded[section][name]).lower() == value.lower() or loaded[section][name] == float(value)


def test_yaml_numbers_that_read_as_another_number_and_override_comments_are_refused(tmp_path):
    """YAML 1.1 read train.seed=0123 as 83 and 1:30 as 90; ' #' cut an override's value (a path) silently."""
    for value, reading in (("0123", "octal"), ("-0_17", "octal"), ("1:30", "base-60"), ("1:30.5", "base-60")):
        with pytest.raises(
            ConfigError, match=rf"^override 'train.seed={value}': {value} is a YAML 1.1 {reading} number"
        ):
            load_config(None, [f"train.seed={value}"])
    path = tmp_path / "octal.yaml"
    path.write_text("train:\n  seed: 0755\n")
    with pytest.raises(ConfigError, match=r"^invalid YAML in .*octal.yaml line 2: 0755 is a YAML 1.1 octal number"):
        load_config(path)
    for override, cut in (("dataset.root=/data/set #2", "'/data/set'"), ("train.seed=5 # five", "5")):
        with pytest.raises(ConfigError, match=rf"' #' starts a YAML comment, which cuts the value to {cut}; quote"):
            load_config(None, [override])
    taken = ["dataset.root=/data/set#2", "dataset.test_root='/data/set #2'", "train.seed=0", "solver.base_lr=0.5 "]
    config = load_config(None, [*taken, "dataset.test_name=occluded_reid", "train.log_period=0x10"])
    assert (config["dataset"]["root"], config["dataset"]["test_root"]) == ("/data/set#2", "/data/set #2")
    assert (config["train"]["seed"], config["solver"]["base_lr"], config["train"]["log_period"]) == (0, 0.5, 16)
