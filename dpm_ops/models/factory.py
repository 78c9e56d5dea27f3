"""``build_model(name, num_classes, num_cameras=0, **options)`` and ``MODELS``, the one list of the
networks dpm_ops ships (the engine's recipes are checked against it by tests/test_engine_recipes.py)."""

from __future__ import annotations

import inspect

import torch.nn as nn

from .dpm import DPM
from .maskreid import MaskReID
from .resnet import MaskReIDResNet50
from .vit_baseline import ViTBaseline
from ._checks import check_known_options

MODELS: dict[str, type[nn.Module]] = {
    "dpm": DPM,
    "vit_baseline": ViTBaseline,
    "maskreid": MaskReID,
    "maskreid_resnet50": MaskReIDResNet50,
}
MODEL_NAMES = tuple(MODELS)


def construct_model(model_class: type[nn.Module], num_classes: int, num_cameras: int = 0, **options) -> nn.Module:
    """``model_class(num_classes, num_cameras, **options)``; a class whose constructor takes no
    ``num_cameras`` (no camera input, as MaskReID) is built without it. An option the class does not take
    is a ValueError naming it (Python's TypeError otherwise)."""
    check_known_options(model_class.__name__, options, model_option_defaults(model_class))
    if "num_cameras" in inspect.signature(model_class).parameters:
        return model_class(num_classes, num_cameras, **options)
    return model_class(num_classes, **options)


def model_option_defaults(model_class: type[nn.Module]) -> dict:
    """The keyword options of ``model_class`` (all but num_classes, num_cameras) with their defaults; a
    constructor's ``**options`` are those of the part it passes them to (``passes_options_to``)."""
    parameters = inspect.signature(model_class).parameters
    defaults = {
        name: p.default
        for name, p in parameters.items()
        if name not in ("num_classes", "num_cameras") and p.default is not p.empty
    }
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return {**model_option_defaults(model_class.passes_options_to), **defaults}
    return defaults


def build_model(name: str, num_classes: int, num_cameras: int = 0, **options) -> nn.Module:
    """Build a model by name; ``options`` go to its class (e.g. ``stride=12, arcface_margin=0.3``).

    ``num_cameras`` sizes the ViT models' camera embedding (8 for (Occluded-)Duke, 6 for Market;
    0 or 1: none). MaskReID has no camera input and ignores it. ``num_classes`` is the number of
    training identities; for MaskReID, 0 builds no softmax head.
    """
    if not isinstance(name, str) or name not in MODELS:  # a list: unhashable, a TypeError
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return construct_model(MODELS[name], num_classes, num_cameras, **options)
