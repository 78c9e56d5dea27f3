"""DPM: Dynamic Prototype Mask for occluded person re-ID (ACM MM 2022), after the official code (stone96123/DPM).

Structure (parameter names in brackets):

* ``backbone`` [backbone.*]: TransReID ViT-B/16, overlapping patches, camera SIE (``vit.py``);
* ``mask_generator`` [mask_generator.conv_stack.*, mask_generator.attfc.*]: the Hierarchical Mask
  Generator, turning the pre-LN patch tokens after blocks 2, 4, 10, 12 into a soft channel mask
  ``m ∈ (0,1)^C``;
* ``bottleneck`` [bottleneck.*]: BNNeck, bias frozen;
* ``classifier`` [classifier.weight]: (K, C) prototypes, xavier init, no bias, shared by the plain
  logits ``f_bn Wᵀ`` and the masked-cosine ArcFace logits.

``backbone`` + ``mask_generator`` is the test-time model (144,832,512 parameters for ViT-B/16,
stride 11, 8 cameras). The official unused 1000-way ``base.fc`` is not carried.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from dpm_ops.ops._checks import check_label_range, check_labels
from dpm_ops.ops.masked_arcface_reference import masked_arcface_logits
from dpm_ops.ops import hierarchical_mask_pool

from ._checks import (
    MAX_COEFFICIENT,
    check_choice,
    check_flag,
    check_int,
    check_int_list,
    check_real,
    check_train_batch,
    check_classifier,
    check_total_weights,
    check_weights,
    quote,
)
from .param_groups import bnneck, sgd_param_groups
from .vit import ViTReID, checked_vit_options, patch_grid


NECK_FEATS = ("before", "after")


class ConvBNReLU(nn.Sequential):
    """3x3 conv (with bias) + BN + ReLU; indices 0 / 1 match the official ``conv3x3_block``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )


class GlobalMaxPool(nn.Module):
    """``AdaptiveMaxPool2d(1)`` + flatten: (B, C, H, W) -> (B, C), by the fused pooling op (a tied
    maximum shares its gradient, as ``amax``; after the ReLU ties are at 0, where no gradient flows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hierarchical_mask_pool([x], None, "max")


class HierarchicalMaskGenerator(nn.Module):
    """Tapped token grids, concatenated on channels (in tap order) ->
    conv(L·C→2C)+BN+ReLU, maxpool 2 -> conv(2C→C)+BN+ReLU, maxpool 2 -> conv(C→C)+BN+ReLU,
    global max-pool -> ``attfc`` (zero init) -> sigmoid.

    Convs and BNs keep PyTorch's default init (the official ``_init_weights`` skips them); the zero
    ``attfc`` makes the mask exactly 0.5 at start, so the masked cosine starts as the plain cosine.
    """

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], num_levels: int = 4):
        check_int("hierarchical_mask_generator", "embed_dim", embed_dim, 1)
        check_int("hierarchical_mask_generator", "num_levels", num_levels, 1, why=" (tapped blocks)")
        grid_size = check_int_list("hierarchical_mask_generator", "grid_size", grid_size, 1, length=2)
        super().__init__()
        if min(grid_size) < 4:
            raise ValueError(f"patch grid {grid_size} is too small for two 2x2 max-pools")
        self.grid_size, self.embed_dim, self.num_levels = grid_size, embed_dim, num_levels
        self.conv_stack = nn.Sequential(
            ConvBNReLU(num_levels * embed_dim, 2 * embed_dim),
            nn.MaxPool2d(2, 2),
            ConvBNReLU(2 * embed_dim, embed_dim),
            nn.MaxPool2d(2, 2),
            ConvBNReLU(embed_dim, embed_dim),
            GlobalMaxPool(),
        )
        self.attfc = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.attfc.weight)
        nn.init.zeros_(self.attfc.bias)

    def forward(self, tapped_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check_tokens(tapped_tokens)
        grids = [tokens.transpose(1, 2).unflatten(2, self.grid_size) for tokens in tapped_tokens]
        pooled = self.conv_stack(torch.cat(grids, dim=1))  # (B, C): no squeeze, B may be 1
        return torch.sigmoid(self.attfc(pooled))

    def _check_tokens(self, tapped_tokens) -> None:
        """One (B, tokens, C) grid per level: another count or width was a raw convolution error, another token
        count a raw unflatten one."""
        shape = (self.grid_size[0] * self.grid_size[1], self.embed_dim)
        grids = tapped_tokens if isinstance(tapped_tokens, (list, tuple)) else None
        if grids is None or len(grids) != self.num_levels or not all(_is_grid(t, shape) for t in grids):
            got = [tuple(getattr(t, "shape", ())) for t in grids] if grids is not None else type(tapped_tokens).__name__
            raise ValueError(
                f"hierarchical_mask_generator: tapped_tokens must be {self.num_levels} (B, {shape[0]}, {shape[1]}) "
                f"token grids, got {quote(got)}"
            )


def _is_grid(tokens, shape: tuple[int, int]) -> bool:
    return isinstance(tokens, torch.Tensor) and tokens.dim() == 3 and tuple(tokens.shape[1:]) == shape


class DPMTrainOutput(NamedTuple):
    plain_logits: torch.Tensor  # (B, K) f_bn Wᵀ
    masked_logits: torch.Tensor  # (B, K) s·ArcFace(masked cosine); margin on the target iff labels given
    feature: torch.Tensor  # (B, C) pre-BN CLS feature (triplet loss, test descriptor)
    mask: torch.Tensor  # (B, C) soft channel mask
    hem_logits: torch.Tensor  # (B, heads, N) last block's pre-softmax CLS->patch logits
    margin_labels: Optional[torch.Tensor] = None  # the labels given to forward (None: no margin; DPMLoss refuses)


class DPMLossInputs(NamedTuple):
    """Train output with ``loss_inputs=True``: what the fused ID loss needs instead of the logits
    (``DPMLoss`` computes both CE branches from it with ``dpm_ops.ops.masked_arcface_ce``)."""

    bn_feature: torch.Tensor  # (B, C) BNNeck feature f_bn
    mask: torch.Tensor  # (B, C) soft channel mask
    weight: torch.Tensor  # (K, C) classifier weight = prototypes
    feature: torch.Tensor  # (B, C) pre-BN CLS feature (triplet loss)
    hem_logits: torch.Tensor  # (B, heads, N)
    scale: float  # the model's ArcFace s, m and easy_margin
    margin: float
    easy_margin: bool


class DPMEvalOutput(NamedTuple):
    feature: torch.Tensor  # (B, C) pre-BN CLS feature
    mask: torch.Tensor  # (B, C)


class DPMParamGroups(NamedTuple):
    main: list  # backbone, classifier, BNNeck weight: the scheduled optimizer
    mask_generator: list  # conv stack + attfc: the second optimizer, constant lr


def check_dpm_options(
    num_classes,
    num_cameras,
    mask_tap_blocks,
    arcface_scale,
    arcface_margin,
    easy_margin,
    loss_inputs,
    neck_feat,
    **backbone_options,
) -> None:
    """ValueError naming the first of DPM's options (its backbone's included) out of range."""
    check_int("dpm", "num_classes", num_classes, 1, why=" (the classifier's weights are the prototypes)")
    vit, backbone = checked_vit_options("dpm", num_cameras=num_cameras, **backbone_options)
    depth = vit["depth"]
    check_int_list(
        "dpm", "mask_tap_blocks", mask_tap_blocks, 0, depth - 1, distinct=True, why=f" (blocks of depth = {depth})"
    )
    # the mask generator's 3x3 convs (levels C -> 2C, 2C -> C, C -> C) and attfc, beside the backbone's weights
    width, levels = vit["embed_dim"], len(mask_tap_blocks)
    source = f"a mask generator of {levels} levels at embed_dim = {width}"
    generator = check_weights("dpm", width**2 * (18 * levels + 28), source)
    classifier = check_classifier("dpm", num_classes, width)
    check_total_weights("dpm", backbone=backbone, mask_generator=generator, classifier=classifier)
    check_real("dpm", "arcface_scale", arcface_scale, 0, MAX_COEFFICIENT, low_open=True)
    # cos(theta + m) must fall as the angle theta grows over [0, pi/2] (and easy_margin's range): m < pi/2
    check_real("dpm", "arcface_margin", arcface_margin, 0, math.pi / 2, high_open=True, why=" (radians, below pi/2)")
    check_flag("dpm", "easy_margin", easy_margin)
    check_flag("dpm", "loss_inputs", loss_inputs)
    check_choice("dpm", "neck_feat", neck_feat, NECK_FEATS)
    grid = patch_grid(vit["img_size"], vit["patch_size"], vit["stride"])
    if min(grid) < 4:
        raise ValueError(
            f"dpm: img_size {tuple(vit['img_size'])} at patch_size {vit['patch_size']}, stride {vit['stride']} gives a "
            f"{grid[0]}x{grid[1]} patch grid; the mask generator's two 2x2 max-pools need at least 4x4"
        )


class DPM(nn.Module):
    """Defaults are the Occluded-Duke configuration (stride 11, ArcFace m = 0.5); Market and Duke use
    ``stride=12, arcface_margin=0.3``. Width, depth and image size are options for small builds;
    ``mask_tap_blocks`` are 0-based block indices (blocks 2, 4, 10, 12 of 12 by default).
    ``neck_feat``: the feature eval mode returns, ``"before"`` the BNNeck (the official configs'
    ``TEST.NECK_FEAT``, whose masks were learnt on BNNeck features) or ``"after"`` it.
    ``backbone_options`` are ``ViTReID``'s (img_size, patch_size, stride, embed_dim, depth, ...)."""

    passes_options_to = ViTReID  # **backbone_options: its keywords are this model's options too

    def __init__(
        self,
        num_classes: int,
        num_cameras: int = 0,
        *,
        mask_tap_blocks: Sequence[int] = (1, 3, 9, 11),
        arcface_scale: float = 30.0,
        arcface_margin: float = 0.5,
        easy_margin: bool = False,
        loss_inputs: bool = False,
        neck_feat: str = "before",
        **backbone_options,
    ):
        check_dpm_options(
            num_classes,
            num_cameras,
            mask_tap_blocks,
            arcface_scale,
            arcface_margin,
            easy_margin,
            loss_inputs,
            neck_feat,
            **backbone_options,
        )
        super().__init__()
        self.loss_inputs, self.neck_feat = loss_inputs, neck_feat
        self.mask_tap_blocks = tuple(mask_tap_blocks)
        self.arcface_scale, self.arcface_margin, self.easy_margin = arcface_scale, arcface_margin, easy_margin
        self.backbone = ViTReID(num_cameras=num_cameras, **backbone_options)
        embed_dim = self.backbone.embed_dim
        self.mask_generator = HierarchicalMaskGenerator(embed_dim, self.backbone.grid_size, len(self.mask_tap_blocks))
        self.bottleneck = bnneck(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    def forward(
        self, images: torch.Tensor, cam_label: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None
    ):
        """Train mode: ``DPMTrainOutput``; pass ``labels`` to get the ArcFace margin on the target
        logit (without them ``masked_logits = s·cos``). With ``loss_inputs=True`` (constructor) train mode
        returns ``DPMLossInputs`` instead: no logits, for the fused loss. Eval mode:
        ``DPMEvalOutput(feature, mask)``."""
        check_train_batch("images", images, self.training)
        features = self.backbone.forward_features(
            images, cam_label, self.mask_tap_blocks, return_cls_logits=self.training
        )
        mask = self.mask_generator(features.tapped_tokens)
        if not self.training:
            feature = self.bottleneck(features.cls_feature) if self.neck_feat == "after" else features.cls_feature
            return DPMEvalOutput(feature, mask)
        bn_feature = self.bottleneck(features.cls_feature)
        if self.loss_inputs:
            return DPMLossInputs(
                bn_feature,
                mask,
                self.classifier.weight,
                features.cls_feature,
                features.cls_logits,
                self.arcface_scale,
                self.arcface_margin,
                self.easy_margin,
            )
        if labels is not None:  # named here: the ArcFace logits that read them were blamed (arcface_logits: ...)
            check_labels("DPM.forward", labels, images, of="images")
            check_label_range("DPM.forward", labels, self.classifier.out_features)
        masked_logits = masked_arcface_logits(
            bn_feature, mask, self.classifier.weight, labels, self.arcface_scale, self.arcface_margin, self.easy_margin
        )
        return DPMTrainOutput(
            self.classifier(bn_feature), masked_logits, features.cls_feature, mask, features.cls_logits, labels
        )

    def optimizer_param_groups(self, **options) -> DPMParamGroups:
        """Groups for DPM's two SGD optimizers (momentum 0.9 is the optimizer's argument); ``options``
        are ``sgd_param_groups``'s (base_lr, weight_decay, bias_lr_factor, weight_decay_bias). As the
        official code, every mask-generator parameter, weights included, decays by ``weight_decay_bias``."""
        mask_params = {id(p) for p in self.mask_generator.parameters()}
        main = [(n, p) for n, p in self.named_parameters() if id(p) not in mask_params]
        mask_options = dict(options)
        if options.get("weight_decay_bias") is not None:  # official make_optimizer: weights too, in Moptimizer
            mask_options["weight_decay"] = options["weight_decay_bias"]
        return DPMParamGroups(
            sgd_param_groups(main, **options), sgd_param_groups(self.mask_generator.named_parameters(), **mask_options)
        )
