"""Training / evaluation configs: a typed schema of defaults, YAML files and ``key=value`` overrides.

A config is a nested dict with the sections below. A YAML file gives any subset of the keys (plus an
optional ``base: OTHER`` naming another file or built-in config it extends); everything else keeps
the schema's default. ``key=value`` overrides use dotted keys (``solver.base_lr=0.01``) and YAML
values (``input.size=[128,64]``, ``model.options.depth=4``). Every key is checked when the config
loads, before any data is read: an unknown key, a value of the wrong type, outside its choices or
outside the range declared beside its field (:class:`Bounds`; floats must be finite) raises
:class:`ConfigError`, one line naming the key and what was expected (a value quoted at most ~100
characters long). YAML merge keys (``<<: *base``) work; a key written twice in one mapping or in the
overrides, a document of more than MAX_YAML_VALUES values (aliases counted at each use), YAML 1.1's octal and
base-60 numbers and an override's `` #`` comment are refused (config_yaml.py).
Two sections are free-form mappings checked against their target: ``model.options`` (the keywords of the model
class of ``model.name``: :func:`dpm_ops.models.build_model`) and ``dataset.synth`` (fields of
:class:`dpm_ops.data.synth.SynthConfig`): a file merges into its base's key by key, an override of the whole
mapping replaces it (``model.options={}`` to switch ``model.name``; ``model.options.depth=4`` sets one key).
Built-in configs live in ``dpm_ops/configs/*.yaml``, named without the suffix: :func:`available_configs`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from ..evaluation import PROTOCOLS, RERANK_METHODS
from ..data.samplers import MAX_BATCHES_PER_EPOCH
from ..evaluation.query_expansion import AQE_DEFAULTS, MAX_AQE_K, MAX_AQE_TIMES
from ..evaluation.rank import MAX_REPEATS
from ..models._checks import MAX_IMAGE_SIDE
from ..ops._checks import Bounds
from ..ops.maskreid_ranking_loss_reference import RENAMED_POS_MODES
from .config_checks import ConfigError, check_device_name, check_text, quote, read_float, validate
from .config_yaml import parse_override, read_yaml
from .extraction import MULTI_QUERY
from .scoring import DISTANCES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

POSITIVE = Bounds(0, low_open=True)
NON_NEGATIVE = Bounds(0)
AT_LEAST_1 = Bounds(1)
SHARE = Bounds(0, 1)  # a probability or a fraction
# torch.manual_seed takes 64 bits: a non-negative 63-bit seed plus the process rank stays within them
SEED = Bounds(0, 2**63 - 1)
WORKERS = Bounds(0, 1024)  # data-loading processes: 100,000 passed and would have been forked
FLOAT32_MAX = 3.4028234663852886e38
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


DEFAULT = object()  # Field.before: the key's default


@dataclasses.dataclass(frozen=True)
class Field:
    type: Any  # a type, a tuple of types, or "size" / "mapping" / "camid_pair" / "device" / "names" pseudo types
    default: Any
    choices: Optional[tuple] = None
    nullable: bool = False
    renamed: Optional[dict] = None  # old choice -> its new name, refused with that name
    bounds: Optional[Bounds] = None  # numbers only; floats must also be finite
    # what runs did before the key existed, where that is not its default (a checkpoint's config without it)
    before: Any = DEFAULT


def _f(default, type_=None, choices=None, nullable=False, renamed=None, bounds=None, before=DEFAULT) -> Field:
    return Field(type_ if type_ is not None else type(default), default, choices, nullable, renamed, bounds, before)


# The schema. Defaults are DPM's Occluded-Duke recipe (official configs/OCC_Duke/dpm.yml) where a key concerns DPM.
SCHEMA: dict = {
    "model": {
        "name": _f("dpm", str),  # a name in recipes.RECIPES (checked by validate)
        # keyword arguments of the model class (stride, arcface_margin, embed_dim, depth, ...)
        "options": _f({}, "mapping"),
        # a .pth to start from: timm ViT (jx_vit_base_p16_224), official DPM, torchvision ResNet-50
        "pretrained": _f(None, str, nullable=True),
        # allow a pretrained file that fills only part of the model's backbone (never none of it)
        "pretrained_partial": _f(False, bool),
    },
    "dataset": {
        # a dataset, or a list of datasets trained on as one (fast-reid's DATASETS.NAMES, torchreid's sources)
        "name": _f("synthetic", "names"),
        "root": _f("~/.cache/dpm_ops/synthetic", str),  # the dataset's folder or one holding it (each of them)
        # train on the query and gallery identities too (torchreid's / fast-reid's combineall)
        "combineall": _f(False, bool),
        # evaluate on another dataset's query/gallery (DPM: train Market-1501, test Occluded-REID), or on each of a
        # list (fast-reid's DATASETS.TESTS, torchreid's targets)
        "test_name": _f(None, "names", nullable=True),
        "test_root": _f(None, str, nullable=True),  # None: same as root
        # [query camid, gallery camid] of a test set with one camera per split (occluded_reid,
        # partial_reid); None: the loader's (0, 1). DPM's Occluded-REID convention is [0, 2].
        "test_camids": _f(None, "camid_pair", nullable=True),
        # which split of a test set that has several to test on (torchreid's viper, grid, ilids, prid, cuhk01, cuhk03
        # classic; a set trained on and tested trains on it too)
        "split_id": _f(None, int, nullable=True, bounds=NON_NEGATIVE),  # None: the loader's, 0
        # the share of a DGD-format set's trainval kept apart as DGD keeps it for Caffe's validation (not trained on);
        # None: DGD's 0.2, 0: train on all of trainval
        "val_ratio": _f(None, float, nullable=True, bounds=Bounds(0, 1, high_open=True), before=0.0),
        "with_masks": _f(None, bool, nullable=True),  # None: masks iff the model is MaskReID
        "mask_root": _f(None, str, nullable=True),
        "check_counts": _f("warn", str, ("warn", "error", "off")),
        "generate": _f(True, bool),  # synthetic set only: generate it (SynthConfig from `synth`) if absent
        "synth": _f({}, "mapping"),  # SynthConfig fields for the generated set
    },
    "input": {
        "recipe": _f("dpm", str, ("dpm", "maskreid")),
        "size": _f([256, 128], "size"),  # (height, width) the model sees
        # resize, padding, erasing, color_jitter: the recipe's (Recipe.train_input_defaults; None: its default)
        "resize": _f(None, "size", nullable=True),
        "padding": _f(None, int, nullable=True, bounds=Bounds(0, MAX_IMAGE_SIDE)),
        "flip": _f(0.5, float, bounds=SHARE),
        "erasing": _f(None, float, nullable=True, bounds=SHARE),
        "color_jitter": _f(None, bool, nullable=True),
    },
    "sampler": {
        "kind": _f("pk", str, ("pk", "maskreid")),
        # a batch's parts: far past these a batch no longer fits in memory (K = 10^6 made 2,000,000-image batches)
        "num_ids": _f(16, int, bounds=Bounds(1, 4096)),  # P x K: identities per (global) batch
        "num_instances": _f(4, int, bounds=Bounds(1, 4096)),  # 1: ID losses only (no positive pair)
        # P x K batches with num_ids / n identities of each of the n datasets of dataset.name (a list)
        "balance_sources": _f(False, bool),
        "num_positives": _f(10, int, bounds=Bounds(2, 4096)),  # MaskReID: 1 id x 10 + 54 singles
        "num_negatives": _f(54, int, bounds=Bounds(1, 4096)),
        "batches_per_epoch": _f(None, int, nullable=True, bounds=Bounds(1, MAX_BATCHES_PER_EPOCH)),
    },
    "dataloader": {
        "num_workers": _f(0, int, bounds=WORKERS),
        "pin_memory": _f(False, bool),
    },
    "loss": {
        # DPM: L = id_w·(plain_w·CE + masked_w·CE_arcface + hem_w·L_HEM) + tri_w·L_TRI
        "hem_weight": _f(0.1, float, bounds=NON_NEGATIVE),
        "id_weight": _f(1.0, float, bounds=NON_NEGATIVE),
        "triplet_weight": _f(1.0, float, bounds=NON_NEGATIVE),
        "plain_weight": _f(0.5, float, bounds=NON_NEGATIVE),
        "masked_weight": _f(0.5, float, bounds=NON_NEGATIVE),
        # MaskReID's stage after the pre-training: its ranking loss, or Table 2's MaskReID_trip (batch-hard triplet)
        "maskreid_loss": _f("ranking", str, ("ranking", "triplet")),
        # MaskReID ranking loss: Eq. 5 (pos_mode hardest | all_eq5), or Eq. 4 (eq4: no alpha, lambda, neg_mode)
        "ranking_alpha": _f(0.15, float, bounds=NON_NEGATIVE),
        "ranking_lambda": _f(2.0, float, bounds=NON_NEGATIVE),  # 0: Table 4's ablation without the pull
        "ranking_neg_mode": _f("literal", str, ("literal", "violating_only")),
        "ranking_pos_mode": _f("hardest", str, ("hardest", "all_eq5", "eq4"), renamed=RENAMED_POS_MODES),
    },
    "solver": {
        # the papers use SGD; AdamW is an option for small ViTs trained from scratch
        "optimizer": _f("sgd", str, ("sgd", "adamw")),
        "base_lr": _f(0.008, float, bounds=POSITIVE),
        "bias_lr_factor": _f(2.0, float, bounds=POSITIVE),
        "momentum": _f(0.9, float, bounds=Bounds(0, 1, high_open=True)),
        "weight_decay": _f(1e-4, float, bounds=NON_NEGATIVE),
        "weight_decay_bias": _f(None, float, nullable=True, bounds=NON_NEGATIVE),  # None: same as weight_decay
        # 0: MaskReID's softmax pre-training alone (its Table 1 runs and MaskReID_soft), no ranking stage
        "epochs": _f(150, int, bounds=NON_NEGATIVE),
        "schedule": _f("warmup_cosine", str, ("warmup_cosine", "poly", "constant")),
        "warmup_epochs": _f(5, int, bounds=NON_NEGATIVE),
        # warmup starts at warmup_factor · base_lr
        "warmup_factor": _f(0.01, float, bounds=Bounds(0, 1, low_open=True)),
        "min_lr_factor": _f(0.002, float, bounds=SHARE),  # cosine floor: min_lr_factor · base_lr (all groups)
        "poly_power": _f(0.5, float, bounds=POSITIVE),
        "mask_lr": _f(None, float, nullable=True, bounds=POSITIVE),  # DPM mask generator, constant; None: base_lr
        "two_pass": _f(True, bool),  # DPM: separate second pass for the mask generator
        # auto: bf16 on CUDA, off on CPU; the official DPM / TransReID code trains under fp16
        "amp": _f("auto", str, ("auto", "off", "bf16", "fp16")),
    },
    "pretrain": {
        # MaskReID stage 1: softmax pre-training on the train set before the ranking stage
        "epochs": _f(0, int, bounds=NON_NEGATIVE),
        "base_lr": _f(0.1, float, bounds=POSITIVE),
        "schedule": _f("poly", str, ("warmup_cosine", "poly", "constant")),
        "sampler": _f("pk", str, ("pk", "maskreid")),
    },
    "train": {
        "seed": _f(1234, int, bounds=SEED),
        "device": _f("auto", "device"),  # auto | cpu | cuda | cuda:N
        "log_period": _f(10, int, bounds=AT_LEAST_1),  # iterations between log lines / JSONL records
        "checkpoint_every_iters": _f(0, int, bounds=NON_NEGATIVE),  # mid-epoch checkpoints (0: epoch ends only)
        "checkpoint_period": _f(0, int, bounds=NON_NEGATIVE),  # epoch_NNN.pt every N epochs (0: none)
        "eval_period": _f(0, int, bounds=NON_NEGATIVE),  # evaluate every N epochs (0: only after training)
        # testing hook: stop like a kill after N iterations
        "stop_after_iters": _f(None, int, nullable=True, bounds=AT_LEAST_1),
        "progress": _f(True, bool),
        # true: torch.use_deterministic_algorithms; false: cuDNN deterministic + benchmark, as the official DPM script
        "deterministic": _f(False, bool),
        # torch.compile (inductor) of the model the train steps call, with this mode; off: eager
        "compile": _f("off", str, ("off", "default", "max-autotune-no-cudagraphs")),
        # torchrun: BatchNorm layers as SyncBatchNorm, the whole batch's statistics rather than each rank's share's
        # (fast-reid's MODEL.BACKBONE.NORM "syncBN"); CUDA only (torch's); a single process has the whole batch
        "sync_bn": _f(False, bool),
    },
    "eval": {
        "batch_size": _f(256, int, bounds=Bounds(1, 65536)),  # images per test batch
        "num_workers": _f(0, int, bounds=WORKERS),
        "distance": _f("auto", str, DISTANCES),
        "aqe": _f(False, bool),  # alpha query expansion of the features first (fast-reid's TEST.AQE, its defaults)
        "aqe_k": _f(AQE_DEFAULTS["k"], int, bounds=Bounds(1, MAX_AQE_K)),  # the GPU k-NN kernels' most
        "aqe_alpha": _f(AQE_DEFAULTS["alpha"], float, bounds=NON_NEGATIVE),  # similarity ** alpha: a weight
        "aqe_times": _f(AQE_DEFAULTS["times"], int, bounds=Bounds(1, MAX_AQE_TIMES)),  # rounds, each a k-NN
        "rerank": _f(False, bool),
        # kreciprocal: Zhong et al. (CVPR 2017); gnn: Zhang et al.'s GNN re-ranking (cosine of the features)
        "rerank_method": _f("kreciprocal", str, RERANK_METHODS),
        "k1": _f(None, int, nullable=True, bounds=AT_LEAST_1),  # None: the method's (kreciprocal 20 / 6, gnn 26 / 7)
        "k2": _f(None, int, nullable=True, bounds=AT_LEAST_1),
        "lambda_value": _f(0.3, float, bounds=SHARE),
        "max_rank": _f(50, int, bounds=Bounds(10)),  # Rank-10 is reported
        "pictures": _f(True, bool),
        "flip": _f(False, bool),  # flip test-time augmentation: outputs averaged with the mirror's (fast-reid's)
        # feature extraction precision, whatever the training's: off = fp32 (the official test)
        "amp": _f("off", str, ("off", "auto", "bf16", "fp16")),
        # market1501: standard CMC; cuhk03: single-gallery-shot CMC over cuhk03_repeats seeded draws
        "protocol": _f("market1501", str, PROTOCOLS),
        "cuhk03_repeats": _f(10, int, bounds=Bounds(1, MAX_REPEATS)),  # each draw is a full evaluation
        "cuhk03_seed": _f(0, int, bounds=SEED),
        "multi_query": _f("off", str, MULTI_QUERY),  # Market-1501's: pool the query id's gt_bbox boxes, its camera
        "roc": _f(False, bool),  # also fast-reid's TPR at FPR 1e-4 / 1e-3 / 1e-2 (its TEST.ROC.ENABLED)
    },
}

TOP_LEVEL_EXTRA = ("base", "name", "description")


def defaults() -> dict:
    def build(node):
        return {k: build(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in node.items()}

    return build(SCHEMA)


def available_configs() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a built-in config (with or without ``.yaml``)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    try:
        if path.is_file():
            return path
    except OSError as error:  # e.g. a name too long for the file system
        raise ConfigError(f"config not found: {name_or_path}: {error.strerror or error}") from error
    builtin = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml")
    if path.parent == Path(".") and builtin.is_file():
        return builtin
    raise ConfigError(
        f"config not found: {name_or_path} (a YAML file, or a built-in: {', '.join(available_configs())})"
    )


def _check_value(key: str, field: Field, value: Any) -> Any:
    kind = field.type
    if value is None:
        if field.nullable:
            return None
        # dataset.root=~ meant the home folder (paths are expanded: ~/ is one)
        home = "; a path's home folder is written ~/" if kind is str and not field.choices else ""
        raise ConfigError(
            f"config key {key}: null (YAML's reading of a bare ~ or null, or of no value) is not allowed{home}"
        )
    if kind == "mapping":
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping, got {quote(value)}")
        return dict(value)
    if kind == "camid_pair":
        from dpm_ops.data.datasets import check_split_camids

        try:
            return list(check_split_camids(value))
        except ValueError as error:
            raise ConfigError(f"config key {key}: {error}") from error
    if kind == "size":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_IMAGE_SIDE for v in value)
        ):
            raise ConfigError(
                f"config key {key}: expected [height, width] of ints in [1, {MAX_IMAGE_SIDE}], got {quote(value)}"
            )
        return [int(v) for v in value]
    if kind == "device":
        return check_device_name(f"config key {key}", value)
    if kind == "names":
        return _checked_names(key, value)
    if kind is str and isinstance(value, bool) and field.choices:
        if ("on" if value else "off") not in field.choices:
            raise ConfigError(
                f"config key {key}: {quote(value)} (YAML's reading of a bare on / off / yes / no / true / false) "
                f"is not one of {', '.join(map(str, field.choices))}"
            )
        value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as a boolean
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > FLOAT32_MAX:  # also past float64's range: float() would raise OverflowError
            raise ConfigError(
                f"config key {key}: expected a number of magnitude <= {FLOAT32_MAX:.4g}, got {quote(value)}"
            )
        value = float(value)
    if kind is float:
        value = read_float(value)  # YAML 1.1 reads "1e-4" as a string
    if (kind in (int, float) and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"config key {key}: expected {kind.__name__}, got {quote(value)}")
    unbounded_above = field.bounds is None or field.bounds.high is None
    if kind is int and unbounded_above and not INT64_MIN <= value <= INT64_MAX:  # what kernels and torch sizes take
        raise ConfigError(f"config key {key}: expected a value that fits in 64 bits, got {quote(value)}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"config key {key}: expected a finite number, got {quote(value)}")
    if kind is float and abs(value) > FLOAT32_MAX:  # the training maths is float32 (lr 1e308 crashed the optimizer)
        raise ConfigError(f"config key {key}: expected a number of magnitude <= {FLOAT32_MAX:.4g}, got {quote(value)}")
    if kind is str:
        check_text(key, value)
    if field.bounds is not None and value not in field.bounds:
        raise ConfigError(f"config key {key}: expected a value {field.bounds.describe()}, got {quote(value)}")
    if field.renamed and value in field.renamed:
        raise ConfigError(
            f"config key {key}: {quote(value)} was renamed {field.renamed[value]!r} "
            f"(choices: {', '.join(map(str, field.choices))})"
        )
    if field.choices is not None and value not in field.choices:
        raise ConfigError(f"config key {key}: {quote(value)} is not one of {', '.join(map(str, field.choices))}")
    return value


MAX_SOURCES = 16  # datasets trained on as one


def _checked_names(key: str, value: Any) -> Any:
    """A dataset name, or a list of 1..MAX_SOURCES of them (a list of one is its name; config_checks refuses a name
    listed twice)."""
    if isinstance(value, (list, tuple)):
        if not 1 <= len(value) <= MAX_SOURCES:
            raise ConfigError(
                f"config key {key}: expected a dataset name or a list of 1 to {MAX_SOURCES}, got {quote(value)}"
            )
        names = [_check_value(key, Field(str, None), name) for name in value]
        return names[0] if len(names) == 1 else names
    return _check_value(key, Field(str, None), value)


def saved_choice(saved: dict, section: str, key: str) -> Any:
    """The value of section.key that a saved (checkpoint) config ran with, under its current name; for a key newer
    than the config, what runs did before it existed (its ``before``, else its default)."""
    if key in saved.get(section, {}):
        return current_choice(section, key, saved[section][key])
    field = SCHEMA[section][key]
    return copy.deepcopy(field.default if field.before is DEFAULT else field.before)


def current_choice(section: str, key: str, value: Any) -> Any:
    """``value`` of config key section.key under its current name: a saved (checkpoint) config may
    hold a choice renamed since, e.g. loss.ranking_pos_mode 'all', now 'all_eq5'."""
    field = SCHEMA.get(section, {}).get(key)
    return field.renamed.get(value, value) if isinstance(field, Field) and field.renamed else value


def _merge(config: dict, data: dict, schema: dict, prefix: str, origin: str) -> None:
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {quote(full)} in {origin}")
        node = schema[key]
        if isinstance(node, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full}: expected a section (mapping), got {quote(value)}")
            _merge(config[key], value, node, full + ".", origin)
        elif node.type == "mapping" and isinstance(value, dict) and isinstance(config[key], dict):
            config[key] = {**config[key], **value}  # mappings merge key by key over a base config
        else:
            config[key] = _check_value(full, node, value)


def _load_file(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path} extends itself (base chain: {' -> '.join(map(str, seen))})")
    data = read_yaml(path)
    base = data.pop("base", None)
    for key in TOP_LEVEL_EXTRA:
        data.pop(key, None)
    config = _load_file(_base_path(path, str(base)), seen + (path,)) if base is not None else defaults()
    _merge(config, data, SCHEMA, "", str(path))
    return config


def _base_path(path: Path, base: str) -> Path:
    """``base`` relative to the file that names it, else a built-in name."""
    sibling = path.parent / str(base)
    if sibling.is_file():
        return sibling
    return resolve_config_path(str(base))


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    given = {}  # a key given twice took the last value silently
    for text in overrides:
        key, value = parse_override(text)
        if given.setdefault(key, text) is not text:
            raise ConfigError(f"config key {quote(key)} is given twice: {quote(given[key])} and {quote(text)}")
        parts = key.split(".")
        node, schema = config, SCHEMA
        for depth, part in enumerate(parts):
            if isinstance(schema, Field) and schema.type == "mapping":
                # inside a free-form mapping: the rest of the key is one entry of it
                node[".".join(parts[depth:])] = value
                break
            if not isinstance(schema, dict) or part not in schema:
                raise ConfigError(f"unknown config key {quote(key)} (override {quote(text)})")
            schema = schema[part]
            if depth == len(parts) - 1:
                if isinstance(schema, dict):
                    raise ConfigError(f"config key {quote(key)} is a section; set one of its keys")
                node[part] = _check_value(key, schema, value)
            else:
                node = node[part]
    return config


def load_config(name_or_path: Optional[str] = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults, then the file (and its ``base`` chain), then the overrides; validated."""
    overrides = () if overrides is None else overrides
    if isinstance(overrides, str) or not isinstance(overrides, Iterable):
        raise ConfigError(f"overrides must be a list of key=value strings, got {quote(overrides)}")
    if name_or_path is not None and (not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path)):
        raise ConfigError(
            f"config must be a built-in name or a YAML file's path (None: the defaults), got {quote(name_or_path)}"
        )
    config = _load_file(resolve_config_path(name_or_path)) if name_or_path is not None else defaults()
    apply_overrides(config, overrides)
    validate(config)
    return config


def check_config(config) -> dict:
    """``config`` (load_config's, perhaps edited since) checked as load_config checks a file, as a new dict:
    every section there, every key known, each value of its type and range, the rules across keys. The
    engine's entry points take it this way: an edited ``solver.optimizer: lion`` trained with SGD."""
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a dict of sections, as load_config returns, got {type(config).__name__}")
    missing = [section for section in SCHEMA if not isinstance(config.get(section), dict)]
    if missing:
        raise ConfigError(f"config has no {', '.join(missing)} section (a dict): start from load_config")
    checked = defaults()
    _merge(checked, config, SCHEMA, "", "the config given")
    validate(checked)
    return checked


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
