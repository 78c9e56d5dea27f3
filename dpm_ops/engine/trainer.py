"""Training engine: DPM's two-pass recipe, the ViT baseline, MaskReID's softmax -> ranking stages.

    from dpm_ops.engine import load_config, train
    result = train(load_config("synthetic_dpm", ["solver.epochs=2"]), "runs/demo")
    print(result["metrics"]["all"]["rank1"])

Recipes (shared/spec/dpm.md §6-7, maskreid.md §5):

* ``dpm``: two SGD optimizers (momentum 0.9, biases at ``bias_lr_factor`` x lr, weight decay on
  every parameter). Per iteration, pass 1 steps everything but the mask generator; pass 2 is a
  fresh forward/backward that steps only the mask generator, at a constant lr (no scheduler). The
  main optimizer follows the warmup-cosine schedule stepped at the start of each epoch. One AMP
  grad scaler (fp16 only) is shared and updated after each step.
* ``vit_baseline``: one optimizer, ID + soft-margin triplet, same schedule.
* ``maskreid``: ``pretrain.epochs`` of softmax (ID cross-entropy) pre-training, then
  ``solver.epochs`` of the ranking loss (Eq. 5) on 1 id x 10 + 54 singles batches, each stage with
  its own SGD and poly schedule stepped per iteration.

Outputs in the run folder (rank 0 only): ``train.log`` (text), ``train_log.jsonl`` (one JSON object
per logged step: ``step``, ``epoch``, ``lr``, ``loss``, ``loss/<term>``), ``config.yaml``,
``checkpoints/last.pt`` (every ``train.checkpoint_every_iters`` iterations and at each epoch end),
``checkpoints/epoch_NNN.pt`` (every ``train.checkpoint_period`` epochs), ``checkpoints/final.pt``
(weights only), ``metrics.json`` and the evaluation pictures.

Resuming (``resume=True``) restores the model, optimizers, schedules, scaler, the python / numpy /
torch (/ CUDA) RNG states of every rank and the sampler position, so a killed run continues with
exactly the batches, augmentations and drop-path draws the uninterrupted run would have used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dpm_ops.data import (DatasetError, ImageDataset, MaskReIDBatchSampler, RandomIdentityBatchSampler,
                          ReIDSplits, build_dataloader, build_dataset, build_transforms)
from dpm_ops.losses import BaselineReIDLoss, DPMLoss, MaskReIDRankingLoss, batch_hard_soft_margin_triplet
from dpm_ops.models import WeightsError, build_model, load_pretrained
from dpm_ops.models.param_groups import sgd_param_groups

from . import distributed
from .checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, load_model_state, make_checkpoint,
                         make_output_folder, remove_stale_temporaries, restore_rng_state, save_checkpoint)
from .config import ConfigError, current_choice, dump_config
from .schedules import LRSchedule

# config keys that may differ between a killed run and its resumption
RESUME_FREE_KEYS = {("train", "stop_after_iters"), ("train", "progress"), ("train", "device"),
                    ("dataset", "test_camids")}  # test cameras: evaluation only
RESUME_FREE_SECTIONS = {"eval", "dataloader"}


class TrainingStopped(Exception):
    """Raised internally by the ``train.stop_after_iters`` hook (behaves like a kill: nothing saved)."""


# ---------------------------------------------------------------------------------------------
# building blocks from a config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)  # load_config checked that it parses and is cpu or cuda
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key train.device: {name} requested but CUDA is not available here "
                          f"(torch {torch.__version__}, torch.cuda.is_available() is False); use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"config key train.device: {name} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_amp(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """auto: bf16 autocast on CUDA (no scaler needed), full precision on CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def is_maskreid(model_name: str) -> bool:
    return model_name.startswith("maskreid")


def prepare_synthetic(config: dict, *, progress: bool = True) -> None:
    """Generate the synthetic set at ``dataset.root`` if it is absent (rank 0; others wait)."""
    data = config["dataset"]
    if data["name"].lower() not in ("synthetic", "synth") or not data["generate"]:
        return
    from dpm_ops.data.datasets import SYNTHETIC_MANIFEST
    from dpm_ops.data.synth import ensure_synthetic_dataset, synth_config

    root = Path(os.path.expanduser(data["root"]))
    if distributed.current().is_main and not (root / SYNTHETIC_MANIFEST).is_file():
        print(f"dpm-reid: generating the synthetic dataset in {root} (absent)", file=sys.stderr)
        # dataset.synth was checked by load_config
        ensure_synthetic_dataset(root, synth_config(data["synth"]), progress=progress)
    distributed.barrier()


def load_splits(config: dict) -> ReIDSplits:
    """Train split of ``dataset``, query/gallery of ``dataset`` or of ``dataset.test_name``
    (with its ``dataset.test_camids``); the test set's gt_bbox pools with ``eval.multi_query``."""
    data = config["dataset"]
    with_masks = data["with_masks"] if data["with_masks"] is not None else is_maskreid(config["model"]["name"])
    options = dict(with_masks=with_masks, mask_root=data["mask_root"])
    if data["check_counts"] != "warn" or data["name"].lower() not in ("synthetic", "synth"):
        options["check_counts"] = data["check_counts"]
    test_options = {"multi_query": True} if config["eval"]["multi_query"] != "off" else {}
    if data["test_camids"] is not None:
        test_options["camids"] = tuple(data["test_camids"])
    splits = build_dataset(data["name"], os.path.expanduser(data["root"]), **options,
                           **({} if data["test_name"] else test_options))
    if data["test_name"]:
        test = build_dataset(data["test_name"], os.path.expanduser(data["test_root"] or data["root"]),
                             with_masks=with_masks, mask_root=data["mask_root"], check_counts=data["check_counts"],
                             **test_options)
        mask_paths = None
        if with_masks:
            mask_paths = {**(splits.mask_paths or {}), **(test.mask_paths or {})}
        splits = dataclasses.replace(splits, name=f"{splits.name}->{test.name}", query=test.query,
                                     gallery=test.gallery, mask_paths=mask_paths,
                                     occluded_paths=test.occluded_paths, multi_query=test.multi_query)
    if not splits.train:
        raise DatasetError(f"dataset {data['name']} at {data['root']} has no training images")
    return splits


def model_arguments(config: dict, splits: ReIDSplits) -> dict:
    name = config["model"]["name"]
    options = dict(config["model"]["options"])
    if is_maskreid(name):
        # the softmax head exists only for the pre-training stage
        num_classes = splits.num_train_pids if config["pretrain"]["epochs"] > 0 else 0
        num_cameras = 0
    else:
        num_classes, num_cameras = splits.num_train_pids, splits.num_cams
        options.setdefault("img_size", list(config["input"]["size"]))
    if name == "dpm":
        options.setdefault("loss_inputs", True)  # train mode hands DPMLoss the fused ArcFace CE's inputs
    return {"num_classes": num_classes, "num_cameras": num_cameras, "options": options}


def check_input_size(model_args: dict, config: dict, source: str) -> None:
    """A ViT's position embedding is sized for one patch grid: the config's input.size must be it."""
    size = model_args["options"].get("img_size")
    if size is not None and list(size) != list(config["input"]["size"]):
        raise ConfigError(f"{source} takes {size[0]}x{size[1]} images but config key input.size is "
                          f"{list(config['input']['size'])}; set input.size={list(size)}")


def check_model_fits_data(model_args: dict, config: dict, splits: ReIDSplits, source: str) -> None:
    """What the test images need from the model, checked before any work: a ViT's input size (its
    position embedding is sized for one patch grid) and its SIE camera embedding (one row per
    camera of the training set). ``source`` names the model's origin in the message."""
    check_input_size(model_args, config, source)
    num_cameras = model_args["num_cameras"]
    highest = max((r.camid for r in (*splits.query, *splits.gallery)), default=-1)
    if num_cameras and highest >= num_cameras:
        raise ConfigError(f"{source} has {num_cameras} camera embeddings (SIE, one per training camera) but the "
                          f"test set {splits.name} has camera ids up to {highest} ({highest + 1} cameras); evaluate "
                          f"on a set with at most {num_cameras} cameras, or map a one-camera-per-split set with "
                          "dataset.test_camids")


# Model options that change only what eval mode returns, not the weights: `dpm-reid eval` takes them
# from its config (overrides included) rather than from the checkpoint.
EVAL_TIME_OPTIONS = {"dpm": ("neck_feat",)}


def eval_model_arguments(name: str, checkpoint_args: dict, config: dict) -> dict:
    chosen = {key: config["model"]["options"][key] for key in EVAL_TIME_OPTIONS.get(name, ())
              if key in config["model"]["options"]}
    return {**checkpoint_args, "options": {**checkpoint_args["options"], **chosen}}


def build_model_from_args(name: str, args: dict) -> nn.Module:
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in args["options"].items()}
    try:
        return build_model(name, args["num_classes"], args["num_cameras"], **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key model.options: {error}") from error


def model_from_checkpoint(state: dict, config: dict, path: str | os.PathLike) -> nn.Module:
    """The checkpoint's architecture (with the config's eval-time options) and weights, in eval mode:
    what `dpm-reid eval`, `export` and `extract` run. ``path`` names the file in errors."""
    name = state["model_name"]
    model = build_model_from_args(name, eval_model_arguments(name, state["model_args"], config))
    load_model_state(model, state["model"], path)
    return model.eval()


def train_transform(config: dict):
    inp = config["input"]
    if inp["recipe"] == "dpm":
        return build_transforms("dpm", train=True, size=tuple(inp["size"]), padding=inp["padding"], flip=inp["flip"],
                                erasing=inp["erasing"], color_jitter=inp["color_jitter"])
    return build_transforms("maskreid", train=True, resize=tuple(inp["resize"]), crop=tuple(inp["size"]),
                            flip=inp["flip"], erasing=inp["erasing"])


def build_sampler(kind: str, config: dict, pids: list, rank: int, world_size: int):
    s, seed = config["sampler"], config["train"]["seed"]
    try:
        if kind == "pk":
            return RandomIdentityBatchSampler(pids, s["num_ids"], s["num_instances"], seed=seed, rank=rank,
                                              world_size=world_size)
        return MaskReIDBatchSampler(pids, s["num_positives"], s["num_negatives"], s["batches_per_epoch"],
                                    seed=seed, rank=rank, world_size=world_size)
    except ValueError as error:
        raise ConfigError(f"config section sampler: {error}") from error


@dataclasses.dataclass
class Stage:
    """One phase of training with its own loss, sampler, optimizers and schedules."""

    name: str  # "main" (DPM / baseline), "pretrain" / "ranking" (MaskReID)
    epochs: int
    sampler_kind: str
    optimizers: dict  # name -> optimizer (DPM: "main", "mask")
    schedules: dict  # name -> LRSchedule (only the scheduled optimizers)
    per_iteration_schedule: bool  # poly: stepped per iteration; warmup_cosine: per epoch


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, config: dict, output_dir: str | os.PathLike, *, resume: bool = False,
                 log_stream=None, on_iteration: Optional[Callable[[int], None]] = None):
        self.config = config
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.on_iteration = on_iteration
        self.model_name = config["model"]["name"]
        self.device = resolve_device(config["train"]["device"])
        self.dist = distributed.init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.dist.is_main:  # only rank 0 writes files
            make_output_folder(self.output_dir, "output_dir")
        self.amp_dtype = resolve_amp(config["solver"]["amp"], self.device)
        self.log_stream = log_stream if log_stream is not None else sys.stdout
        self._log_file = None
        self._jsonl = None
        self.progress = config["train"]["progress"] and self.dist.is_main
        self.global_step = 0

    # -- logging (rank 0) -------------------------------------------------------------------

    def log(self, message: str) -> None:
        if not self.dist.is_main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if self._log_file is not None:
            self._log_file.write(f"{stamp} {message}\n")
            self._log_file.flush()
        tqdm.write(message, file=self.log_stream)

    def _open_logs(self, resume_step: Optional[int]) -> None:
        if not self.dist.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.output_dir / "train_log.jsonl"
        if resume_step is not None and jsonl.is_file():
            # drop records past the checkpoint: the resumed run logs those steps again
            kept = [line for line in jsonl.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            jsonl.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif jsonl.exists():
            jsonl.unlink()
        self._jsonl = open(jsonl, "a", encoding="utf-8")
        self._log_file = open(self.output_dir / "train.log", "a" if resume_step is not None else "w",
                              encoding="utf-8")

    def _close_logs(self) -> None:
        for handle in (self._jsonl, self._log_file):
            if handle is not None:
                handle.close()
        self._jsonl = self._log_file = None

    def _record(self, record: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    # -- setup ------------------------------------------------------------------------------

    def _seed(self) -> None:
        seed = self.config["train"]["seed"] + self.dist.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.config["train"]["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

    def _optimizer(self, groups: list, momentum: float) -> torch.optim.Optimizer:
        if self.config["solver"]["optimizer"] == "adamw":  # an option, not in the papers' recipes
            return torch.optim.AdamW(groups, lr=groups[0]["lr"])
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)

    def _build_stages(self, iters_per_epoch: dict) -> list[Stage]:
        solver, model = self.config["solver"], self.model
        common = dict(weight_decay=solver["weight_decay"], bias_lr_factor=solver["bias_lr_factor"],
                      weight_decay_bias=solver["weight_decay_bias"])

        def schedule(optimizer, kind, base_lr, epochs, per_iter_total):
            total = per_iter_total if kind == "poly" else epochs
            return LRSchedule(optimizer, kind, total, base_lr=base_lr, warmup=solver["warmup_epochs"],
                              warmup_factor=solver["warmup_factor"], min_lr_factor=solver["min_lr_factor"],
                              power=solver["poly_power"])

        if self.model_name == "dpm":
            groups = model.optimizer_param_groups(base_lr=solver["base_lr"], **common)
            main = self._optimizer(groups.main, solver["momentum"])
            mask_lr = solver["mask_lr"] if solver["mask_lr"] is not None else solver["base_lr"]
            mask = self._optimizer(model.optimizer_param_groups(base_lr=mask_lr, **common).mask_generator,
                                   solver["momentum"])
            epochs = solver["epochs"]
            return [Stage("main", epochs, "pk", {"main": main, "mask": mask},
                          {"main": schedule(main, solver["schedule"], solver["base_lr"], epochs,
                                            epochs * iters_per_epoch["pk"])},
                          solver["schedule"] == "poly")]
        if self.model_name == "vit_baseline":
            main = self._optimizer(model.optimizer_param_groups(base_lr=solver["base_lr"], **common),
                                   solver["momentum"])
            epochs = solver["epochs"]
            return [Stage("main", epochs, "pk", {"main": main},
                          {"main": schedule(main, solver["schedule"], solver["base_lr"], epochs,
                                            epochs * iters_per_epoch["pk"])},
                          solver["schedule"] == "poly")]
        stages = []
        pre = self.config["pretrain"]
        if pre["epochs"] > 0:
            opt = self._optimizer(sgd_param_groups(model.named_parameters(), pre["base_lr"], **common),
                                  solver["momentum"])
            stages.append(Stage("pretrain", pre["epochs"], pre["sampler"], {"main": opt},
                                {"main": schedule(opt, pre["schedule"], pre["base_lr"], pre["epochs"],
                                                  pre["epochs"] * iters_per_epoch[pre["sampler"]])},
                                pre["schedule"] == "poly"))
        # the softmax head is not trained by the ranking loss
        ranking_params = [(n, p) for n, p in model.named_parameters() if ".classifier." not in f".{n}"]
        opt = self._optimizer(sgd_param_groups(ranking_params, solver["base_lr"], **common), solver["momentum"])
        kind = self.config["sampler"]["kind"]
        stages.append(Stage("ranking", solver["epochs"], kind, {"main": opt},
                            {"main": schedule(opt, solver["schedule"], solver["base_lr"], solver["epochs"],
                                              solver["epochs"] * iters_per_epoch[kind])},
                            solver["schedule"] == "poly"))
        return stages

    def setup(self) -> None:
        config = self.config
        self._seed()
        prepare_synthetic(config, progress=self.progress)
        self.splits = load_splits(config)
        self.model_args = model_arguments(config, self.splits)
        check_model_fits_data(self.model_args, config, self.splits, f"model {self.model_name}")
        self.model = build_model_from_args(self.model_name, self.model_args)
        if config["model"]["pretrained"]:
            path = os.path.expanduser(config["model"]["pretrained"])
            try:
                report = load_pretrained(self.model, path, partial=config["model"]["pretrained_partial"])
            except WeightsError as error:
                raise CheckpointError(f"config key model.pretrained: {error}") from error
            self.log(f"pretrained {path}: layout {report.layout}, {len(report.loaded)} tensors loaded")
        self.model.to(self.device)
        self.model.train()
        pids = [r.pid for r in self.splits.train]
        mask_paths = self.splits.mask_paths if is_maskreid(self.model_name) else None
        self.dataset = ImageDataset(self.splits.train, train_transform(config), mask_paths)
        kinds = {"pk", "maskreid"} if is_maskreid(self.model_name) else {"pk"}
        self.samplers = {k: build_sampler(k, config, pids, self.dist.rank, self.dist.world_size) for k in kinds}
        self.loaders = {k: build_dataloader(self.dataset, batch_sampler=s, num_workers=config["dataloader"]["num_workers"],
                                            seed=config["train"]["seed"], pin_memory=config["dataloader"]["pin_memory"])
                        for k, s in self.samplers.items()}
        self.stages = self._build_stages({k: len(s) for k, s in self.samplers.items()})
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        loss = config["loss"]
        self.dpm_loss = DPMLoss(loss["hem_weight"], loss["id_weight"], loss["triplet_weight"], loss["plain_weight"],
                                loss["masked_weight"])
        self.baseline_loss = BaselineReIDLoss(loss["id_weight"], loss["triplet_weight"])
        self.ranking_loss = MaskReIDRankingLoss(loss["ranking_alpha"], loss["ranking_lambda"],
                                                loss["ranking_neg_mode"], loss["ranking_pos_mode"])
        self.ddp_model = self.model
        if self.dist.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # MaskReID's softmax head sits idle in the ranking stage
                find_unused_parameters=is_maskreid(self.model_name) and self.model_args["num_classes"] > 0)

    # -- checkpoints ------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _training_state(self, stage_index: int, epoch: int, consumed: int, epoch_done: bool) -> dict:
        stage = self.stages[stage_index]
        sampler = self.samplers[stage.sampler_kind]
        return {
            "progress": {"stage": stage_index, "stage_name": stage.name, "epoch": epoch, "consumed": consumed,
                         "epoch_done": epoch_done, "global_step": self.global_step},
            "optimizers": {f"{i}/{n}": o.state_dict() for i, s in enumerate(self.stages)
                           for n, o in s.optimizers.items()},
            "schedules": {f"{i}/{n}": sch.state_dict() for i, s in enumerate(self.stages)
                          for n, sch in s.schedules.items()},
            "scaler": self.scaler.state_dict(),
            "sampler": sampler.state_dict(consumed_batches=consumed),
            "world_size": self.dist.world_size,
        }

    def save(self, stage_index: int, epoch: int, consumed: int, epoch_done: bool, extra_names=()) -> None:
        # every rank's RNG state (a collective call: all ranks get here together)
        rng = distributed.all_gather_object(capture_rng_state())
        if not self.dist.is_main:
            return
        training = self._training_state(stage_index, epoch, consumed, epoch_done)
        training["rng"] = rng
        state = make_checkpoint(self.model_name, self.model_args, self.config, self.model.state_dict(), training)
        save_checkpoint(self.checkpoint_dir / "last.pt", state)
        for name in extra_names:
            save_checkpoint(self.checkpoint_dir / name, state)

    def _check_resume_config(self, saved: dict) -> None:
        for section, values in self.config.items():
            if section in RESUME_FREE_SECTIONS:
                continue
            for key, value in values.items():
                if (section, key) in RESUME_FREE_KEYS:
                    continue
                old = current_choice(section, key, saved.get(section, {}).get(key))
                if old != value:
                    raise CheckpointError(f"--resume: config key {section}.{key} is {value!r} but the "
                                          f"checkpoint was trained with {old!r}")

    def load_for_resume(self) -> Optional[dict]:
        path = self.checkpoint_dir / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint to resume from at {path}")
        state = load_checkpoint(path, model_name=self.model_name)
        self._check_resume_config(state["config"])
        training = state.get("training")
        if training is None:
            raise CheckpointError(f"--resume: {path} holds weights only, no training state")
        if training["world_size"] != self.dist.world_size:
            raise CheckpointError(f"--resume: {path} was written by {training['world_size']} process(es), "
                                  f"this run has {self.dist.world_size}")
        load_model_state(self.model, state["model"], path)
        for i, stage in enumerate(self.stages):
            for n, opt in stage.optimizers.items():
                opt.load_state_dict(training["optimizers"][f"{i}/{n}"])
            for n, sch in stage.schedules.items():
                sch.load_state_dict(training["schedules"][f"{i}/{n}"])
        self.scaler.load_state_dict(training["scaler"])
        restore_rng_state(training["rng"][self.dist.rank])
        self.global_step = training["progress"]["global_step"]
        return training

    # -- steps ------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _backward_step(self, loss: torch.Tensor, optimizer) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def _step(self, stage: Stage, batch: dict, want_terms: bool) -> dict:
        """One iteration; returns loggable floats when ``want_terms``."""
        images = batch["image"].to(self.device, non_blocking=True)
        pids = batch["pid"].to(self.device, non_blocking=True)
        cams = batch["camid"].to(self.device, non_blocking=True)
        model, opts = self.ddp_model, stage.optimizers
        logged: dict = {}
        if self.model_name == "dpm":
            opts["main"].zero_grad(set_to_none=True)
            with self._autocast():
                out = model(images, cams, pids)
                loss = self.dpm_loss(out, pids)
            if want_terms:
                logged = self._dpm_terms(out, pids, loss)
            two_pass = self.config["solver"]["two_pass"]
            if not two_pass:
                opts["mask"].zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(opts["main"])
                self.scaler.step(opts["mask"])
                self.scaler.update()
                return logged
            self._backward_step(loss, opts["main"])  # pass 1: backbone, classifier, BNNeck
            opts["mask"].zero_grad(set_to_none=True)
            with self._autocast():  # pass 2: fresh forward with the updated backbone
                out2 = model(images, cams, pids)
                loss2 = self.dpm_loss(out2, pids)
            self._backward_step(loss2, opts["mask"])  # mask generator only
            if want_terms:
                logged["loss/pass2"] = float(loss2.detach())
            return logged
        opts["main"].zero_grad(set_to_none=True)
        with self._autocast():
            if self.model_name == "vit_baseline":
                out = model(images, cams, pids)
                loss = self.baseline_loss(out, pids)
            else:
                out = model(images, batch["masked"].to(self.device, non_blocking=True))
                if stage.name == "pretrain":
                    loss = F.cross_entropy(out.logits.float(), pids)
                else:
                    loss = self.ranking_loss(out.embedding, pids)
        self._backward_step(loss, opts["main"])
        if want_terms:
            logged = {"loss": float(loss.detach())}
            if self.model_name == "vit_baseline":
                with torch.no_grad():
                    logged["loss/id"] = float(F.cross_entropy(out.logits.float(), pids))
                    logged["loss/triplet"] = float(batch_hard_soft_margin_triplet(out.feature, pids))
            else:
                logged["loss/" + ("softmax" if stage.name == "pretrain" else "ranking")] = logged["loss"]
        return logged

    def _dpm_terms(self, out, pids, loss) -> dict:
        with torch.no_grad():
            terms = self.dpm_loss.terms(out, pids)
        return {"loss": float(loss.detach()), **{f"loss/{k}": float(v) for k, v in terms.items()}}

    # -- main loop --------------------------------------------------------------------------

    def fit(self) -> bool:
        """Train all stages; False when stopped by ``train.stop_after_iters``."""
        start_stage, start_epoch, start_consumed, sampler_state = 0, 1, 0, None
        resume_step = None
        if self.resume:
            training = self.load_for_resume()
            p = training["progress"]
            resume_step = p["global_step"]
            start_stage, start_epoch = p["stage"], p["epoch"]
            if p["epoch_done"]:
                start_epoch, start_consumed = p["epoch"] + 1, 0
                if start_epoch > self.stages[start_stage].epochs:
                    start_stage, start_epoch = start_stage + 1, 1
            else:
                start_consumed, sampler_state = p["consumed"], training["sampler"]
        self._open_logs(resume_step)
        if self.dist.is_main:
            for folder in (self.output_dir, self.checkpoint_dir):  # this run owns them: no writer is active
                for path in remove_stale_temporaries(folder):
                    self.log(f"removed {path.name}, a temporary left by an interrupted write")
            (self.output_dir / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")
        self.log(self.splits.summary())
        self.log(f"model {self.model_name}: {sum(p.numel() for p in self.model.parameters()):,} parameters; "
                 f"device {self.device}, amp {self.amp_dtype}, {self.dist.world_size} process(es)")
        if resume_step is not None:
            self.log(f"resumed from {self.checkpoint_dir / 'last.pt'} at step {resume_step} "
                     f"(stage {self.stages[start_stage].name if start_stage < len(self.stages) else 'done'}, "
                     f"epoch {start_epoch}, batch {start_consumed})")
        stop_after = self.config["train"]["stop_after_iters"]
        epoch_offset = sum(s.epochs for s in self.stages[:start_stage])
        for stage_index in range(start_stage, len(self.stages)):
            stage = self.stages[stage_index]
            sampler, loader = self.samplers[stage.sampler_kind], self.loaders[stage.sampler_kind]
            first_epoch = start_epoch if stage_index == start_stage else 1
            for epoch in range(first_epoch, stage.epochs + 1):
                consumed = 0
                sampler.set_epoch(epoch)
                if sampler_state is not None:
                    sampler.load_state_dict(sampler_state)
                    consumed, sampler_state = start_consumed, None
                if not stage.per_iteration_schedule:
                    for sch in stage.schedules.values():
                        sch.step(epoch)
                total = len(sampler)
                bar = tqdm(total=total, initial=consumed, disable=not self.progress, leave=False, unit="it",
                           desc=f"{stage.name} epoch {epoch}/{stage.epochs}", dynamic_ncols=True)
                started = time.perf_counter()
                for batch in loader:
                    if stage.per_iteration_schedule:
                        for sch in stage.schedules.values():
                            sch.step((epoch - 1) * total + consumed)
                    self.global_step += 1
                    consumed += 1
                    period = self.config["train"]["log_period"]
                    want = self.global_step % period == 0 or consumed == total
                    logged = self._step(stage, batch, want)
                    bar.update(1)
                    if want:
                        logged = distributed.mean_across_ranks(logged, self.device)
                        record = {"step": self.global_step, "epoch": epoch_offset + epoch,
                                  "lr": stage.optimizers["main"].param_groups[0]["lr"], **logged}
                        if not all(math.isfinite(v) for k, v in logged.items()):
                            raise FloatingPointError(f"non-finite loss at step {self.global_step}: {logged}")
                        self._record(record)
                        bar.set_postfix(loss=f"{logged['loss']:.3f}")
                        if self._log_file is not None:
                            terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in logged.items() if k.startswith("loss/"))
                            self._log_file.write(
                                f"{time.strftime('%Y-%m-%d %H:%M:%S')} {stage.name} epoch {epoch} "
                                f"iter {consumed}/{total} step {self.global_step} lr {record['lr']:.3e} "
                                f"loss {logged['loss']:.4f} ({terms})\n")
                            self._log_file.flush()
                    if self.on_iteration is not None:
                        self.on_iteration(self.global_step)
                    every = self.config["train"]["checkpoint_every_iters"]
                    if every and self.global_step % every == 0 and consumed < total:
                        self.save(stage_index, epoch, consumed, epoch_done=False)
                    if stop_after is not None and self.global_step >= stop_after:
                        bar.close()
                        self.log(f"stopped after {self.global_step} iterations (train.stop_after_iters)")
                        return False
                bar.close()
                elapsed = time.perf_counter() - started
                self.log(f"{stage.name} epoch {epoch}/{stage.epochs} done: {consumed} iterations in {elapsed:.1f} s, "
                         f"lr {stage.optimizers['main'].param_groups[0]['lr']:.3e}")
                period = self.config["train"]["checkpoint_period"]
                keep = (f"epoch_{epoch_offset + epoch:03d}.pt",) if period and epoch % period == 0 else ()
                self.save(stage_index, epoch, consumed, epoch_done=True, extra_names=keep)
                eval_period = self.config["train"]["eval_period"]
                last = stage_index == len(self.stages) - 1 and epoch == stage.epochs
                if eval_period and epoch % eval_period == 0 and not last:
                    rng = capture_rng_state()  # evaluation must not shift the training's random streams
                    self.evaluate(out_dir=self.output_dir / f"eval_epoch_{epoch_offset + epoch:03d}", pictures=False)
                    restore_rng_state(rng)
            epoch_offset += stage.epochs
        return True

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, out_dir: Optional[Path] = None, pictures: Optional[bool] = None) -> Optional[dict]:
        """Metrics on rank 0 (None on the other ranks)."""
        return evaluate_with_config(self.model, self.splits, self.config, device=self.device, out_dir=out_dir,
                                    pictures=pictures, progress=self.progress, log=self.log)

    def run(self) -> dict:
        try:
            self.setup()
            finished = self.fit()
            if not finished:
                return {"finished": False, "global_step": self.global_step, "metrics": None,
                        "output_dir": str(self.output_dir)}
            metrics = self.evaluate(out_dir=self.output_dir)
            if self.dist.is_main:
                final = make_checkpoint(self.model_name, self.model_args, self.config, self.model.state_dict(),
                                        metrics=metrics)
                save_checkpoint(self.checkpoint_dir / "final.pt", final)
                self._plot_losses()
                self.log(f"final weights: {self.checkpoint_dir / 'final.pt'}")
            return {"finished": True, "global_step": self.global_step, "metrics": metrics,
                    "output_dir": str(self.output_dir)}
        finally:
            self._close_logs()

    def _plot_losses(self) -> None:
        from dpm_ops.visualize import plot_loss_curves

        jsonl = self.output_dir / "train_log.jsonl"
        if jsonl.is_file() and jsonl.stat().st_size:
            plot_loss_curves(str(jsonl), str(self.output_dir / "loss_curves.png"))


def evaluate_with_config(model: nn.Module, splits: ReIDSplits, config: dict, *, device: torch.device,
                         out_dir=None, pictures=None, progress=True,
                         log: Callable[[str], None] = print) -> Optional[dict]:
    """``evaluate_model`` with the config's ``eval`` section. Features are extracted under
    ``eval.amp`` (fp32 by default), never under the training's ``solver.amp``: the official code
    trains under fp16 autocast and tests in fp32."""
    from .evaluator import evaluate_model, format_metrics_table

    ev = config["eval"]
    info = distributed.current()
    options = dict(model_name=config["model"]["name"], image_size=tuple(config["input"]["size"]),
                   batch_size=ev["batch_size"], num_workers=ev["num_workers"], device=str(device),
                   amp_dtype=resolve_amp(ev["amp"], device), distance=ev["distance"], rerank=ev["rerank"],
                   k1=ev["k1"], k2=ev["k2"], lambda_value=ev["lambda_value"], max_rank=ev["max_rank"],
                   protocol=ev["protocol"], num_repeats=ev["cuhk03_repeats"], seed=ev["cuhk03_seed"],
                   multi_query=ev["multi_query"],
                   out_dir=str(out_dir) if out_dir is not None and info.is_main else None,
                   pictures=ev["pictures"] if pictures is None else pictures, progress=progress)
    was_training = model.training
    metrics = evaluate_model(model, splits, **options)  # every rank extracts a shard; rank 0 ranks
    model.train(was_training)
    if info.is_main and metrics is not None:
        log(f"evaluation on {splits.name} ({len(splits.query)} queries, {len(splits.gallery)} gallery):\n"
            + format_metrics_table(metrics))
    return metrics if info.is_main else None


def train(config: dict, output_dir: str | os.PathLike, *, resume: bool = False, **kwargs) -> dict:
    """Train (or resume) and evaluate; returns {"finished", "global_step", "metrics", "output_dir"}."""
    return Trainer(config, output_dir, resume=resume, **kwargs).run()
