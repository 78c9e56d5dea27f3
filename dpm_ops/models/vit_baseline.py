"""The comparison point for DPM: the same TransReID ViT with a BNNeck and a plain classifier,
trained with ID + soft-margin triplet losses, and no mask (TransReID's classifier: no bias,
N(0, 0.001) init)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .param_groups import bnneck, sgd_param_groups
from .vit import ViTReID


class ViTBaselineTrainOutput(NamedTuple):
    logits: torch.Tensor  # (B, K)
    feature: torch.Tensor  # (B, C) pre-BN CLS feature


class ViTBaseline(nn.Module):
    def __init__(
        self,
        num_classes: int,
        num_cameras: int = 0,
        *,
        img_size: Sequence[int] = (256, 128),
        patch_size: int = 16,
        stride: int = 11,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        sie_coef: float = 3.0,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError("the ViT baseline needs num_classes >= 1")
        self.backbone = ViTReID(
            img_size,
            patch_size,
            stride,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            num_cameras=num_cameras,
            sie_coef=sie_coef,
        )
        self.bottleneck = bnneck(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(
        self, images: torch.Tensor, cam_label: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None
    ):
        """Train mode: ``ViTBaselineTrainOutput(logits, feature)``; eval mode: the (B, C) feature.
        ``labels`` is accepted for the same call signature as DPM and not used."""
        feature = self.backbone(images, cam_label)
        if not self.training:
            return feature
        return ViTBaselineTrainOutput(self.classifier(self.bottleneck(feature)), feature)

    def optimizer_param_groups(
        self,
        base_lr: float = 0.008,
        weight_decay: float = 1e-4,
        bias_lr_factor: float = 2.0,
        weight_decay_bias: Optional[float] = None,
    ) -> list:
        return sgd_param_groups(self.named_parameters(), base_lr, weight_decay, bias_lr_factor, weight_decay_bias)
