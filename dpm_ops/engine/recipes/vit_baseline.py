"""The ViT baseline (TransReID without JPM): one optimizer, ID + soft-margin triplet, the solver's
schedule; Euclidean distance of the L2-normalised pre-BN CLS features at test."""

from __future__ import annotations

from dpm_ops.losses import BaselineReIDLoss
from dpm_ops.models import ViTBaseline

from .. import distributed
from .base import StepContext, ViTRecipe, loss_record, make_optimizer, param_group_options, scheduled_stage


class ViTBaselineRecipe(ViTRecipe):
    name = "vit_baseline"
    config_keys = ("loss.id_weight", "loss.triplet_weight")
    model_class = ViTBaseline

    def build_stages(self, model, config: dict, iters_per_epoch: dict) -> list:
        main = make_optimizer(
            config, model.optimizer_param_groups(base_lr=config["solver"]["base_lr"], **param_group_options(config))
        )
        criterion = BaselineReIDLoss(
            config["loss"]["id_weight"],
            config["loss"]["triplet_weight"],
            triplet_batch=distributed.gather_batch,  # under DDP it mines over every rank's share
        )

        def step(ctx: StepContext, batch: dict) -> dict:
            _, terms, total = self.train_forward(ctx, batch, criterion, main)
            ctx.backward_step(total, main)
            return loss_record(total, terms)

        return [scheduled_stage(config, "main", {"main": main}, "pk", iters_per_epoch, step)]
