"""DPM (its official code's losses and solver): two optimizers and a two-pass update; the
query-masked arccos distance at test.

Two SGD optimizers (momentum 0.9, biases at ``bias_lr_factor`` x lr, weight decay on every
parameter). Per iteration, pass 1 steps everything but the mask generator; pass 2 is a fresh
forward/backward that steps only the mask generator, at a constant lr (no scheduler). The main
optimizer follows the solver's schedule. One AMP grad scaler (fp16 only) is shared and updated
after each step. ``solver.two_pass=false``: one forward, both optimizers step on its gradients.
"""

from __future__ import annotations

from dpm_ops.losses import DPMLoss
from dpm_ops.models import DPM

from .. import distributed
from .base import StepContext, ViTRecipe, loss_record, make_optimizer, param_group_options, scheduled_stage


class DPMRecipe(ViTRecipe):
    name = "dpm"
    model_class = DPM
    test_distance = "masked_arccos"
    test_masks = True
    eval_time_options = ("neck_feat",)
    export_outputs = ("feature", "mask")
    config_keys = (
        "loss.hem_weight",
        "loss.id_weight",
        "loss.triplet_weight",
        "loss.plain_weight",
        "loss.masked_weight",
        "solver.mask_lr",
        "solver.two_pass",
    )

    def model_options(self, config: dict) -> dict:
        options = super().model_options(config)
        options.setdefault("loss_inputs", True)  # train mode hands DPMLoss the fused ArcFace CE's inputs
        return options

    def build_stages(self, model, config: dict, iters_per_epoch: dict) -> list:
        solver, common = config["solver"], param_group_options(config)
        main = make_optimizer(config, model.optimizer_param_groups(base_lr=solver["base_lr"], **common).main)
        mask_lr = solver["mask_lr"] if solver["mask_lr"] is not None else solver["base_lr"]
        mask = make_optimizer(config, model.optimizer_param_groups(base_lr=mask_lr, **common).mask_generator)
        loss = config["loss"]
        # HEM is summed over the batch; DDP averages the ranks' gradients, which divided its weight by the
        # number of processes: times world_size, a rank's share weighs as in one process of the whole batch
        hem_weight = loss["hem_weight"] * distributed.current().world_size
        criterion = DPMLoss(
            hem_weight,
            loss["id_weight"],
            loss["triplet_weight"],
            loss["plain_weight"],
            loss["masked_weight"],
            triplet_batch=distributed.gather_batch,  # under DDP it mines over every rank's share
        )
        two_pass = solver["two_pass"]

        def step(ctx: StepContext, batch: dict) -> dict:
            (images, cams, pids), terms, total = self.train_forward(ctx, batch, criterion, main)
            if not two_pass:
                mask.zero_grad(set_to_none=True)
                ctx.backward_step(total, main, mask)
                return loss_record(total, terms)
            ctx.backward_step(total, main)  # pass 1: backbone, classifier, BNNeck
            mask.zero_grad(set_to_none=True)
            with ctx.autocast():  # pass 2: fresh forward with the updated backbone
                second = criterion(ctx.model(images, cams, pids), pids)
            ctx.backward_step(second, mask)  # mask generator only
            return loss_record(total, {**terms, "pass2": second})

        return [scheduled_stage(config, "main", {"main": main, "mask": mask}, "pk", iters_per_epoch, step)]
