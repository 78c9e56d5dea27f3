"""The config's checks: :class:`ConfigError`, the checks of single values the schema (config.py) uses, the
free-form sections (``model.options`` against the model class of the recipe ``model.name`` names,
``dataset.synth`` against ``SynthConfig``) and the rules across keys, checked by :func:`validate` when a
config loads."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from dpm_ops.models.vit import MAX_DEPTH
from dpm_ops.ops._checks import quote

from .scoring import resolve_distance
from .recipes import RECIPES

# the most items of a free-form list option: the longest, DPM's mask_tap_blocks, names distinct blocks
MAX_LIST_ITEMS = MAX_DEPTH


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line naming the key or file."""


def read_float(value: Any) -> Any:
    """A string YAML 1.1 leaves unread as the float it spells (5e-1, 1e-4: e-notation without a dot); any
    other value as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def check_text(key: str, value: str) -> None:
    """A string key's value: not empty (an empty path is the current folder), no NUL, encodable as UTF-8."""
    if not value.strip():
        raise ConfigError(f"config key {key}: expected a non-empty string, got {quote(value)}")
    if "\x00" in value:
        raise ConfigError(f"config key {key}: a NUL character is not allowed, got {quote(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"config key {key}: not valid Unicode text, got {quote(value)}") from None


DEVICE_TYPES = ("cpu", "cuda")


def check_device_name(argument: str, value: Any) -> str:
    """ "auto" or a torch device string of a type the engine runs on, else a ConfigError naming ``argument``;
    whether CUDA is there is checked when the run starts (:func:`dpm_ops.engine.builders.resolve_device`)."""
    if value == "auto":
        return value
    try:
        parsed = torch.device(value) if isinstance(value, str) else None
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise ConfigError(f"{argument}: expected auto, cpu, cuda or cuda:N, got {quote(value)}")
    return value


def _checked_options(section: str, options: dict, defaults_: dict) -> dict:
    """A free-form section's ``options``, each of the kind of its key's default (:func:`_of_kind`), e-notation
    floats read; their ranges are the target's to check."""
    checked = {}
    for key, value in options.items():
        full = f"{section}.{key}"
        if key not in defaults_:
            raise ConfigError(f"unknown config key {quote(full)} (valid: {', '.join(sorted(defaults_))})")
        try:
            checked[key] = _of_kind(defaults_[key], value)
        except ValueError as error:
            raise ConfigError(f"config key {full}: {error}, got {quote(value)}") from None
    return checked


def _of_kind(default: Any, value: Any) -> Any:
    """``value`` as a value of ``default``'s kind: a float may be written as an integer or in e-notation, a list
    holds at most MAX_LIST_ITEMS items of the kind of the default's first one (no lists in a list of numbers); a
    ValueError saying what was expected otherwise. None (the target's default) goes with any."""
    if default is None or value is None:
        return value
    if isinstance(default, (tuple, list)):
        expected = f"expected a list like {quote(list(default))}, of at most {MAX_LIST_ITEMS} items"
        if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST_ITEMS:
            raise ValueError(expected)
        try:
            items = [_of_kind(default[0], item) for item in value] if default else list(value)
        except ValueError:
            raise ValueError(expected) from None
        return items if isinstance(value, list) else tuple(items)
    if isinstance(default, float):
        value = read_float(value)
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        ok = isinstance(value, type(default))
    else:  # a number: an int for an int, either for a float
        ok = isinstance(value, (int, float) if isinstance(default, float) else int) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"expected a value like {quote(default)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def synth_option_defaults() -> dict:
    from dpm_ops.data.synth import SynthConfig

    return {f.name: getattr(SynthConfig(), f.name) for f in dataclasses.fields(SynthConfig)}


SAMPLER_NAMES = {"pk": "P x K batches ('pk')", "maskreid": "MaskReID's 1 id x P + N singles batches ('maskreid')"}


def validate(config: dict) -> None:
    name = config["model"]["name"]
    if name not in RECIPES:
        raise ConfigError(f"config key model.name: {quote(name)} is not one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    model, dataset = config["model"], config["dataset"]
    model["options"] = _checked_options("model.options", model["options"], recipe.option_defaults())
    dataset["synth"] = _checked_options("dataset.synth", dataset["synth"], synth_option_defaults())
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
    if (
        kind == "maskreid"
        and "loss.maskreid_loss" in recipe.config_keys
        and config["loss"]["maskreid_loss"] != "ranking"
    ):
        raise ConfigError(
            "config key sampler.kind: loss.maskreid_loss triplet mines each anchor's hardest positive and negative in "
            "P x K batches (sampler.kind pk); MaskReID's batches give one identity positives"
        )
    if not config["solver"]["epochs"] and not config["pretrain"]["epochs"]:
        raise ConfigError(
            "config key solver.epochs: 0 trains nothing; it is for MaskReID's softmax pre-training alone "
            "(pretrain.epochs > 0)"
        )
    _resolve_train_input(config, recipe)
    _check_keys_are_read(config, recipe)
    _check_train_resize(config, recipe)
    _check_eval_distance(config)
    _check_synth_options(config)
    _check_sources(config, recipe)
    _check_dataset_options(config)
    if config["pretrain"]["epochs"] and not recipe.has_pretrain_stage:
        raise ConfigError(f"config key pretrain.epochs: softmax pre-training is MaskReID's; model is {name}")


# input keys whose use and default depend on the model's recipe (Recipe.train_input_defaults)
RECIPE_INPUT_KEYS = ("resize", "padding", "erasing", "color_jitter")
# what configs written before those defaults became the recipe's hold for a key their model does not use (a
# run folder's config.yaml): taken as unset, so old runs still evaluate and resume with their own config
FORMER_INPUT_DEFAULTS = {"resize": [160, 64], "padding": 10, "color_jitter": False}


def _resolve_train_input(config: dict, recipe) -> None:
    """The recipe's defaults for its train transforms' keys left None; a key it does not read is refused
    (MaskReID's transforms neither pad nor jitter; DPM's do not resize before the crop)."""
    inp, used = config["input"], recipe.train_input_defaults
    for key in RECIPE_INPUT_KEYS:
        if key in used:
            inp[key] = used[key] if inp[key] is None else inp[key]
        elif inp[key] == FORMER_INPUT_DEFAULTS.get(key, ()):
            inp[key] = None
        elif inp[key] is not None:
            raise ConfigError(
                f"config key input.{key}: model {config['model']['name']}'s train transforms do not use it (they "
                f"take {', '.join(f'input.{k}' for k in used)}); remove it"
            )


def sampler_kinds_used(config: dict) -> list:
    """The samplers the run's stages draw from: sampler.kind, and pretrain.sampler with a pre-training stage."""
    main = {config["sampler"]["kind"]} if config["solver"]["epochs"] > 0 else set()
    return sorted(main | ({config["pretrain"]["sampler"]} if config["pretrain"]["epochs"] > 0 else set()))


def _key_readers(config: dict, recipe) -> list:
    """(keys, when they are read, what this config has instead) for the keys this config does not read, of those
    that only some choices read."""
    rules = _training_and_evaluation_rules(config) + _model_and_data_rules(config, recipe)
    return [(keys, when, instead) for keys, when, used, instead in rules if not used]


def _training_and_evaluation_rules(config: dict) -> list:
    """(keys, when they are read, whether this config reads them, what it has instead): optimizer, schedules,
    pre-training, samplers and the evaluation's switches."""
    pretrain, main = config["pretrain"]["epochs"] > 0, config["solver"]["epochs"] > 0
    optimizer, evaluation = config["solver"]["optimizer"], config["eval"]
    schedules = sorted(
        ({config["solver"]["schedule"]} if main else set()) | ({config["pretrain"]["schedule"]} if pretrain else set())
    )
    samplers = sampler_kinds_used(config)
    in_use = f"the schedules here are {', '.join(schedules)}"
    rules = [
        (("solver.momentum",), "with solver.optimizer sgd", optimizer == "sgd", f"it is {optimizer}"),
        (
            ("solver.warmup_epochs", "solver.warmup_factor", "solver.min_lr_factor"),
            "by the warmup_cosine schedule (solver.schedule, pretrain.schedule)",
            "warmup_cosine" in schedules,
            in_use,
        ),
        (
            ("solver.poly_power",),
            "by the poly schedule (solver.schedule, pretrain.schedule)",
            "poly" in schedules,
            in_use,
        ),
        (
            ("pretrain.base_lr", "pretrain.schedule", "pretrain.sampler"),
            "by MaskReID's softmax pre-training (pretrain.epochs > 0)",
            pretrain,
            "pretrain.epochs is 0",
        ),
        (
            ("sampler.num_ids", "sampler.num_instances"),
            "by P x K batches (sampler.kind pk)",
            "pk" in samplers,
            f"the batches here are {', '.join(samplers)}",
        ),
        (
            ("sampler.balance_sources",),
            "by P x K batches of several datasets (sampler.kind pk, dataset.name a list)",
            "pk" in samplers and len(source_names(config["dataset"])) > 1,
            f"the batches here are {', '.join(samplers)} of {', '.join(source_names(config['dataset']))}",
        ),
        (
            ("sampler.num_positives", "sampler.num_negatives", "sampler.batches_per_epoch"),
            "by MaskReID's batches (sampler.kind maskreid; a P x K epoch is one pass over the identities)",
            "maskreid" in samplers,
            f"the batches here are {', '.join(samplers)}",
        ),
        (("eval.aqe_k", "eval.aqe_alpha", "eval.aqe_times"), "with eval.aqe true", evaluation["aqe"], "it is false"),
        (
            ("eval.rerank_method", "eval.k1", "eval.k2", "eval.lambda_value"),
            "with eval.rerank true",
            evaluation["rerank"],
            "it is false",
        ),
        (
            ("eval.cuhk03_repeats", "eval.cuhk03_seed"),
            "with eval.protocol cuhk03",
            evaluation["protocol"] == "cuhk03",
            f"it is {evaluation['protocol']}",
        ),
    ]
    return rules


def _model_and_data_rules(config: dict, recipe) -> list:
    """_training_and_evaluation_rules' for the model's keys (another model's, Eq. 4's, pretrained_partial) and the
    masks' folder. (dataset.synth / generate are left out: a synthetic config switched to a real set by an
    override keeps them.)"""
    data = config["dataset"]
    masks = data["with_masks"] if data["with_masks"] is not None else recipe.uses_masks
    rules = [
        (
            ("model.pretrained_partial",),
            "with model.pretrained",
            config["model"]["pretrained"] is not None,
            "it is null",
        ),
        (("dataset.mask_root",), "with masks (dataset.with_masks, or a model that reads them)", masks, "none are read"),
        (
            ("dataset.val_ratio",),
            "with a DGD-format set (dgd_*) among dataset.name",
            any(_takes(name, "val_ratio") for name in source_names(data)),
            "none of its datasets keeps a validation part apart",
        ),
    ]
    if "loss.ranking_pos_mode" in recipe.config_keys:  # Eq. 4 has no margin, no pull and no hinge
        pos_mode, main_loss = config["loss"]["ranking_pos_mode"], config["loss"]["maskreid_loss"]
        rules.append(
            (
                ("loss.ranking_alpha", "loss.ranking_lambda", "loss.ranking_neg_mode"),
                "by the ranking loss's Eq. 5 (loss.ranking_pos_mode hardest or all_eq5)",
                pos_mode != "eq4" and main_loss == "ranking",
                f"it is {pos_mode}" if pos_mode == "eq4" else "loss.maskreid_loss is triplet",
            )
        )
        rules.append(
            (
                ("loss.ranking_pos_mode",),
                "by the ranking loss (loss.maskreid_loss ranking)",
                main_loss == "ranking",
                "loss.maskreid_loss is triplet",
            )
        )
    for key in sorted({key for other in RECIPES.values() for key in other.config_keys} - set(recipe.config_keys)):
        owners = [name for name, other in RECIPES.items() if key in other.config_keys]
        rules.append(
            (
                (key,),
                f"by the {', '.join(owners)} model{'s' * (len(owners) > 1)}",
                False,
                f"model.name is {recipe.name}",
            )
        )
    return rules


def unread_keys(config: dict) -> set:
    """The keys ("section.key") a checked ``config`` does not read: another model's, another optimizer's, schedule's,
    sampler's, and the evaluation's options of what it leaves off (they hold their defaults)."""
    return {key for keys, _, _ in _key_readers(config, RECIPES[config["model"]["name"]]) for key in keys}


def _check_keys_are_read(config: dict, recipe) -> None:
    """A key set away from its default that only choices this config does not make read was accepted and
    ignored: solver.momentum under adamw, eval.k1 without eval.rerank, loss.ranking_alpha for DPM."""
    from .config import defaults  # config.py imports this module

    default = defaults()
    for keys, when, instead in _key_readers(config, recipe):
        for key in keys:
            section, name = key.split(".")
            if config[section][name] != default[section][name]:
                value = default[section][name]  # in YAML's words
                shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else quote(value)
                raise ConfigError(
                    f"config key {key}: read only {when}, and {instead}: it would be ignored; remove it "
                    f"(or set its default, {shown})"
                )


def _check_train_resize(config: dict, recipe) -> None:
    """A recipe that tests at a resize of input.size + a margin trains at that resize too (its default):
    another one would train and test the network at different scales."""
    size, resize = config["input"]["size"], config["input"]["resize"]
    expected = recipe.test_resize(size)
    if expected is not None and resize is None:
        config["input"]["resize"] = list(expected)
    elif expected is not None and list(resize) != list(expected):
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


def _listed(value) -> list[str]:
    """A config value of dataset names (one name or a list; None: none) as a list."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def source_names(data: dict) -> list[str]:
    """The datasets a run trains on: config key dataset.name, one name or a list."""
    return _listed(data["name"])


def tested_names(data: dict) -> list[str]:
    """The datasets a run is tested on by name (config key dataset.test_name, one name or a list); [] for the query
    and gallery of the one it trains on."""
    return _listed(data["test_name"])


def _check_distinct(key: str, names: list[str]) -> list[str]:
    """The registry's names of ``names``; a name listed twice (under an alias too) is an error naming ``key``."""
    from dpm_ops.data.datasets import canonical_dataset_name

    canonical = [canonical_dataset_name(name) for name in names]
    for index, name in enumerate(canonical):
        if name in canonical[:index]:
            first = names[canonical.index(name)]
            alias = f" ({quote(names[index])})" if names[index] != first else ""
            raise ConfigError(f"config key {key}: {quote(first)} is listed twice{alias}")
    return canonical


def _check_sources(config: dict, recipe) -> None:
    """Several datasets (dataset.name a list) and combineall train on a set that has no test split of its own:
    they are tested on dataset.test_name (combineall: a set it did not train on)."""
    data = config["dataset"]
    names, tests = source_names(data), tested_names(data)
    tested = _check_distinct("dataset.test_name", tests)
    if len(names) == 1 and not data["combineall"]:
        return
    canonical = _check_distinct("dataset.name", names)
    if len(names) > 1:
        if "synthetic" in canonical:
            raise ConfigError(
                "config key dataset.name: the synthetic set trains alone (its folder is dataset.root itself, "
                f"where the other datasets are looked for), got {names}"
            )
        masks = data["with_masks"] if data["with_masks"] is not None else recipe.uses_masks
        if masks and data["mask_root"] is not None:
            raise ConfigError(
                "config key dataset.mask_root: with several datasets each one's masks sit in its own folder "
                "(the _seg mirrors of its image folders, which a mask_root would hold once for them all)"
            )
    if not tests:
        raise ConfigError(
            "config key dataset.combineall: a run that trains on its datasets' query and gallery is tested on "
            "another set, dataset.test_name; set it"
            if data["combineall"]
            else f"config key dataset.name: a run trained on {len(names)} datasets is tested on the set (or the "
            "list of sets) dataset.test_name names; set it"
        )
    trained = next((test for test, key in zip(tests, tested) if key in canonical), None)
    if data["combineall"] and trained is not None:
        raise ConfigError(
            f"config key dataset.test_name: {quote(trained)} is trained on with dataset.combineall "
            "(its query and gallery identities too): test on a dataset not in dataset.name"
        )


def _takes(name: str, option: str) -> bool:
    """Whether the loader of dataset ``name`` takes ``option`` (an unregistered name: yes, build_dataset reports it
    when the data is loaded)."""
    from dpm_ops.data.datasets import dataset_options
    from dpm_ops.data.errors import DatasetError

    try:
        return option in dataset_options(name)
    except DatasetError:
        return True


def _check_dataset_options(config: dict) -> None:
    """dataset.test_camids and eval.multi_query need a test set whose loader takes them, dataset.split_id a set
    with splits."""
    data = config["dataset"]
    if data["test_root"] is not None and not data["test_name"]:  # it was ignored: the metrics were dataset.root's
        raise ConfigError("config key dataset.test_root: set dataset.test_name (the test set read from that folder)")
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
        for test_name in tested_names(data) or [data["name"]]:  # a list of sources has a test_name
            if not _takes(test_name, option):
                raise ConfigError(f"config key {key}: the test set {test_name} has no such option; it needs {needs}")
    names = tested_names(data) or source_names(data)  # the sets tested: the splits it picks
    if data["split_id"] is not None and not any(_takes(name, "split_id") for name in names):
        raise ConfigError(
            f"config key dataset.split_id: the test set{'s' * (len(names) > 1)} {', '.join(names)} "
            f"{'have' if len(names) > 1 else 'has'} no random splits to pick from "
            "(viper, grid, ilids, prid, cuhk01, cuhk03_classic_labeled / _detected have)"
        )
