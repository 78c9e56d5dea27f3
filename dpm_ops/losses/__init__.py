"""Losses of DPM and MaskReID. Each module's core is one plain function (the ``*_loss`` /
``*_cross_entropy`` functions below) that a fused op can replace with the same signature."""

from .arcface import MaskedArcFaceLoss, arcface_logits, masked_arcface_cross_entropy, masked_arcface_logits
from .hem import HEMLoss, hem_loss
from .ranking import MaskReIDRankingLoss, maskreid_ranking_loss
from .reid_losses import BaselineReIDLoss, DPMLoss
from .triplet import SoftMarginTripletLoss, batch_hard_soft_margin_triplet, pairwise_euclidean

__all__ = [
    "BaselineReIDLoss",
    "DPMLoss",
    "HEMLoss",
    "MaskReIDRankingLoss",
    "MaskedArcFaceLoss",
    "SoftMarginTripletLoss",
    "arcface_logits",
    "batch_hard_soft_margin_triplet",
    "hem_loss",
    "masked_arcface_cross_entropy",
    "masked_arcface_logits",
    "maskreid_ranking_loss",
    "pairwise_euclidean",
]
