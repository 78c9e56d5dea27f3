"""Batch-hard soft-margin triplet loss (TransReID's, used by DPM); the maths:
dpm_ops/ops/batch_hard_triplet_reference.py."""

from __future__ import annotations

from typing import Optional

import torch

from dpm_ops.ops import batch_hard_triplet
from dpm_ops.ops._checks import check_finite_rows, check_tensors
from dpm_ops.ops.batch_hard_triplet import check_batch_hard_triplet_args
from dpm_ops.ops.batch_hard_triplet_reference import batch_hard_triplet_reference, pairwise_euclidean_unchecked

from .._precision import at_least_fp32
from ._options import LossModule, accepts_fused
from .arcface import fused_available

__all__ = ["SoftMarginTripletLoss", "batch_hard_soft_margin_triplet", "pairwise_euclidean"]


@accepts_fused
def batch_hard_soft_margin_triplet(
    features: torch.Tensor, labels: torch.Tensor, backend: Optional[str] = None
) -> torch.Tensor:
    """Runs ``dpm_ops.ops.batch_hard_triplet`` on the ``backend`` it resolves to (same value and
    gradient, in at least fp32, also under autocast); ``backend="reference"`` (or no extension) is the
    reference (dpm_ops.ops.batch_hard_triplet_reference)."""
    check_tensors("batch_hard_triplet", features=features)
    if not features.is_floating_point():  # cast to float below, integer features gave a loss
        raise ValueError(f"batch_hard_triplet: features must be floating point, got {features.dtype}")
    if fused_available(features.device, backend):
        with torch.autocast(device_type=features.device.type, enabled=False):
            return batch_hard_triplet(at_least_fp32(features), labels, backend=backend)
    check_batch_hard_triplet_args(at_least_fp32(features), labels)  # the fused op's checks
    with torch.autocast(device_type=features.device.type, enabled=False):  # as the fused path: an fp32 Gram
        return batch_hard_triplet_reference(at_least_fp32(features), labels)


def pairwise_euclidean(features: torch.Tensor) -> torch.Tensor:
    """(B, B) Euclidean distances of features (B, C) by the expansion TransReID uses, in at least fp32:
    ``sqrt(max(|x|^2 + |y|^2 - 2 x.y, 1e-12))`` (the triplet loss's)."""
    check_tensors("pairwise_euclidean", features=features)
    if features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            f"pairwise_euclidean: features must be 2-D (B, C) floating point, got {features.dtype} {list(features.shape)}"
        )
    check_finite_rows("pairwise_euclidean", features=features)  # also their magnitude: squares overflowed to NaN
    return pairwise_euclidean_unchecked(features)


class SoftMarginTripletLoss(LossModule):
    """Batch-hard triplet with a soft margin (``NO_MARGIN: True``), on pre-BN features."""

    loss_function = staticmethod(batch_hard_soft_margin_triplet)
