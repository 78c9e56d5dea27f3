"""A fifth model is one recipe module and one registry line: a toy recipe trains one epoch on the
synthetic set through the normal ``train()`` path and is evaluated, its checkpoint too."""

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpm_ops.data.synth import generate_synthetic_dataset
from dpm_ops.engine import RECIPES, Hook, evaluate_checkpoint, load_config, train
from dpm_ops.engine.recipes import Recipe, loss_record, make_optimizer, scheduled_stage
from dpm_ops.models import MODELS
from engine_utils import tiny_config, tiny_synth_config, write_config


class ToyNet(nn.Module):
    """One strided conv and a global average pool: a (B, width) feature and, in train mode, logits."""

    def __init__(self, num_classes: int, num_cameras: int = 0, *, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, images):
        feature = self.features(images)
        return (feature, self.classifier(feature)) if self.training else feature


class ToyRecipe(Recipe):
    """What a new model's module holds: its network, its stages with their train step, its test feature."""

    name = "toy"
    model_class = ToyNet

    def model_options(self, config):  # no img_size: ToyNet takes any input size
        return dict(config["model"]["options"])

    def build_stages(self, model, config, iters_per_epoch):
        optimizer = make_optimizer(config, [{"params": list(model.parameters()), "lr": config["solver"]["base_lr"]}])

        def step(ctx, batch):
            images, pids = ctx.to_device(batch, "image", "pid")
            optimizer.zero_grad(set_to_none=True)
            with ctx.autocast():
                loss = F.cross_entropy(ctx.model(images)[1], pids)
            ctx.backward_step(loss, optimizer)
            return loss_record(loss, {"id": loss})

        return [scheduled_stage(config, "main", {"main": optimizer}, "pk", iters_per_epoch, step)]

    def test_forward(self, model, batch, device):
        return model(batch["image"].to(device)), None


class Calls(Hook):
    def __init__(self):
        self.steps, self.epochs = [], []

    def after_step(self, trainer, at, losses):
        self.steps.append(trainer.global_step)

    def after_epoch(self, trainer, at):
        self.epochs.append(at.run_epoch)


def test_a_toy_recipe_trains_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.setitem(RECIPES, "toy", ToyRecipe())  # the registry line
    root = generate_synthetic_dataset(tmp_path / "set", tiny_synth_config(), progress=False)
    config = tiny_config(root, "dpm", solver={"base_lr": 0.01, "epochs": 1, "warmup_epochs": 0})
    config["model"] = {"name": "toy", "options": {"width": 8}}
    config = load_config(str(write_config(tmp_path / "toy.yaml", config)))

    calls = Calls()
    result = train(config, tmp_path / "run", hooks=[calls])
    assert result["finished"] and result["global_step"] > 0
    assert calls.steps == list(range(1, result["global_step"] + 1)) and calls.epochs == [1]
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert records and all(r["loss"] == r["loss/id"] for r in records)
    assert {"all", "clean", "occluded"} <= set(result["metrics"])

    metrics, output = evaluate_checkpoint(config, tmp_path / "run" / "checkpoints" / "final.pt")
    assert metrics == result["metrics"]
    assert json.loads((output / "metrics.json").read_text())["settings"]["model"] == "toy"
    assert torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=False)["model_name"] == "toy"


def test_every_shipped_model_has_its_recipe_and_no_recipe_another_network():
    """MODELS (dpm_ops.models) is the one list of networks; the recipe registry follows it."""
    assert list(RECIPES) == list(MODELS)
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.model_class is MODELS[name], name


def test_a_new_models_required_and_free_options():
    """A required keyword option was refused as unknown (its options: an empty list); a constructor with **options
    and no passes_options_to was an AttributeError."""
    import pytest

    from dpm_ops.models import construct_model, model_option_defaults

    class Required(nn.Module):
        def __init__(self, num_classes, num_cameras=0, *, width, depth=2):
            super().__init__()
            self.width, self.depth = width, depth

    class Free(nn.Module):
        def __init__(self, num_classes, **options):
            super().__init__()
            self.options = options

    assert model_option_defaults(Required) == {"width": None, "depth": 2}  # None: any value, the class checks it
    assert construct_model(Required, 10, 0, width=8).width == 8
    with pytest.raises(ValueError, match="^Required: option width has no default; give it$"):
        construct_model(Required, 10, 0, depth=3)
    with pytest.raises(ValueError, match="^Required takes no option 'widht'; its options: width, depth"):
        construct_model(Required, 10, 0, widht=8)
    assert model_option_defaults(Free) == {} and construct_model(Free, 10, 0, anything=1).options == {"anything": 1}
    # what a wrapped part requires, its wrapper gives it: no option (MaskReID's head's level_channels)
    with pytest.raises(ValueError, match="^MaskReID takes no option 'level_channels'"):
        construct_model(MODELS["maskreid"], 10, 0, level_channels=[64])
