"""MaskReID (arXiv 1804.03864 v1, training and test) and its ResNet-50 variant: raw + foreground-masked inputs;
``pretrain.epochs`` of softmax (ID cross-entropy) pre-training, then ``solver.epochs`` of the ranking
loss (Eq. 5) on the ``sampler.kind`` batches (1 id x 10 + 54 singles) or, ``loss.maskreid_loss: triplet``, the
batch-hard soft-margin triplet on P x K batches (Table 2's MaskReID_trip), each stage with its own SGD
and schedule (``solver.epochs: 0``: the softmax stage alone); Euclidean distance of the (unit-length) 256-d
descriptor at test.

Both networks share this recipe: they differ only in the trunk (``MaskReIDRecipe.model_class``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpm_ops.data import build_transforms, masked_image
from dpm_ops.losses import MaskReIDRankingLoss, batch_hard_soft_margin_triplet
from dpm_ops.models import MaskReID, MaskReIDResNet50
from dpm_ops.models.param_groups import sgd_param_groups

from .. import distributed
from .base import Recipe, StepContext, loss_record, make_optimizer, param_group_options, scheduled_stage

# DGD / MaskReID test geometry: resize, then centre crop of (resize - margin)
TEST_CROP = (144, 56)
TEST_MARGIN = (16, 8)


class MaskReIDRecipe(Recipe):
    name = "maskreid"
    config_keys = (
        "loss.maskreid_loss",
        "loss.ranking_alpha",
        "loss.ranking_lambda",
        "loss.ranking_neg_mode",
        "loss.ranking_pos_mode",
    )
    model_class = MaskReID
    transform_recipe = "maskreid"
    default_test_size = TEST_CROP
    test_resize_margin = TEST_MARGIN
    train_input_defaults = {"resize": None, "erasing": 0.0}  # resize: input.size + TEST_MARGIN; no erasing (DGD's)
    uses_masks = True
    sampler_kinds = ("pk", "maskreid")
    has_pretrain_stage = True
    min_classes = 0  # the softmax head exists only for the pre-training stage

    def pk_mining_loss(self, config: dict):
        if config["sampler"]["kind"] != "pk":  # the pre-training's softmax alone takes them: no negatives
            return None
        if config["loss"]["maskreid_loss"] == "triplet":
            return "the triplet loss (loss.maskreid_loss triplet)", "loss.maskreid_loss=ranking"
        return "the ranking loss (sampler.kind pk)", "sampler.kind=maskreid"

    def model_options(self, config: dict) -> dict:
        return dict(config["model"]["options"])  # no img_size: convolutional, any input size

    def model_arguments(self, config: dict, splits) -> dict:
        # the softmax head exists only for the pre-training stage
        num_classes = splits.num_train_pids if config["pretrain"]["epochs"] > 0 else 0
        return {"num_classes": num_classes, "num_cameras": 0, "options": self.model_options(config)}

    def find_unused_parameters(self, model_args: dict) -> bool:
        return model_args["num_classes"] > 0  # the softmax head sits idle in the ranking stage

    def train_transform(self, config: dict):
        inp = config["input"]
        return build_transforms(
            "maskreid",
            train=True,
            resize=tuple(inp["resize"]),
            crop=tuple(inp["size"]),
            flip=inp["flip"],
            erasing=inp["erasing"],
        )

    def build_stages(self, model, config: dict, iters_per_epoch: dict) -> list:
        common, stages = param_group_options(config), []
        pre = config["pretrain"]
        if pre["epochs"] > 0:
            optimizer = make_optimizer(config, sgd_param_groups(model.named_parameters(), pre["base_lr"], **common))

            def softmax_step(ctx: StepContext, batch: dict) -> dict:
                images, masked, pids = ctx.to_device(batch, "image", "masked", "pid")
                optimizer.zero_grad(set_to_none=True)
                with ctx.autocast():
                    loss = F.cross_entropy(ctx.model(images, masked).logits.float(), pids)
                ctx.backward_step(loss, optimizer)
                return loss_record(loss, {"softmax": loss})

            stages.append(
                scheduled_stage(
                    config,
                    "pretrain",
                    {"main": optimizer},
                    pre["sampler"],
                    iters_per_epoch,
                    softmax_step,
                    section="pretrain",
                )
            )
        if config["solver"]["epochs"] == 0:  # the softmax stage alone (the paper's Table 1 runs, MaskReID_soft)
            return stages
        # the softmax head is not trained by the ranking (or triplet) loss
        params = [(n, p) for n, p in model.named_parameters() if ".classifier." not in f".{n}"]
        main_optimizer = make_optimizer(config, sgd_param_groups(params, config["solver"]["base_lr"], **common))
        loss, kind = config["loss"], config["sampler"]["kind"]
        if loss["maskreid_loss"] == "triplet":  # Table 2's MaskReID_trip: Hermans' batch-hard soft-margin triplet
            term = "triplet"

            def criterion(embedding, pids):  # under DDP it mines over every rank's share, as one process would
                return batch_hard_soft_margin_triplet(*distributed.gather_batch(embedding, pids))

        else:
            term, criterion = (
                "ranking",
                MaskReIDRankingLoss(
                    alpha=loss["ranking_alpha"],
                    lam=loss["ranking_lambda"],
                    neg_mode=loss["ranking_neg_mode"],
                    pos_mode=loss["ranking_pos_mode"],
                    # under DDP a P x K batch is split over the ranks: it mines over every rank's share; a MaskReID batch
                    # is one ranking problem, each rank's own (gathered, the ranks' problems would mine one another's)
                    ranking_batch=distributed.gather_batch if kind == "pk" else None,
                ),
            )

        def main_step(ctx: StepContext, batch: dict) -> dict:
            images, masked, pids = ctx.to_device(batch, "image", "masked", "pid")
            main_optimizer.zero_grad(set_to_none=True)
            with ctx.autocast():
                value = criterion(ctx.model(images, masked).embedding, pids)
            ctx.backward_step(value, main_optimizer)
            return loss_record(value, {term: value})

        stages.append(scheduled_stage(config, term, {"main": main_optimizer}, kind, iters_per_epoch, main_step))
        return stages

    def test_transform(self, image_size):
        crop = self.test_input_size(image_size)
        return build_transforms("maskreid", train=False, resize=self.test_resize(crop), crop=crop)

    def test_forward(self, model, batch: dict, device):
        images, masked = (batch[key].to(device, non_blocking=True) for key in ("image", "masked"))
        return model(images, masked), None

    def export_inputs(self, model, image_size: tuple, batch: int, generator) -> dict:
        """``raw`` and ``masked`` (B, 3, H, W): ``masked`` is ``raw`` times a random {0, 1} foreground."""
        images = torch.randn(batch, 3, *image_size, generator=generator)
        foreground = (torch.rand(batch, 1, *image_size, generator=generator) > 0.3).float()
        return {"raw": images, "masked": masked_image(images, foreground)}


class MaskReIDResNet50Recipe(MaskReIDRecipe):
    name = "maskreid_resnet50"
    model_class = MaskReIDResNet50
