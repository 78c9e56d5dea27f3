"""``build_model(name, num_classes, num_cameras=0, **options)``."""

from __future__ import annotations

import torch.nn as nn

from .dpm import DPM
from .maskreid import MaskReID
from .resnet import MaskReIDResNet50
from .vit_baseline import ViTBaseline

MODEL_NAMES = ("dpm", "vit_baseline", "maskreid", "maskreid_resnet50")


def build_model(name: str, num_classes: int, num_cameras: int = 0, **options) -> nn.Module:
    """Build a model by name; ``options`` go to its class (e.g. ``stride=12, arcface_margin=0.3``).

    ``num_cameras`` sizes the ViT models' camera embedding (8 for (Occluded-)Duke, 6 for Market;
    0 or 1: none). MaskReID has no camera input and ignores it. ``num_classes`` is the number of
    training identities; for MaskReID, 0 builds no softmax head.
    """
    if name == "dpm":
        return DPM(num_classes, num_cameras, **options)
    if name == "vit_baseline":
        return ViTBaseline(num_classes, num_cameras, **options)
    if name == "maskreid":
        return MaskReID(num_classes, **options)
    if name == "maskreid_resnet50":
        return MaskReIDResNet50(num_classes, **options)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
