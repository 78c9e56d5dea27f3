"""What every model recipe provides (:class:`Recipe`), and the solver pieces recipes share."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn as nn

from dpm_ops.data import build_transforms
from dpm_ops.models import construct_model, model_option_defaults

from ..schedules import LRSchedule

# a train step: (context, batch) -> {"loss": total, "loss/<term>": term, ...}, detached tensors
TrainStep = Callable[["StepContext", dict], dict]


@dataclasses.dataclass
class Stage:
    """One phase of training with its own step, sampler, optimizers and schedules."""

    name: str  # shown in the logs: "main" (DPM / baseline), "pretrain" / "ranking" (MaskReID)
    epochs: int
    sampler_kind: str
    optimizers: dict  # name -> optimizer; "main" is the one whose lr is logged
    schedules: dict  # name -> LRSchedule (only the scheduled optimizers)
    per_iteration_schedule: bool  # poly: stepped per iteration; warmup_cosine: per epoch
    step: TrainStep


@dataclasses.dataclass
class StepContext:
    """What a train step needs from the trainer: the (DDP-wrapped) model, its device, the AMP
    setting and the grad scaler."""

    model: nn.Module
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    scaler: torch.amp.GradScaler

    def to_device(self, batch: dict, *keys: str) -> tuple:
        return tuple(batch[key].to(self.device, non_blocking=True) for key in keys)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward_step(self, loss: torch.Tensor, *optimizers) -> None:
        """Backward of ``loss``, then a step of each optimizer; one scaler update."""
        self.scaler.scale(loss).backward()
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()


def loss_record(total: torch.Tensor, terms: dict) -> dict:
    """The dict a train step returns: the total as ``loss`` and each term as ``loss/<name>``."""
    return {"loss": total.detach(), **{f"loss/{name}": value.detach() for name, value in terms.items()}}


def make_optimizer(config: dict, groups: list) -> torch.optim.Optimizer:
    """SGD with the solver's momentum (the papers' recipes), or AdamW (an option)."""
    if config["solver"]["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=config["solver"]["momentum"])


def param_group_options(config: dict) -> dict:
    solver = config["solver"]
    return dict(
        weight_decay=solver["weight_decay"],
        bias_lr_factor=solver["bias_lr_factor"],
        weight_decay_bias=solver["weight_decay_bias"],
    )


def scheduled_stage(
    config: dict,
    name: str,
    optimizers: dict,
    sampler_kind: str,
    iters_per_epoch: dict,
    step: TrainStep,
    *,
    section: str = "solver",
) -> Stage:
    """A stage whose "main" optimizer follows ``section``'s schedule (solver or pretrain) over its
    epochs; the warmup and shape parameters always come from ``solver``."""
    solver, own = config["solver"], config[section]
    kind, epochs = own["schedule"], own["epochs"]
    total = epochs * iters_per_epoch[sampler_kind] if kind == "poly" else epochs
    schedule = LRSchedule(
        optimizers["main"],
        kind,
        total,
        base_lr=own["base_lr"],
        warmup=solver["warmup_epochs"],
        warmup_factor=solver["warmup_factor"],
        min_lr_factor=solver["min_lr_factor"],
        power=solver["poly_power"],
    )
    return Stage(name, epochs, sampler_kind, optimizers, {"main": schedule}, kind == "poly", step)


class Recipe:
    """Everything that differs between models. Subclasses set the class attributes and implement
    :meth:`build`, :meth:`build_stages` and :meth:`test_forward`; a registry line in
    ``recipes/__init__.py`` makes the model known to the config, the trainer and the evaluator."""

    name: str
    model_class: type  # its constructor's keyword arguments are the config's model.options
    transform_recipe: str = "dpm"  # dpm_ops.data.build_transforms recipe (config input.recipe)
    default_test_size: tuple = (256, 128)  # the network input when the evaluator is given none
    uses_masks: bool = False  # the model reads the foreground mask (paired image + mask items)
    sampler_kinds: tuple = ("pk",)  # samplers the stages may use (those the config's stages use are built)
    has_pretrain_stage: bool = False  # config section pretrain applies
    test_distance: str = "euclidean"  # the metric eval.distance "auto" stands for
    test_masks: bool = False  # test_forward returns a channel mask (distance masked_arccos)
    # the test transform resizes to input.size + this margin, then centre-crops input.size; training
    # resizes to input.resize, which must then be the same (None: no resize before the crop)
    test_resize_margin: Optional[tuple] = None
    # the config's input keys the train transforms read, with their defaults (None: derived by the config check)
    train_input_defaults: dict = {"padding": 10, "erasing": 0.5, "color_jitter": False}
    eval_time_options: tuple = ()  # model options that change only eval mode: `dpm-reid eval` takes the config's
    min_classes: int = 1  # the fewest classes the model takes (0: it can be built without a classifier)
    # the loss / solver keys of one model that its stages read (another model's, off its default, is refused)
    config_keys: tuple = ()

    def pk_mining_loss(self, config: dict) -> Optional[tuple[str, str]]:
        """(the loss, how else to leave it out) where a loss of the P x K batches mines each anchor's positives (its
        identity's other images) and negatives (the other identities) in the batch (under DDP the whole batch:
        distributed.gather_batch); None otherwise."""
        return None

    def option_defaults(self) -> dict:
        """The model options the config accepts, with their defaults."""
        return model_option_defaults(self.model_class)

    def build(self, num_classes: int, num_cameras: int, **options) -> nn.Module:
        return construct_model(self.model_class, num_classes, num_cameras, **options)

    def model_options(self, config: dict) -> dict:
        """The options a run builds its model with: the config's model.options (and input.size). Checked by
        building the model on the meta device before any data is read (builders.check_model_options), so a
        recipe's model_arguments takes its options from here."""
        options = dict(config["model"]["options"])
        options.setdefault("img_size", list(config["input"]["size"]))
        return options

    def model_arguments(self, config: dict, splits) -> dict:
        """{"num_classes", "num_cameras", "options"} of the model trained on ``splits``, as the
        checkpoint stores them."""
        return {
            "num_classes": splits.num_train_pids,
            "num_cameras": splits.num_cams,
            "options": self.model_options(config),
        }

    def find_unused_parameters(self, model_args: dict) -> bool:
        """DDP: some parameters sit idle in some stage."""
        return False

    def train_transform(self, config: dict):
        inp = config["input"]
        return build_transforms(
            "dpm",
            train=True,
            size=tuple(inp["size"]),
            padding=inp["padding"],
            flip=inp["flip"],
            erasing=inp["erasing"],
            color_jitter=inp["color_jitter"],
        )

    def build_stages(self, model: nn.Module, config: dict, iters_per_epoch: dict) -> list[Stage]:
        raise NotImplementedError

    # -- test time

    def test_transform(self, image_size: Optional[tuple]):
        return build_transforms("dpm", train=False, size=self.test_input_size(image_size))

    def test_resize(self, size) -> Optional[tuple]:
        """The resize the test transform takes before centre-cropping ``size`` (None: no crop)."""
        margin = self.test_resize_margin
        return None if margin is None else (size[0] + margin[0], size[1] + margin[1])

    def eval_input_size(self, model: nn.Module, image_size: Optional[tuple]) -> Optional[tuple]:
        """The image_size evaluate_model's test transform takes for ``model``: the given one, or None (the recipe's)."""
        return image_size

    def test_input_size(self, image_size: Optional[tuple]) -> tuple:
        """The network input actually used (for metrics.json)."""
        return tuple(image_size) if image_size is not None else self.default_test_size

    def test_forward(self, model: nn.Module, batch: dict, device: torch.device) -> tuple:
        """(features (B, D), channel masks (B, D) or None) of an evaluation batch, before L2 normalisation."""
        raise NotImplementedError

    # -- export (dpm_ops.export): the eval forward as an ONNX graph

    export_outputs: tuple = ("feature",)  # names of the eval forward's outputs, in order

    def export_input_size(self, model: nn.Module, image_size: Optional[tuple]) -> tuple:
        """(height, width) of the exported graph's images; ValueError for a size the model cannot take."""
        return self.test_input_size(image_size)

    def export_inputs(self, model: nn.Module, image_size: tuple, batch: int, generator: torch.Generator) -> dict:
        """Named random example inputs (CPU) of the eval forward, in its argument order: ``images``
        (B, 3, H, W) and, for a model with a camera embedding, 0-based ``camids`` (B,)."""
        images = torch.randn(batch, 3, *image_size, generator=generator)
        cameras = model_cameras(model)
        if not cameras:
            return {"images": images}
        return {"images": images, "camids": torch.randint(0, cameras, (batch,), generator=generator)}


class ViTRecipe(Recipe):
    """The ViT models (DPM, the baseline): images and camera ids in; the position embedding fixes
    the input size."""

    def pk_mining_loss(self, config: dict) -> Optional[tuple[str, str]]:
        weight = config["loss"]["triplet_weight"]  # the batch-hard triplet
        return (f"the triplet loss (loss.triplet_weight {weight})", "loss.triplet_weight=0") if weight else None

    @staticmethod
    def train_forward(ctx: StepContext, batch: dict, criterion: nn.Module, optimizer) -> tuple:
        """``optimizer``'s gradients zeroed, then one forward of ``batch`` under autocast: the inputs
        (images, cams, pids) on the device, the criterion's loss terms and their total."""
        images, pids, cams = ctx.to_device(batch, "image", "pid", "camid")
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            terms = criterion.terms(ctx.model(images, cams, pids), pids)
            total = criterion.total(terms)
        return (images, cams, pids), terms, total

    def test_forward(self, model: nn.Module, batch: dict, device: torch.device) -> tuple:
        images, camids = (batch[key].to(device, non_blocking=True) for key in ("image", "camid"))
        output = model(images, cam_label=camids)
        return tuple(output) if self.test_masks else (output, None)

    def eval_input_size(self, model: nn.Module, image_size: Optional[tuple]) -> Optional[tuple]:
        return self.export_input_size(model, image_size)  # the model's own (a 128x64 model failed on 256x128)

    def export_input_size(self, model: nn.Module, image_size: Optional[tuple]) -> tuple:
        own = tuple(model.backbone.patch_embed.img_size)
        if image_size is not None and tuple(image_size) != own:
            raise ValueError(
                f"image_size {image_size} differs from the model's input size {own} (its position embedding fixes it)"
            )
        return own


def model_cameras(model: nn.Module) -> int:
    """Rows of the SIE camera embedding the camera ids index (0: the model takes no camera)."""
    embedding = getattr(getattr(model, "backbone", None), "sie_embed", None)
    return 0 if embedding is None else int(embedding.shape[0])
