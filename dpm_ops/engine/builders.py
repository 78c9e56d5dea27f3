"""A run's pieces built from a config (device, model, samplers; its data: :mod:`.splits`), and the config-driven entry
points around them: :func:`evaluate_with_config`, :func:`evaluate_checkpoint` (``dpm-reid eval``) and
:func:`checkpoint_model` (``export`` / ``extract``). Whatever differs between models comes from the
model's recipe (:mod:`.recipes`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from dpm_ops import _backend
from dpm_ops.data import MaskReIDBatchSampler, RandomIdentityBatchSampler, ReIDSplits, SourceBalancedBatchSampler
from dpm_ops.models.weights import WeightsError, trained_state_dict
from dpm_ops.ops._checks import is_integer, quote

from . import distributed
from .checkpoint import (
    first_line,
    CheckpointError,
    check_not_a_run_folder,
    checked_checkpoint,
    is_training_checkpoint,
    load_model_state,
    make_output_folder,
    read_checkpoint_file,
    SET_FOLDER_PREFIX,
    tested_set_folders,
)
from .config import ConfigError, check_config, check_device_name
from .recipes import get_recipe
from .splits import check_split_untrained, load_splits, prepare_synthetic
from .summary import summarize_runs


def resolve_device(name: str, argument: str = "config key train.device") -> torch.device:
    """``name`` ("auto", "cpu", "cuda", "cuda:N") as a device this machine has; a ConfigError naming
    ``argument`` otherwise."""
    check_device_name(argument, name)  # the config checked train.device; a flag such as rank --device comes here
    device = torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{argument}: {name} requested but CUDA is not available here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{argument}: {name} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    try:  # a DPM_OPS_BACKEND that cannot run here: said now, not at the first op after the data is read
        _backend.resolve(None, device)
    except (ValueError, RuntimeError) as error:
        raise ConfigError(str(error)) from None
    return device


def init_run_device(config: dict) -> tuple[torch.device, distributed.DistInfo]:
    """``train.device``, joined to the torchrun group when there is one (each rank on its own GPU)."""
    device = resolve_device(config["train"]["device"])
    info = distributed.init_distributed(device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    return device, info


def check_sync_bn(config: dict, device: torch.device, info: distributed.DistInfo) -> None:
    """train.sync_bn under torchrun needs CUDA: on CPU torch's DDP refuses a model with SyncBatchNorm layers, and
    SyncBatchNorm a train-mode forward in a process group (tracebacks once the data was read). A single process
    has the whole batch: it keeps its BatchNorm layers (distributed.data_parallel)."""
    if config["train"]["sync_bn"] and info.enabled and device.type != "cuda":
        raise ConfigError(
            f"config key train.sync_bn: torch's SyncBatchNorm trains on CUDA devices only, and these "
            f"{info.world_size} processes train on {device.type}: set train.sync_bn=false, or train.device=cuda"
        )


def resolve_amp(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """auto: bf16 autocast on CUDA (no scaler needed), full precision on CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


# ---------------------------------------------------------------------------------------------
# the eval section and the samplers


def _eval_scoring(ev: dict) -> dict:
    """The eval section's AQE and re-ranking, as evaluate_model takes them (aqe / rerank: False when off)."""
    aqe = dict(k=ev["aqe_k"], alpha=ev["aqe_alpha"], times=ev["aqe_times"]) if ev["aqe"] else False
    return dict(aqe=aqe, rerank=ev["rerank_method"] if ev["rerank"] else False)


def _check_eval_section(config: dict, splits: ReIDSplits) -> None:
    """The eval choices that depend on the model or the data (its distance, re-ranking, AQE's k): found by the
    evaluation, after a whole training run, they are a ConfigError naming the section before it starts."""
    from .evaluator import _check_aqe
    from .scoring import check_reranking, resolve_distance

    ev = config["eval"]
    scoring = _eval_scoring(ev)
    try:
        metric = resolve_distance(ev["distance"], config["model"]["name"])
        check_reranking(scoring["rerank"], ev["k1"], ev["k2"], ev["lambda_value"], metric)
        _check_aqe(scoring["aqe"], splits)
    except ValueError as error:
        raise ConfigError(f"config section eval: {error}") from None


def build_sampler(kind: str, config: dict, pids: list, rank: int, world_size: int, source_labels: tuple = ()):
    """The batch sampler of ``kind`` ("pk", "maskreid") for the train labels ``pids`` (``source_labels``: the first
    label of each dataset of a combined set, for sampler.balance_sources)."""
    s, seed = config["sampler"], config["train"]["seed"]
    # the triplet / ranking loss mines over the whole batch, every process's share (distributed.gather_batch)
    mining = get_recipe(config["model"]["name"]).pk_mining_loss(config) if kind == "pk" else None
    if mining and min(s["num_ids"], s["num_instances"]) < 2:
        loss, otherwise = mining
        # without negatives that term trained as a silent 0; without positives the ranking loss too (no anchor),
        # the triplet as a push of the negatives alone (the anchor its own positive)
        key, count, source = (
            ("num_ids", "identity per batch", "negative from another")
            if s["num_ids"] < 2
            else ("num_instances", "image per identity", "positive from another image of its identity")
        )
        raise ConfigError(
            f"config key sampler.{key}: {s[key]} {count}, and {loss} takes each anchor's {source}: "
            f"set sampler.{key} >= 2, or {otherwise}"
        )
    try:
        if kind == "pk" and s["balance_sources"]:
            return SourceBalancedBatchSampler(
                pids, source_labels, s["num_ids"], s["num_instances"], seed=seed, rank=rank, world_size=world_size
            )
        if kind == "pk":
            return RandomIdentityBatchSampler(
                pids, s["num_ids"], s["num_instances"], seed=seed, rank=rank, world_size=world_size
            )
        return MaskReIDBatchSampler(
            pids,
            s["num_positives"],
            s["num_negatives"],
            s["batches_per_epoch"],
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
    except ValueError as error:
        raise ConfigError(f"config section sampler: {error}") from error


# ---------------------------------------------------------------------------------------------
# models


def model_arguments(config: dict, splits: ReIDSplits) -> dict:
    """What the checkpoint stores to rebuild the model: {"num_classes", "num_cameras", "options"}."""
    return get_recipe(config["model"]["name"]).model_arguments(config, splits)


def check_input_size(model_args: dict, config: dict, source: str) -> None:
    """A ViT's position embedding is sized for one patch grid: the config's input.size must be it."""
    size = model_args["options"].get("img_size")
    if size is not None and list(size) != list(config["input"]["size"]):
        raise ConfigError(
            f"{source} takes {size[0]}x{size[1]} images but config key input.size is "
            f"{list(config['input']['size'])}; set input.size={list(size)}"
        )


def check_model_fits_data(model_args: dict, config: dict, splits: ReIDSplits, source: str) -> None:
    """What the test images need from the model, checked before any work: a ViT's input size (its
    position embedding is sized for one patch grid), its SIE camera embedding (one row per
    camera of the training set) and the eval section's choices (_check_eval_section). ``source`` names the
    model's origin in the message."""
    check_input_size(model_args, config, source)
    num_cameras = model_args["num_cameras"]
    for test in (splits, *splits.more_tests):
        _check_eval_section(config, test)
        highest = max((r.camid for r in (*test.query, *test.gallery)), default=-1)
        if num_cameras > 1 and highest >= num_cameras:  # one training camera: no embedding, the camera is not read
            raise ConfigError(
                f"{source} has {num_cameras} camera embeddings (SIE, one per training camera) but the "
                f"test set {test.name} has camera ids up to {highest} ({highest + 1} cameras); evaluate "
                f"on a set with at most {num_cameras} cameras, or map a one-camera-per-split set with "
                "dataset.test_camids"
            )


def eval_model_arguments(name: str, checkpoint_args: dict, config: dict) -> dict:
    """The checkpoint's model arguments with the config's eval-time options (e.g. DPM's
    ``neck_feat``: what eval mode returns, not the weights)."""
    chosen = {
        key: config["model"]["options"][key]
        for key in get_recipe(name).eval_time_options
        if key in config["model"]["options"]
    }
    return {**checkpoint_args, "options": {**checkpoint_args["options"], **chosen}}


def build_model_from_args(name: str, args: dict, source: str = "config key model.options") -> nn.Module:
    """The model of ``args`` ({"num_classes", "num_cameras", "options"}). The model checks its options
    before allocating anything; a bad one (TypeError, ValueError naming it and its range) becomes
    one ConfigError line naming ``source``: where the options came from, e.g. a checkpoint's
    model_args."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in args["options"].items()}
    try:
        return get_recipe(name).build(args["num_classes"], args["num_cameras"], **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {error}") from error
    except RuntimeError as error:  # options in range whose product does not fit (depth 10^12): the allocator's
        if "allocate" not in str(error):
            raise
        raise ConfigError(
            f"{source}: model {name} of these options does not fit in memory ({first_line(error)})"
        ) from None


def check_model_options(config: dict) -> None:
    """The config's model options, checked before any data is generated or read: the model is built
    on the meta device (no memory, no initialisation work) for one identity and no cameras, so a bad
    option is build_model_from_args' ConfigError, seconds earlier."""
    name = config["model"]["name"]
    args = {"num_classes": 1, "num_cameras": 0, "options": get_recipe(name).model_options(config)}
    with torch.device("meta"):
        build_model_from_args(name, args)


def model_from_checkpoint(state: dict, config: dict, path: str | os.PathLike) -> nn.Module:
    """The checkpoint's architecture (with the config's eval-time options) and weights, in eval mode.
    ``path`` names the file in errors."""
    name = state["model_name"]
    model = build_model_from_args(
        name, eval_model_arguments(name, state["model_args"], config), source=f"checkpoint {path}: model_args"
    )
    load_model_state(model, state["model"], path)
    return model.eval()


def trained_model(config: dict, weights: str | os.PathLike) -> tuple[nn.Module, dict, Optional[dict]]:
    """The model that ``weights`` holds, in eval mode on the CPU, its model arguments and the config it was trained
    with (a training checkpoint's; None for a state dict).

    ``weights`` is a training checkpoint (its model, with the config's eval-time options) or a bare
    state dict of the config's model: ``torch.save(model.state_dict())`` of a dpm_ops model trained
    by one's own script, or an official DPM / TransReID release (``transformer_150.pth``). A bare
    one is built from the config's model.options and input.size, with the classes and cameras its
    tensors have, and must fill every tensor of it, in its shape (a trained position embedding is
    not resized). The one exception is the classifier, which eval mode never reads: a test-time state
    dict saved without it gets a model of the fewest classes its recipe takes, its classifier as built."""
    config = check_config(config)
    contents = read_checkpoint_file(weights)
    name = config["model"]["name"]
    if is_training_checkpoint(contents, weights):
        state = checked_checkpoint(weights, contents, model_name=name)
        return model_from_checkpoint(state, config, weights), state["model_args"], state["config"]
    try:
        state_dict = trained_state_dict(contents, str(weights))
    except WeightsError as error:
        raise CheckpointError(
            f"--weights is neither a dpm_ops training checkpoint nor a trained model's state dict: {error}"
        ) from error
    classifiers = [t for k, t in state_dict.items() if _is_classifier(k)]
    cameras = state_dict.get("backbone.sie_embed")
    recipe = get_recipe(name)
    args = {
        "num_classes": classifiers[0].shape[0] if classifiers else recipe.min_classes,
        "num_cameras": 0 if cameras is None else cameras.shape[0],
        "options": recipe.model_options(config),
    }
    model = build_model_from_args(name, eval_model_arguments(name, args, config))
    if not classifiers:
        built = {k: t for k, t in model.state_dict().items() if _is_classifier(k)}
        state_dict = {**state_dict, **built}
    load_model_state(model, state_dict, weights, built_from="the config's model.options and input.size")
    return model.eval(), args, None


def _is_classifier(key: str) -> bool:
    """DPM's and the ViT baseline's classifier.weight, MaskReID's head.classifier.weight."""
    return f".{key}".endswith(".classifier.weight")


def checkpoint_model(config: dict, weights: str | os.PathLike) -> nn.Module:
    """The model of ``weights`` (trained_model's: a checkpoint of the config's model at its
    input.size, or a bare state dict), in eval mode on the CPU: what `dpm-reid export` and `extract` run."""
    model, model_args, _ = trained_model(config, weights)
    check_input_size(model_args, config, f"checkpoint {weights}")
    return model


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate_with_config(
    model: nn.Module,
    splits: ReIDSplits,
    config: dict,
    *,
    device: torch.device,
    out_dir=None,
    pictures=None,
    progress=True,
    log: Callable[[str], None] = print,
    record: Optional[dict] = None,
) -> Optional[dict]:
    """``evaluate_model`` with the config's ``eval`` section (``record``: its metrics.json entries). Features are
    extracted under ``eval.amp`` (fp32 by default), never under the training's ``solver.amp``: the official code
    trains under fp16 autocast and tests in fp32.

    A run tested on several sets (``splits.more_tests``): each one evaluated in turn into ``out_dir/test_<set>/``
    (its metrics.json and pictures), then ``out_dir/metrics.json`` holds each one's metrics.json under the set's
    name (written last; an earlier evaluation's ``test_*`` folders of other sets removed): the metrics returned
    are ``{set: metrics}``."""
    from . import evaluator

    tests, main = (splits, *splits.more_tests), distributed.current().is_main
    options = dict(device=device, pictures=pictures, progress=progress, log=log, record=record)
    if len(tests) == 1:
        results, folders = _evaluate_test_set(model, splits, config, out_dir=out_dir, **options), {}
    else:
        names = [test.name.rsplit("->", 1)[-1] for test in tests]  # each set's own name (load_splits: all different)
        folders = {name: None if out_dir is None else Path(out_dir) / f"{SET_FOLDER_PREFIX}{name}" for name in names}
        results = {
            name: _evaluate_test_set(model, test, config, out_dir=folders[name], **options)
            for test, name in zip(tests, folders)
        }
        if main:
            table = evaluator.format_metrics_table({name: m["all"] for name, m in results.items()}, label="test set")
            log(f"all queries of each of the {len(tests)} test sets:\n{table}")
    if out_dir is not None and main:
        for stale in set(tested_set_folders(Path(out_dir))) - set(folders.values()):  # of a set not tested now
            shutil.rmtree(stale)
        if folders:
            evaluator.remove_pictures(out_dir)  # an earlier evaluation's of one set
            saved = {name: json.loads((folder / "metrics.json").read_text("utf-8")) for name, folder in folders.items()}
            evaluator.write_json_atomic(str(Path(out_dir) / "metrics.json"), saved)
    return results if main else None


def _evaluate_test_set(model, splits, config, *, device, out_dir, pictures, progress, log, record) -> Optional[dict]:
    """One test set's evaluation (evaluate_with_config)."""
    from . import evaluator

    ev = config["eval"]
    info = distributed.current()
    options = dict(
        model_name=config["model"]["name"],
        image_size=tuple(config["input"]["size"]),
        batch_size=ev["batch_size"],
        num_workers=ev["num_workers"],
        device=str(device),
        amp_dtype=resolve_amp(ev["amp"], device),
        flip=ev["flip"],
        distance=ev["distance"],
        **_eval_scoring(ev),
        k1=ev["k1"],
        k2=ev["k2"],
        lambda_value=ev["lambda_value"],
        max_rank=ev["max_rank"],
        protocol=ev["protocol"],
        num_repeats=ev["cuhk03_repeats"],
        seed=ev["cuhk03_seed"],
        multi_query=ev["multi_query"],
        roc=ev["roc"],
        out_dir=str(out_dir) if out_dir is not None and info.is_main else None,
        pictures=ev["pictures"] if pictures is None else pictures,
        progress=progress,
        record=record,
    )
    was_training = model.training
    metrics = evaluator.evaluate_model(model, splits, **options)  # every rank extracts a shard; rank 0 ranks
    model.train(was_training)
    if info.is_main and metrics is not None:
        log(
            f"evaluation on {splits.name} ({len(splits.query)} queries, {len(splits.gallery)} gallery):\n"
            + evaluator.format_metrics_table(metrics)
        )
    return metrics if info.is_main else None


def evaluate_checkpoint(
    config: dict,
    weights: str | os.PathLike,
    output: Optional[str | os.PathLike] = None,
    *,
    split_ids: Optional[Sequence[int]] = None,
) -> tuple[Optional[dict], Path]:
    """`dpm-reid eval`: checkpoint ``weights`` on the config's test set (under torchrun too), with
    metrics.json and pictures in ``output`` (default: ``eval/`` beside the run's checkpoints folder).
    Returns (the metrics on rank 0, else None; the output folder).

    ``split_ids`` (``--splits``): the test sets' splits (``dataset.split_id``), each evaluated into
    ``output/split_<id>/``, every one loaded and checked first; returns their summary (``summarize_runs``: mean and
    std over the splits), also written to ``output/summary.json``."""
    model, model_args, trained_config = trained_model(config, weights)
    configs = [config] if split_ids is None else [_with_split(config, split) for split in _checked_ids(split_ids)]
    for each in configs:
        check_split_untrained(each, trained_config, f"checkpoint {weights}")
    weights_folder = Path(weights).resolve().parent
    run_folder = weights_folder.parent if weights_folder.name == "checkpoints" else weights_folder
    output = make_output_folder(output or run_folder / "eval", "--output")
    check_not_a_run_folder(output, "--output")
    device, info = init_run_device(config)
    progress = config["train"]["progress"] and info.is_main
    prepare_synthetic(config, progress=progress)
    tests = [load_splits(each, train_split=False) for each in configs]
    for each, splits in zip(configs, tests):
        check_model_fits_data(model_args, each, splits, f"checkpoint {weights}")
    model = model.to(device)
    # metrics.json names the weights it scored: evaluations of several checkpoints sit apart
    record = {"weights": str(Path(weights).resolve())}
    if split_ids is None:
        return evaluate_with_config(
            model, tests[0], config, device=device, out_dir=output, progress=progress, record=record
        ), output
    folders = [output / f"split_{each['dataset']['split_id']}" for each in configs]
    for each, splits, folder in zip(configs, tests, folders):
        evaluate_with_config(model, splits, each, device=device, out_dir=folder, progress=progress, record=record)
    if not info.is_main:
        return None, output
    from .evaluator import write_json_atomic

    summary = summarize_runs(folders, split_ids=[each["dataset"]["split_id"] for each in configs])
    write_json_atomic(str(output / "summary.json"), summary)
    return summary, output


def _checked_ids(split_ids) -> list[int]:
    """``split_ids``: two or more different split ids (``--splits``)."""
    if not isinstance(split_ids, (list, tuple, range)) or not all(is_integer(s) and s >= 0 for s in split_ids):
        raise ConfigError(f"--splits must be split ids >= 0, got {quote(split_ids)}")
    if len(split_ids) < 2 or len(set(split_ids)) < len(split_ids):
        raise ConfigError(f"--splits must name two or more different splits, got {quote(list(split_ids))}")
    return [int(s) for s in split_ids]


def _with_split(config: dict, split_id: int) -> dict:
    """``config`` testing split ``split_id`` (checked: a test set must have splits)."""
    return check_config({**config, "dataset": {**config["dataset"], "split_id": split_id}})
