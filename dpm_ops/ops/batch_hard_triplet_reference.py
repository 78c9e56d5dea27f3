"""Plain-PyTorch reference of the batch-hard soft-margin triplet loss (TransReID's, used by DPM).

Euclidean distances ``sqrt(clamp(‖x‖² + ‖y‖² − 2xᵀy, 1e-12))`` on the un-normalised features;
for each anchor the farthest positive (the anchor itself counts, at distance 1e-6) and the
nearest negative; ``SoftMarginLoss(d_an − d_ap, 1) = mean log(1 + exp(d_ap − d_an))``.
"""

import torch
import torch.nn.functional as F

from .._precision import at_least_fp32


def pairwise_euclidean_unchecked(features: torch.Tensor) -> torch.Tensor:
    """(B, B) distances by the expansion the original uses, in at least fp32 (losses.pairwise_euclidean checks)."""
    x = at_least_fp32(features)
    squared = (x * x).sum(1)
    return (squared.unsqueeze(1) + squared.unsqueeze(0) - 2.0 * (x @ x.t())).clamp_min(1e-12).sqrt()


def batch_hard_triplet_reference(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss (0-dim) of features (B, C) and labels (B,); unchecked (the callers check)."""
    dist = pairwise_euclidean_unchecked(features)
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    hardest_positive = dist.masked_fill(~same, float("-inf")).max(1).values
    # An anchor without negatives gets d_an = inf, i.e. a zero loss term.
    hardest_negative = dist.masked_fill(same, float("inf")).min(1).values
    return F.softplus(hardest_positive - hardest_negative).mean()
