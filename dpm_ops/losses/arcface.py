"""DPM's masked ArcFace classifier loss (spec dpm.md §3, §6).

The classifier weight ``W`` (K, C) holds one "prototype" per identity. Two logit matrices share it:

* plain logits ``f_bn Wᵀ`` (unnormalised, no bias);
* masked cosine ``C[b,k] = <n(f_bn_b), n(m_b ⊙ n(w_k))>`` from ``dpm_ops.ops.masked_cosine``, turned
  into ArcFace logits: the target class gets the additive angular margin ``cos(θ + m)`` (with the
  official ``easy_margin=False`` fallback ``cos θ − m·sin m`` past ``θ = π − m``), then ``× s``.

The loss is ``0.5·CE(plain) + 0.5·CE(masked ArcFace)``. ``masked_arcface_cross_entropy`` computes it
with the fused kernel ``dpm_ops.ops.masked_arcface_ce`` (masked cosine + margin + scale + CE, both
branches, never more than one (B, K) matrix) by default (``fused=True``), and with the plain-torch
reference below when ``fused=False``, when the extension is missing or ``DPM_OPS_BACKEND=reference``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpm_ops import _backend
from dpm_ops.ops import masked_arcface_ce, masked_cosine
from dpm_ops.ops._checks import check_finite_rows, check_tensors
from dpm_ops.ops.masked_arcface import check_label_range, check_masked_arcface_args

from ._precision import at_least_fp32, common_at_least_fp32


def arcface_logits(
    cosine: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 30.0,
    margin: float = 0.5,
    easy_margin: bool = False,
    clamp_eps: float = 1e-7,
) -> torch.Tensor:
    """``s · (onehot·φ(cos) + (1 − onehot)·cos)`` in (at least) fp32.

    Only the sqrt's argument is clamped (cos to ``[−1+ε, 1−ε]``): the original has no clamp and can
    produce NaNs under AMP; everywhere else the raw cosine is used, as in the official ``MArcface``.
    """
    cosine = at_least_fp32(cosine)
    target_cos = cosine.gather(1, labels.view(-1, 1)).squeeze(1)
    target_sin = torch.sqrt(1.0 - target_cos.clamp(-1.0 + clamp_eps, 1.0 - clamp_eps).pow(2))
    phi = target_cos * math.cos(margin) - target_sin * math.sin(margin)
    if easy_margin:
        phi = torch.where(target_cos > 0, phi, target_cos)
    else:
        # Past θ = π − m, cos(θ + m) would increase again; ArcFace switches to a linear penalty.
        phi = torch.where(
            target_cos > math.cos(math.pi - margin), phi, target_cos - math.sin(math.pi - margin) * margin
        )
    return scale * cosine.scatter(1, labels.view(-1, 1), phi.unsqueeze(1))


def masked_arcface_logits(
    features: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    scale: float = 30.0,
    margin: float = 0.5,
    easy_margin: bool = False,
    clamp_eps: float = 1e-7,
) -> torch.Tensor:
    """Masked prototype cosine of BN features vs ``weight`` rows, as ArcFace logits (``s·cos`` when
    ``labels`` is None). Computed in (at least) fp32, even under autocast."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        cosine = masked_cosine(*common_at_least_fp32(features, mask, weight), eps=1e-12)
        if labels is None:
            return scale * cosine
        return arcface_logits(cosine, labels, scale, margin, easy_margin, clamp_eps)


def fused_available(device: torch.device) -> bool:
    """Whether the fused kernel runs for tensors on ``device`` (the reference path otherwise)."""
    return _backend.resolve(None, device) != "reference"


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
    fused: bool = True,
) -> torch.Tensor:
    """``plain_weight·CE(features Wᵀ, y) + masked_weight·CE(masked ArcFace logits, y)``, batch means.

    ``fused=True`` runs ``dpm_ops.ops.masked_arcface_ce`` where available (same value and gradients;
    both branches in at least fp32, also under autocast); ``fused=False`` is the reference."""
    check_tensors("masked_arcface_cross_entropy", features=features, mask=mask, weight=weight)
    if fused and fused_available(features.device):
        with torch.autocast(device_type=features.device.type, enabled=False):
            return masked_arcface_ce(
                *common_at_least_fp32(features, mask, weight),
                labels,
                scale,
                margin,
                easy_margin,
                clamp_eps,
                plain_weight,
                masked_weight,
            )
    # The reference takes what the fused op takes (fp16 / bf16 too), with the same checks.
    check_masked_arcface_args(
        *common_at_least_fp32(features, mask, weight), labels, scale, margin, clamp_eps, plain_weight, masked_weight
    )
    check_finite_rows("masked_arcface_cross_entropy", features=features, mask=mask, weight=weight)
    check_label_range(labels, weight.shape[0])
    plain = F.cross_entropy(F.linear(features, weight), labels)
    masked = F.cross_entropy(
        masked_arcface_logits(features, mask, weight, labels, scale, margin, easy_margin, clamp_eps), labels
    )
    return plain_weight * plain + masked_weight * masked


class MaskedArcFaceLoss(nn.Module):
    """DPM's ID loss on (BN feature, mask, classifier weight). Defaults: Occluded-Duke (s=30, m=0.5);
    Market / Duke use ``margin=0.3``."""

    def __init__(
        self,
        scale: float = 30.0,
        margin: float = 0.5,
        easy_margin: bool = False,
        clamp_eps: float = 1e-7,
        plain_weight: float = 0.5,
        masked_weight: float = 0.5,
        fused: bool = True,
    ):
        super().__init__()
        self.scale, self.margin, self.easy_margin, self.clamp_eps = scale, margin, easy_margin, clamp_eps
        self.plain_weight, self.masked_weight, self.fused = plain_weight, masked_weight, fused

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return masked_arcface_cross_entropy(
            features,
            mask,
            weight,
            labels,
            self.scale,
            self.margin,
            self.easy_margin,
            self.clamp_eps,
            self.plain_weight,
            self.masked_weight,
            self.fused,
        )

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, margin={self.margin}, easy_margin={self.easy_margin}, "
            f"plain_weight={self.plain_weight}, masked_weight={self.masked_weight}, fused={self.fused}"
        )
