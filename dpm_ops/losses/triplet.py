"""Batch-hard soft-margin triplet loss (TransReID / DPM, spec dpm.md §6).

Euclidean distances ``sqrt(clamp(‖x‖² + ‖y‖² − 2xᵀy, 1e-12))`` on the un-normalised features;
for each anchor the farthest positive (the anchor itself counts, at distance 1e-6) and the
nearest negative; ``SoftMarginLoss(d_an − d_ap, 1) = mean log(1 + exp(d_ap − d_an))``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpm_ops.ops import batch_hard_triplet
from dpm_ops.ops._checks import check_tensors
from dpm_ops.ops.batch_hard_triplet import check_batch_hard_triplet_args

from ._precision import at_least_fp32
from .arcface import fused_available


def pairwise_euclidean(features: torch.Tensor) -> torch.Tensor:
    """(B, B) distances by the expansion the original uses, in at least fp32."""
    x = at_least_fp32(features)
    squared = (x * x).sum(1)
    return (squared.unsqueeze(1) + squared.unsqueeze(0) - 2.0 * (x @ x.t())).clamp_min(1e-12).sqrt()


def batch_hard_soft_margin_triplet(features: torch.Tensor, labels: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``fused=True`` runs ``dpm_ops.ops.batch_hard_triplet`` where available (same value and gradient,
    in at least fp32, also under autocast); ``fused=False`` (or no extension) is the reference below."""
    check_tensors("batch_hard_triplet", features=features)
    if fused and fused_available(features.device):
        with torch.autocast(device_type=features.device.type, enabled=False):
            return batch_hard_triplet(at_least_fp32(features), labels)
    check_batch_hard_triplet_args(at_least_fp32(features), labels)  # the fused op's checks
    dist = pairwise_euclidean(features)
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    hardest_positive = dist.masked_fill(~same, float("-inf")).max(1).values
    # An anchor without negatives gets d_an = inf, i.e. a zero loss term.
    hardest_negative = dist.masked_fill(same, float("inf")).min(1).values
    return F.softplus(hardest_positive - hardest_negative).mean()


class SoftMarginTripletLoss(nn.Module):
    """Batch-hard triplet with a soft margin (``NO_MARGIN: True``), on pre-BN features."""

    def __init__(self, fused: bool = True):
        super().__init__()
        self.fused = fused

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return batch_hard_soft_margin_triplet(features, labels, self.fused)
