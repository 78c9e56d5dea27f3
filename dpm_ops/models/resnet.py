"""ResNet-50 (torchvision state-dict names) and MaskReID's ResNet-50 variant.

``MaskReIDResNet50`` is NOT the paper's network (whose trunk is DGD's inception net): it is a
ResNet-50-trunk variant, offered as a clearly labelled alternative.
Raw and masked images go through separate ResNet stems (``conv1``/``bn1``, both loadable from the
same ImageNet weights), are concatenated (128 channels) and mapped back to 64 channels by a 1x1
``stream_fuse`` conv initialised to the average of the two streams, so an ImageNet ResNet-50 trunk
(layer1..layer4) applies unchanged. Levels = layer2 / layer3 / layer4 (512 / 1024 / 2048), fused
like MaskReID (pool -> concat 3584 -> FC 256 -> BN -> L2). ``last_stride=1`` (the usual re-ID
choice) keeps layer4 at 1/16 resolution.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ._checks import check_choice, check_image_pair, check_int, check_int_list, check_total_weights, check_weights
from .maskreid import SkippedFusionHead, checked_head_options

MAX_BLOCKS = 64  # a stage's bottlenecks: ResNet-152's layer3 has 36
MAX_WIDTH = 512  # the stem's width: torchvision's 64, Wide ResNet's bottlenecks 128


def check_resnet_options(model: str, last_stride, layers, width) -> float:
    """ValueError naming the first of ResNet50's options out of range, else its estimated weight count."""
    # 2: torchvision's ResNet-50; 1: the re-ID choice (layer4 at 1/16). Larger strides skip pixels.
    check_choice(model, "last_stride", last_stride, (1, 2))
    layers = check_int_list(model, "layers", layers, 1, MAX_BLOCKS, length=4, why=" (blocks of layer1..layer4)")
    width = check_int(model, "width", width, 1, MAX_WIDTH)
    # a bottleneck of width w: 1x1 4w -> w, 3x3 w -> w, 1x1 w -> 4w, 17 w^2 weights; the stages double w
    weights = sum(blocks * 17 * (width * 2**stage) ** 2 for stage, blocks in enumerate(layers))
    return check_weights(model, weights, f"layers {list(layers)} at width {width}")


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 without ``fc`` (23,508,032 parameters); ``layers`` and ``width``
    only exist to build small versions for tests."""

    def __init__(self, last_stride: int = 2, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64):
        check_resnet_options("resnet50", last_stride, layers, width)
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = width
        strides = (1, 2, 2, last_stride)
        for index, (blocks, stride) in enumerate(zip(layers, strides)):
            stage_width = width * 2**index
            stage = []
            for block in range(blocks):
                stage.append(Bottleneck(channels, stage_width, stride if block == 0 else 1))
                channels = stage_width * Bottleneck.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
        self.level_channels = [width * 2**i * Bottleneck.expansion for i in range(4)]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(images)))

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """layer1..layer4 outputs from the (pre-max-pool) stem output."""
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.maxpool(self.stem(images)))[-1]


class ResNetStem(nn.Module):
    """conv1 + bn1 + ReLU, named like torchvision so the same ImageNet tensors load into it."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(images)))


class MaskReIDResNet50(nn.Module):
    """Modern MaskReID variant (not the paper's network); same call and outputs as ``MaskReID``.
    ``trunk`` holds torchvision's keys and runs the raw stream's stem. ``head_options`` are
    ``SkippedFusionHead``'s (embed_dim, skip, fuse_levels, level_norm)."""

    passes_options_to = SkippedFusionHead  # **head_options: its keywords are this model's options too

    def __init__(
        self,
        num_classes: int = 0,
        *,
        last_stride: int = 1,
        layers: Sequence[int] = (3, 4, 6, 3),
        width: int = 64,
        **head_options,
    ):
        trunk = check_resnet_options("maskreid_resnet50", last_stride, layers, width)
        classifier = checked_head_options("maskreid_resnet50", num_classes=num_classes, **head_options)
        check_total_weights("maskreid_resnet50", trunk=trunk, classifier=classifier)
        super().__init__()
        self.trunk = ResNet50(last_stride, layers, width)
        self.masked_stem = ResNetStem(width)
        self.stream_fuse = nn.Conv2d(2 * width, width, 1, bias=False)
        with torch.no_grad():
            identity = torch.eye(width).view(width, width, 1, 1)
            self.stream_fuse.weight.copy_(0.5 * torch.cat([identity, identity], 1))
        self.head = SkippedFusionHead(self.trunk.level_channels[1:], num_classes=num_classes, **head_options)

    def levels(self, raw: torch.Tensor, masked: torch.Tensor) -> list[torch.Tensor]:
        check_image_pair(raw, masked, self.stream_fuse.weight.dtype, training=self.training)
        x = self.stream_fuse(torch.cat([self.trunk.stem(raw), self.masked_stem(masked)], 1))
        return self.trunk.stages(self.trunk.maxpool(x))[1:]

    def forward(self, raw: torch.Tensor, masked: torch.Tensor):
        return self.head(self.levels(raw, masked))
