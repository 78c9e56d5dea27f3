"""MaskReID (arXiv 1804.03864 v1): the network of its Section 3 (the DGD inception trunk).

Raw and masked 144x56 images go through separate 3-layer stems (3x3, 32 channels, BN, ReLU), are
concatenated on channels (64) and max-pooled, then run through the DGD / JSTL inception trunk
(1a/1b, 2a/2b, 3a/3b). The outputs of 1b, 2b, 3b are the low / middle / high levels
(384x36x14, 768x18x7, 1536x9x4) fused by the skipped fusing layer:
``z = concat(pool(low), pool(mid), pool(high))`` (2688) -> FC 256 -> BN -> L2.

The paper leaves the skip operator open; ``skip`` chooses it ("avg" global average pooling, the
spec's default; "max"; "conv_avg": 1x1 conv + BN + ReLU on the low and middle levels, then average
pooling), ``level_norm`` an optional per-level "bn" or "l2" before the concat, and
``fuse_levels=False`` keeps the high level only (the paper's MaskReID-M).

Convolutions use Caffe's "xavier" filler (uniform ±sqrt(3 / fan_in)) with bias 0.2, as DGD.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpm_ops.ops import hierarchical_mask_pool

from ._checks import check_choice, check_classifier, check_image_pair, check_flag, check_int, check_int_list

SKIP_MODES = ("avg", "max", "conv_avg")
LEVEL_NORMS = (None, "bn", "l2")
# Bounds of the widths, far above the paper's, that keep the model's size in hand (its weights grow with their
# squares: 7 M at the paper's widths, 0.6 B at these bounds)
MAX_STEM_CHANNELS = 512  # the paper's 32
MAX_BASE_WIDTH = 512  # the paper's 64
MAX_EMBED_DIM = 8192  # the paper's 256


def caffe_xavier_(weight: torch.Tensor) -> torch.Tensor:
    """Caffe's XavierFiller (variance_norm FAN_IN): U(−sqrt(3/fan_in), sqrt(3/fan_in))."""
    fan_in = weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    return nn.init.uniform_(weight, -bound, bound)


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2)
        caffe_xavier_(conv.weight)
        nn.init.constant_(conv.bias, 0.2)
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InceptionA(nn.Module):
    """Stride 1: [1x1], [1x1, 3x3], [1x1, 3x3, 3x3], [avg-pool 3x3, 1x1], each ``width`` -> 4·width."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.branch1 = ConvBNReLU(in_channels, width, 1)
        self.branch2 = nn.Sequential(ConvBNReLU(in_channels, width, 1), ConvBNReLU(width, width))
        self.branch3 = nn.Sequential(
            ConvBNReLU(in_channels, width, 1), ConvBNReLU(width, width), ConvBNReLU(width, width)
        )
        self.branch4 = nn.Sequential(nn.AvgPool2d(3, 1, 1), ConvBNReLU(in_channels, width, 1))
        self.out_channels = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionB(nn.Module):
    """Stride 2: [1x1, 3x3/2], [1x1, 3x3, 3x3/2], [max-pool 3x3/2 pad 1] -> 2·width + in_channels.
    ``MaxPool2d(3, 2, 1)`` gives Caffe's ceil-mode shapes (72x28 -> 36x14 -> 18x7 -> 9x4)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.branch1 = nn.Sequential(ConvBNReLU(in_channels, width, 1), ConvBNReLU(width, width, stride=2))
        self.branch2 = nn.Sequential(
            ConvBNReLU(in_channels, width, 1), ConvBNReLU(width, width), ConvBNReLU(width, width, stride=2)
        )
        self.branch3 = nn.MaxPool2d(3, 2, 1)
        self.out_channels = 2 * width + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x)], 1)


def check_head_options(model: str, *, embed_dim, skip, fuse_levels, level_norm, num_classes) -> float:
    """ValueError naming the first of SkippedFusionHead's options out of range, else its classifier's weight
    count."""
    check_int(model, "embed_dim", embed_dim, 1, MAX_EMBED_DIM)
    check_choice(model, "skip", skip, SKIP_MODES)
    check_flag(model, "fuse_levels", fuse_levels)
    check_choice(model, "level_norm", level_norm, LEVEL_NORMS)
    check_int(model, "num_classes", num_classes, 0, why=" (0: no softmax head)")
    return check_classifier(model, num_classes, embed_dim)


def checked_head_options(model: str, **options) -> float:
    """check_head_options of SkippedFusionHead's keyword options, its defaults filled in (its classifier's weight
    count): what a model built on the head checks before allocating anything. An unknown option is a TypeError, as in the
    constructor."""
    bound = inspect.signature(SkippedFusionHead).bind_partial(**options)
    bound.apply_defaults()
    return check_head_options(
        model, **{name: value for name, value in bound.arguments.items() if name != "level_channels"}
    )


class MaskReIDTrainOutput(NamedTuple):
    embedding: torch.Tensor  # (B, D) L2-normalised descriptor (ranking loss, retrieval)
    logits: Optional[torch.Tensor]  # (B, K) softmax head on the pre-L2 feature, if built


class SkippedFusionHead(nn.Module):
    """Levels -> per-level pooled vectors -> concat -> FC -> BN1d -> (L2, optional softmax logits)."""

    def __init__(
        self,
        level_channels: Sequence[int],
        embed_dim: int = 256,
        skip: str = "avg",
        fuse_levels: bool = True,
        level_norm: Optional[str] = None,
        num_classes: int = 0,
    ):
        check_int_list("skipped_fusion_head", "level_channels", level_channels, 1)
        check_head_options(
            "skipped_fusion_head",
            embed_dim=embed_dim,
            skip=skip,
            fuse_levels=fuse_levels,
            level_norm=level_norm,
            num_classes=num_classes,
        )
        super().__init__()
        self.skip, self.level_norm, self.fuse_levels = skip, level_norm, fuse_levels
        self.level_channels = tuple(level_channels)
        channels = list(level_channels) if fuse_levels else [level_channels[-1]]
        # The skip paths (every level but the highest) get the extra block in "conv_avg" mode.
        self.skip_convs = nn.ModuleList(ConvBNReLU(c, c, 1) for c in channels[:-1]) if skip == "conv_avg" else None
        self.level_bns = nn.ModuleList(nn.BatchNorm1d(c) for c in channels) if level_norm == "bn" else None
        self.fc = nn.Linear(sum(channels), embed_dim)
        caffe_xavier_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.bn = nn.BatchNorm1d(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

    def _check_levels(self, levels) -> None:
        """The trunk's maps, one per level of level_channels: levels in another order were fused silently, a
        level fewer was a raw GEMM shape error, and without fuse_levels every level but the last went unread."""
        listed = isinstance(levels, (list, tuple))
        maps = list(levels) if listed else []
        channels = [t.shape[1] if isinstance(t, torch.Tensor) and t.dim() == 4 else None for t in maps]
        if not listed or channels != list(self.level_channels):
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in maps]
            got = shapes if listed else type(levels).__name__
            raise ValueError(
                f"skipped_fusion_head: levels must be {len(self.level_channels)} (B, C, H, W) maps of "
                f"{list(self.level_channels)} channels, got {got}"
            )

    def pool_levels(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check_levels(levels)
        levels = list(levels) if self.fuse_levels else [levels[-1]]
        if self.skip_convs is not None:
            levels = [conv(level) for conv, level in zip(self.skip_convs, levels)] + levels[len(self.skip_convs) :]
        # Every level's global average / max pool in one fused launch, already concatenated.
        pooled = hierarchical_mask_pool(levels, None, "max" if self.skip == "max" else "avg")
        if self.level_norm is None:
            return pooled
        vectors = pooled.split([level.shape[1] for level in levels], 1)
        if self.level_bns is not None:
            vectors = [bn(vector) for bn, vector in zip(self.level_bns, vectors)]
        else:
            vectors = [F.normalize(vector, dim=1) for vector in vectors]
        return torch.cat(vectors, 1)

    def forward(self, levels: Sequence[torch.Tensor]):
        feature = self.bn(self.fc(self.pool_levels(levels)))  # no ReLU: cosines may be negative
        embedding = F.normalize(feature, dim=1)
        if not self.training:
            return embedding
        logits = self.classifier(feature) if self.classifier is not None else None
        return MaskReIDTrainOutput(embedding, logits)


class MaskReID(nn.Module):
    """The paper's v1 network. ``model(raw, masked)``: eval mode returns the (B, 256) L2-normalised
    descriptor, train mode ``MaskReIDTrainOutput`` (logits only with ``num_classes > 0``, for softmax
    pre-training). ``stem_channels`` and ``base_width`` (32, 64 in the paper) shrink it for tests.
    ``head_options`` are ``SkippedFusionHead``'s (embed_dim, skip, fuse_levels, level_norm)."""

    passes_options_to = SkippedFusionHead  # **head_options: its keywords are this model's options too

    def __init__(
        self,
        num_classes: int = 0,
        *,
        stem_channels: int = 32,
        base_width: int = 64,
        **head_options,
    ):
        # the paper's 32 and 64; any width up to the bounds builds the same network
        check_int("maskreid", "stem_channels", stem_channels, 1, MAX_STEM_CHANNELS)
        check_int("maskreid", "base_width", base_width, 1, MAX_BASE_WIDTH)
        checked_head_options("maskreid", num_classes=num_classes, **head_options)
        super().__init__()
        self.raw_stem = self._stem(stem_channels)
        self.masked_stem = self._stem(stem_channels)
        self.pool1 = nn.MaxPool2d(2, 2)
        w = base_width
        self.inception_1a = InceptionA(2 * stem_channels, w)
        self.inception_1b = InceptionB(self.inception_1a.out_channels, w)
        self.inception_2a = InceptionA(self.inception_1b.out_channels, 2 * w)
        self.inception_2b = InceptionB(self.inception_2a.out_channels, 2 * w)
        self.inception_3a = InceptionA(self.inception_2b.out_channels, 4 * w)
        self.inception_3b = InceptionB(self.inception_3a.out_channels, 4 * w)
        level_channels = [
            self.inception_1b.out_channels,
            self.inception_2b.out_channels,
            self.inception_3b.out_channels,
        ]
        self.head = SkippedFusionHead(level_channels, num_classes=num_classes, **head_options)

    @staticmethod
    def _stem(channels: int) -> nn.Sequential:
        return nn.Sequential(ConvBNReLU(3, channels), ConvBNReLU(channels, channels), ConvBNReLU(channels, channels))

    def levels(self, raw: torch.Tensor, masked: torch.Tensor) -> list[torch.Tensor]:
        """Low, middle and high level maps (outputs of inception 1b, 2b, 3b)."""
        check_image_pair(raw, masked, self.masked_stem[0][0].weight.dtype, min_side=2, training=self.training)  # pool1
        x = self.pool1(torch.cat([self.raw_stem(raw), self.masked_stem(masked)], 1))
        low = self.inception_1b(self.inception_1a(x))
        middle = self.inception_2b(self.inception_2a(low))
        high = self.inception_3b(self.inception_3a(middle))
        return [low, middle, high]

    def forward(self, raw: torch.Tensor, masked: torch.Tensor):
        return self.head(self.levels(raw, masked))
