"""DPM's masked ArcFace classifier loss on (BN feature, mask, classifier weight): a plain and a
masked-ArcFace cross-entropy sharing the classifier weight (the maths: dpm_ops/ops/masked_arcface_reference.py).

The loss is ``0.5·CE(plain) + 0.5·CE(masked ArcFace)``. ``masked_arcface_cross_entropy`` computes it
with the fused kernel ``dpm_ops.ops.masked_arcface_ce`` (masked cosine + margin + scale + CE, both
branches, never more than one (B, K) matrix) by default (``backend=None``), and with the plain-torch
reference (dpm_ops.ops.masked_arcface_reference) when ``backend="reference"``, when the extension is
missing or ``DPM_OPS_BACKEND=reference``.
"""

from __future__ import annotations

from typing import Optional

import torch

from dpm_ops import _backend
from dpm_ops.ops import masked_arcface_ce
from dpm_ops.ops._checks import check_finite_rows, check_tensors
from dpm_ops.ops._checks import check_label_range
from dpm_ops.ops.masked_arcface import check_masked_arcface_args, check_masked_arcface_options
from dpm_ops.ops.masked_arcface_reference import arcface_logits, masked_arcface_logits, masked_arcface_reference

from .._precision import common_at_least_fp32
from ._options import LossModule, accepts_fused

__all__ = [
    "MaskedArcFaceLoss",
    "arcface_logits",
    "fused_available",
    "masked_arcface_cross_entropy",
    "masked_arcface_logits",
]


def fused_available(device: torch.device, backend: Optional[str] = None) -> bool:
    """Whether a fused kernel runs for tensors on ``device`` with ``backend`` (the reference path otherwise)."""
    return _backend.resolve(backend, device) != "reference"


@accepts_fused
def masked_arcface_cross_entropy(
    features: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 30.0,
    margin: float = 0.5,
    easy_margin: bool = False,
    clamp_eps: float = 1e-7,
    plain_weight: float = 0.5,
    masked_weight: float = 0.5,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``plain_weight·CE(features Wᵀ, y) + masked_weight·CE(masked ArcFace logits, y)``, batch means.

    Runs ``dpm_ops.ops.masked_arcface_ce`` on the ``backend`` it resolves to (same value and gradients;
    both branches in at least fp32, also under autocast); ``backend="reference"`` is the reference."""
    check_tensors("masked_arcface_cross_entropy", features=features, mask=mask, weight=weight)
    options = (scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight)
    if fused_available(features.device, backend):
        with torch.autocast(device_type=features.device.type, enabled=False):
            return masked_arcface_ce(*common_at_least_fp32(features, mask, weight), labels, *options, backend=backend)
    # The reference takes what the fused op takes (fp16 / bf16 too), with the same checks.
    check_masked_arcface_args(*common_at_least_fp32(features, mask, weight), labels, *options)
    check_finite_rows("masked_arcface_cross_entropy", features=features, mask=mask, weight=weight)
    check_label_range("masked_arcface_cross_entropy", labels, weight.shape[0])
    with torch.autocast(device_type=features.device.type, enabled=False):  # as the fused path: fp32 GEMMs
        return masked_arcface_reference(*common_at_least_fp32(features, mask, weight), labels, *options)


class MaskedArcFaceLoss(LossModule):
    """DPM's ID loss on (BN feature, mask, classifier weight); options: ``masked_arcface_cross_entropy``'s.
    Defaults: Occluded-Duke (s=30, m=0.5); Market / Duke use ``margin=0.3``."""

    loss_function = staticmethod(masked_arcface_cross_entropy)

    def __init__(self, **options):
        super().__init__(**options)
        check_masked_arcface_options(  # now, not at the first batch
            self.scale, self.margin, self.easy_margin, self.clamp_eps, self.plain_weight, self.masked_weight
        )
