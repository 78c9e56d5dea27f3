"""Plain-PyTorch reference of DPM's masked ArcFace loss, and the model's masked ArcFace logits.

The classifier weight ``W`` (K, C) holds one "prototype" per identity. Two logit matrices share it:

* plain logits ``f Wᵀ`` (unnormalised, no bias);
* masked cosine ``C[b,k] = <n(f_b), n(m_b ⊙ n(w_k))>`` (masked_cosine), turned into ArcFace logits:
  the target class gets the additive angular margin ``cos(θ + m)`` (past ``θ = π − m`` the official
  ``easy_margin=False`` fallback ``cos θ − m·sin m``), then ``× s``.

loss = ``plain_weight·CE(plain) + masked_weight·CE(masked ArcFace)`` (0.5 and 0.5 in DPM), which the
fused op (masked_arcface.py, csrc/masked_arcface/masked_arcface_math.h) transcribes, quirks included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._precision import at_least_fp32, common_at_least_fp32, sqrt_flat_at_zero
from ._checks import (
    MAX_COEFFICIENT,
    check_flag,
    check_label_range,
    check_labels,
    check_number,
    check_real,
    check_tensors,
    values_hidden,
)
from .masked_cosine import masked_cosine


def check_arcface_options(op: str, scale, margin, easy_margin, clamp_eps) -> None:
    """ArcFace's numbers and flag: a scale in (0, MAX_COEFFICIENT] (<= 0 flips or flattens the logits), any finite
    margin (a negative one is a research use), a bool easy_margin, clamp_eps in [0, 1)."""
    check_real(op, "scale", scale, 0, MAX_COEFFICIENT, low_open=True)
    check_number(op, "margin", margin)
    check_flag(op, "easy_margin", easy_margin)
    if not 0 <= check_number(op, "clamp_eps", clamp_eps) < 1:
        raise ValueError(f"{op}: clamp_eps must lie in [0, 1), got {clamp_eps}")


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
    check_tensors("arcface_logits", cosine=cosine)
    if cosine.dim() != 2 or not cosine.is_floating_point():
        raise ValueError(
            f"arcface_logits: cosine must be 2-D (B, K) floating point, got {cosine.dtype} {list(cosine.shape)}"
        )
    check_arcface_options("arcface_logits", scale, margin, easy_margin, clamp_eps)
    # gather / scatter took labels for fewer rows silently (the rest kept no margin), past K an error
    check_labels("arcface_logits", labels, cosine, of="cosine logits")
    check_label_range("arcface_logits", labels, cosine.shape[1])
    return _margin_logits(check_cosines("arcface_logits", cosine), labels, scale, margin, easy_margin, clamp_eps)


# How far past [-1, 1] a computed cosine may round (bf16 rounds 1 - 2^-9 up to ~1 + 4e-3)
COSINE_SLACK = 1e-2


def check_cosines(op: str, cosine: torch.Tensor) -> torch.Tensor:
    """``cosine`` once its values are finite cosines (one sync, skipped where values are hidden): NaN gave NaN
    logits, and a value past 1 a target logit above a perfect match's."""
    if cosine.numel() and not values_hidden():
        low, high = torch.stack(torch.aminmax(cosine.detach())).tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{op}: cosine contains non-finite values (NaN or inf)")
        if low < -1 - COSINE_SLACK or high > 1 + COSINE_SLACK:
            raise ValueError(f"{op}: cosine must hold cosines, in [-1, 1], got values in [{low:.4g}, {high:.4g}]")
    return cosine


def _margin_logits(cosine, labels, scale, margin, easy_margin, clamp_eps) -> torch.Tensor:
    """arcface_logits of checked arguments."""
    cosine = at_least_fp32(cosine)
    target_cos = cosine.gather(1, labels.view(-1, 1)).squeeze(1)
    # Flat at sin = 0 (cos = ±1 with clamp_eps = 0), as the kernels: sqrt's infinite slope times the
    # clamp's or the unused torch.where branch's zero gradient would be NaN.
    target_sin = sqrt_flat_at_zero(1.0 - target_cos.clamp(-1.0 + clamp_eps, 1.0 - clamp_eps).pow(2))
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
    backend: str | None = None,
) -> torch.Tensor:
    """Masked prototype cosine of BN features vs ``weight`` rows, as ArcFace logits (``s·cos`` when
    ``labels`` is None), the cosine by masked_cosine on ``backend``. Computed in (at least) fp32,
    even under autocast."""
    check_arcface_options("masked_arcface_logits", scale, margin, easy_margin, clamp_eps)
    with torch.autocast(device_type=features.device.type, enabled=False):
        cosine = masked_cosine(*common_at_least_fp32(features, mask, weight), eps=1e-12, backend=backend)
        if labels is None:
            return scale * cosine
        check_labels("masked_arcface_logits", labels, cosine, of="features")
        check_label_range("masked_arcface_logits", labels, cosine.shape[1])
        return _margin_logits(cosine, labels, scale, margin, easy_margin, clamp_eps)


def masked_arcface_reference(
    features, mask, weight, labels, scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight
) -> torch.Tensor:
    """The loss (0-dim) of masked_arcface_ce's arguments: the batch means of both cross-entropies;
    unchecked (the callers check). Plain torch throughout (the cosine too)."""
    plain = F.cross_entropy(F.linear(features, weight), labels)
    logits = masked_arcface_logits(
        features, mask, weight, labels, scale, margin, easy_margin, clamp_eps, backend="reference"
    )
    masked = F.cross_entropy(logits, labels)
    return plain_weight * plain + masked_weight * masked
