"""Model recipes: one module per model holds all that differs between models (building, optimizer
stages and schedules, samplers and transforms, the train step and its loss terms, the test-time
feature, transform and distance). ``RECIPES`` maps a model name to its recipe; the trainer, the
evaluator and the config read models only through it. A new model is a new module with a
:class:`Recipe` subclass and one line here."""

from __future__ import annotations

from typing import Optional

from .base import (
    Recipe,
    Stage,
    StepContext,
    ViTRecipe,
    loss_record,
    make_optimizer,
    model_cameras,
    param_group_options,
    scheduled_stage,
)
from .dpm import DPMRecipe
from .maskreid import MaskReIDRecipe, MaskReIDResNet50Recipe
from .vit_baseline import ViTBaselineRecipe

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe for recipe in (DPMRecipe(), ViTBaselineRecipe(), MaskReIDRecipe(), MaskReIDResNet50Recipe())
}


def model_names() -> tuple:
    return tuple(RECIPES)


def recipe_name_of(model) -> Optional[str]:
    """The name of the recipe whose ``model_class`` is nearest in ``model``'s class hierarchy (DPM, not the
    ViT baseline it extends); None for a model of no recipe."""
    mro = type(model).__mro__
    matches = [name for name, recipe in RECIPES.items() if recipe.model_class in mro]
    return min(matches, key=lambda name: mro.index(RECIPES[name].model_class)) if matches else None


def get_recipe(model_name: str) -> Recipe:
    """The recipe of ``model_name``; ValueError naming the known models for another name."""
    recipe = RECIPES.get(model_name) if isinstance(model_name, str) else None
    if recipe is None:
        raise ValueError(f"model_name must be one of {model_names()}, got {model_name!r}")
    return recipe


__all__ = [
    "RECIPES",
    "Recipe",
    "Stage",
    "StepContext",
    "ViTRecipe",
    "get_recipe",
    "recipe_name_of",
    "loss_record",
    "make_optimizer",
    "model_cameras",
    "model_names",
    "param_group_options",
    "scheduled_stage",
]
