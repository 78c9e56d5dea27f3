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
    ``num_cameras`` (no camera input, as MaskReID) is built without it. An option the class does not take,
    or one it requires left out, is a ValueError naming it (Python's TypeError otherwise); a constructor
    whose ``**options`` go to no declared part (``passes_options_to``) takes any."""
    parameters = inspect.signature(model_class).parameters
    if not (_has_var_keyword(model_class) and getattr(model_class, "passes_options_to", None) is None):
        check_known_options(model_class.__name__, options, model_option_defaults(model_class))
    required = [name for name, p in _options(model_class).items() if p.default is p.empty and name not in options]
    if required:
        raise ValueError(f"{model_class.__name__}: option {required[0]} has no default; give it")
    if "num_cameras" in parameters:
        return model_class(num_classes, num_cameras, **options)
    return model_class(num_classes, **options)


def model_option_defaults(model_class: type[nn.Module]) -> dict:
    """The keyword options of ``model_class`` (all but num_classes, num_cameras) with their defaults, None for
    one it requires (any value: the class checks it); a constructor's ``**options`` are those of the part it
    passes them to (``passes_options_to``; none known without one)."""
    defaults = {name: None if p.default is p.empty else p.default for name, p in _options(model_class).items()}
    passes_to = getattr(model_class, "passes_options_to", None)
    if passes_to is not None and _has_var_keyword(model_class):
        # what the part requires, the class gives it (MaskReID its head's level_channels): no option of the class
        required = {name for name, p in _options(passes_to).items() if p.default is p.empty}
        part = {name: value for name, value in model_option_defaults(passes_to).items() if name not in required}
        return {**part, **defaults}
    return defaults


def _options(model_class: type[nn.Module]) -> dict:
    """The constructor's named options: its keyword parameters but num_classes and num_cameras."""
    parameters = inspect.signature(model_class).parameters
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p for n, p in parameters.items() if n not in ("num_classes", "num_cameras") and p.kind in keyword}


def _has_var_keyword(model_class: type[nn.Module]) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model_class).parameters.values())


def build_model(name: str, num_classes: int, num_cameras: int = 0, **options) -> nn.Module:
    """Build a model by name; ``options`` go to its class (e.g. ``stride=12, arcface_margin=0.3``).

    ``num_cameras`` sizes the ViT models' camera embedding (8 for (Occluded-)Duke, 6 for Market;
    0 or 1: none). MaskReID has no camera input and ignores it. ``num_classes`` is the number of
    training identities; for MaskReID, 0 builds no softmax head.
    """
    if not isinstance(name, str) or name not in MODELS:  # a list: unhashable, a TypeError
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return construct_model(MODELS[name], num_classes, num_cameras, **options)
