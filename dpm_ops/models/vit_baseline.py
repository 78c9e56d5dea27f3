"""The comparison point for DPM: the same TransReID ViT with a BNNeck and a plain classifier,
trained with ID + soft-margin triplet losses, and no mask (TransReID's classifier: no bias,
N(0, 0.001) init)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ._checks import check_classifier, check_int, check_total_weights, check_train_batch
from .param_groups import bnneck, sgd_param_groups
from .vit import ViTReID, checked_vit_options


class ViTBaselineTrainOutput(NamedTuple):
    logits: torch.Tensor  # (B, K)
    feature: torch.Tensor  # (B, C) pre-BN CLS feature


class ViTBaseline(nn.Module):
    """``backbone_options`` are ``ViTReID``'s (img_size, patch_size, stride, embed_dim, depth, ...)."""

    passes_options_to = ViTReID  # **backbone_options: its keywords are this model's options too

    def __init__(self, num_classes: int, num_cameras: int = 0, **backbone_options):
        check_int("vit_baseline", "num_classes", num_classes, 1, why=" (the ID loss's classes)")
        vit, backbone = checked_vit_options("vit_baseline", num_cameras=num_cameras, **backbone_options)
        classifier = check_classifier("vit_baseline", num_classes, vit["embed_dim"])
        check_total_weights("vit_baseline", backbone=backbone, classifier=classifier)
        super().__init__()
        self.backbone = ViTReID(num_cameras=num_cameras, **backbone_options)
        embed_dim = self.backbone.embed_dim
        self.bottleneck = bnneck(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(
        self, images: torch.Tensor, cam_label: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None
    ):
        """Train mode: ``ViTBaselineTrainOutput(logits, feature)``; eval mode: the (B, C) feature.
        ``labels`` is accepted for the same call signature as DPM and not used."""
        check_train_batch("images", images, self.training)
        feature = self.backbone(images, cam_label)
        if not self.training:
            return feature
        return ViTBaselineTrainOutput(self.classifier(self.bottleneck(feature)), feature)

    def optimizer_param_groups(self, **options) -> list:
        """``sgd_param_groups`` of every parameter (``options``: its base_lr, weight_decay, ...)."""
        return sgd_param_groups(self.named_parameters(), **options)
