"""The config's cross-field rules and its free-form sections (``model.options`` against the model
class of the recipe ``model.name`` names, ``dataset.synth`` against ``SynthConfig``), checked by
:func:`validate` when a config loads."""

from __future__ import annotations

import dataclasses
import math

from .config import ConfigError
from .scoring import resolve_distance
from .recipes import RECIPES


def _check_against_signature(section: str, options: dict, defaults_: dict) -> None:
    for key, value in options.items():
        full = f"{section}.{key}"
        if key not in defaults_:
            raise ConfigError(f"unknown config key {full!r} (valid: {', '.join(sorted(defaults_))})")
        default = defaults_[key]
        if default is None or value is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
                ok = False
        elif isinstance(default, (tuple, list)):
            ok = isinstance(value, (list, tuple))  # lengths are the model's to check
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"config key {full}: expected a value like {default!r}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {full}: expected a finite number, got {value!r}")


def synth_option_defaults() -> dict:
    from dpm_ops.data.synth import SynthConfig

    return {f.name: getattr(SynthConfig(), f.name) for f in dataclasses.fields(SynthConfig)}


SAMPLER_NAMES = {"pk": "P x K batches ('pk')", "maskreid": "MaskReID's 1 id x P + N singles batches ('maskreid')"}


def validate(config: dict) -> None:
    name = config["model"]["name"]
    if name not in RECIPES:
        raise ConfigError(f"config key model.name: {name!r} is not one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    _check_against_signature("model.options", config["model"]["options"], recipe.option_defaults())
    _check_against_signature("dataset.synth", config["dataset"]["synth"], synth_option_defaults())
    if config["input"]["recipe"] != recipe.transform_recipe:
        raise ConfigError(f"config key input.recipe: model {name} needs the '{recipe.transform_recipe}' recipe")
    if config["dataset"]["with_masks"] is False and recipe.uses_masks:
        raise ConfigError(f"config key dataset.with_masks: model {name} needs foreground masks")
    kind = config["sampler"]["kind"]
    if kind not in recipe.sampler_kinds:
        raise ConfigError(
            f"config key sampler.kind: model {name} trains on "
            f"{' or '.join(SAMPLER_NAMES[k] for k in recipe.sampler_kinds)}; not '{kind}'"
        )
    _check_train_resize(config, recipe)
    _check_eval_distance(config)
    _check_synth_options(config)
    _check_dataset_options(config)
    if config["loss"]["ranking_pos_mode"] == "eq4" and config["loss"]["ranking_neg_mode"] != "literal":
        raise ConfigError(
            "config key loss.ranking_neg_mode: does not apply to ranking_pos_mode eq4 (no margin, "
            "no hinge); leave it literal"
        )
    if config["pretrain"]["epochs"] and not recipe.has_pretrain_stage:
        raise ConfigError(f"config key pretrain.epochs: softmax pre-training is MaskReID's; model is {name}")


def _check_train_resize(config: dict, recipe) -> None:
    """A recipe that tests at a resize of input.size + a margin trains at that resize too: another one
    would train and test the network at different scales."""
    size, resize = config["input"]["size"], config["input"]["resize"]
    expected = recipe.test_resize(size)
    if expected is not None and list(resize) != list(expected):
        raise ConfigError(
            f"config key input.resize: model {config['model']['name']} tests by resizing to input.size + "
            f"{list(recipe.test_resize_margin)} = {list(expected)} and centre-cropping input.size {list(size)}, "
            f"so it trains at that resize too; got {list(resize)}"
        )


def _check_eval_distance(config: dict) -> None:
    try:
        resolve_distance(config["eval"]["distance"], config["model"]["name"])
    except ValueError as error:
        raise ConfigError(f"config key eval.distance: {error}") from error


def _check_synth_options(config: dict) -> None:
    """The synthetic set's options are checked by SynthConfig itself, at load time rather than
    when the set is generated."""
    from dpm_ops.data.synth import SynthOptionError, synth_config

    try:
        synth_config(config["dataset"]["synth"])
    except SynthOptionError as error:
        raise ConfigError(f"config key dataset.synth.{error.option}: {error.problem}") from error


def _check_dataset_options(config: dict) -> None:
    """dataset.test_camids and eval.multi_query need a test set whose loader takes them."""
    from dpm_ops.data.datasets import dataset_options
    from dpm_ops.data.errors import DatasetError

    data = config["dataset"]
    if data["test_root"] is not None and not data["test_name"]:  # it was ignored: the metrics were dataset.root's
        raise ConfigError("config key dataset.test_root: set dataset.test_name (the test set read from that folder)")
    test_name = data["test_name"] or data["name"]
    wanted = []
    if data["test_camids"] is not None:
        if not data["test_name"]:
            raise ConfigError("config key dataset.test_camids: set dataset.test_name (the test-only set it applies to)")
        wanted.append(
            ("dataset.test_camids", "camids", "a test set with one camera per split (occluded_reid, partial_reid)")
        )
    if config["eval"]["multi_query"] != "off":
        wanted.append(("eval.multi_query", "multi_query", "market1501's gt_bbox/ pools"))
    for key, option, needs in wanted:
        try:
            options = dataset_options(test_name)
        except DatasetError:
            return  # an unregistered name: build_dataset reports it when the data is loaded
        if option not in options:
            raise ConfigError(f"config key {key}: the test set {test_name} has no such option; it needs {needs}")
