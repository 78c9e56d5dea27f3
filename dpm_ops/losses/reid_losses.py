"""Total training losses of DPM (ID loss with HEM, plus the triplet loss) and of the ViT baseline.

DPM:  L = id_w·(0.5·CE(plain) + 0.5·CE(masked ArcFace) + λ_HEM·L_HEM) + tri_w·L_TRI,
with λ_HEM = 0.1 (0.01 for Occluded-REID) and both outer weights 1. From the model's ``DPMTrainOutput``
the ArcFace margin is already in ``masked_logits`` when the model was called with ``labels`` (as the
official ``MArcface``). From ``DPMLossInputs`` (``DPM(..., loss_inputs=True)``) both CE branches come from
the fused ``masked_arcface_cross_entropy``. ``backend=None`` (the default) runs the fused kernels (ArcFace
CE, batch-hard triplet) where available, with the same values and gradients as ``backend="reference"``
(``fused=`` is its deprecated form).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpm_ops._precision import at_least_fp32
from dpm_ops.ops._checks import (
    MAX_COEFFICIENT,
    check_finite,
    check_label_range,
    check_labels,
    check_real,
    values_hidden,
)

from .arcface import masked_arcface_cross_entropy
from ._options import backend_of_fused, check_backend_name, check_batch_option
from .hem import hem_loss
from .triplet import batch_hard_soft_margin_triplet


def _check_output(loss: str, output, fields: tuple, expected: str) -> None:
    """The model's train-mode output (duck-typed: losses do not import models), its tensors of one batch (the
    first op to meet a tensor of another batch blamed the labels; the ops check the labels against them)."""
    if not all(hasattr(output, field) for field in fields):
        raise ValueError(f"{loss}: output must be the model's train-mode {expected}, got {type(output).__name__}")
    tensors = {field: getattr(output, field) for field in fields}
    batches = {field: t.shape[0] for field, t in tensors.items() if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(set(batches.values())) > 1:
        held = ", ".join(f"{field} {batch}" for field, batch in batches.items())
        raise ValueError(f"{loss}: the output's tensors must hold one batch, got {held} samples")


def _check_margin_labels(margin_labels, labels) -> None:
    """The ArcFace margin of ``masked_logits`` sits on the targets of the labels the model was called with: a
    call without labels (no margin) or with others trained a silently different loss."""
    if margin_labels is None:
        raise ValueError(
            "DPMLoss: the output's masked_logits carry no ArcFace margin (the model was called without labels): "
            "call it as model(images, cam_label, labels)"
        )
    if margin_labels is labels or values_hidden():
        return
    if margin_labels.shape != labels.shape or not torch.equal(margin_labels.to(labels.device), labels):
        raise ValueError("DPMLoss: labels must be those the model was called with (its ArcFace margin's targets)")


def _cross_entropy(loss: str, logits: torch.Tensor, labels, name: str = "logits") -> torch.Tensor:
    """F.cross_entropy, after the checks the fused losses make: torch's own errors for a float or
    out-of-range label (on CUDA a device-side assert) name no argument, and NaN logits gave a NaN loss."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        what = (
            f"{logits.dtype} of shape {tuple(logits.shape)}"
            if isinstance(logits, torch.Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"{loss}: {name} must be (B, K) floating-point logits, got {what}")
    check_labels(loss, labels, logits, of=name)
    check_label_range(loss, labels, logits.shape[1])
    check_finite(loss, **{name: logits})
    return F.cross_entropy(at_least_fp32(logits), labels)  # bf16 logits outside autocast: a bf16 loss (29 for 28.88)


class DPMLoss(nn.Module):
    def __init__(
        self,
        hem_weight: float = 0.1,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        plain_weight: float = 0.5,
        masked_weight: float = 0.5,
        backend: Optional[str] = None,
        fused: Optional[bool] = None,
        triplet_batch: Optional[Callable] = None,
    ):
        super().__init__()
        self.triplet_batch = check_batch_option("DPMLoss", "triplet_batch", triplet_batch)
        if fused is not None:
            backend = backend_of_fused(fused, "DPMLoss", backend is not None)
        self.hem_weight, self.id_weight, self.triplet_weight, self.plain_weight, self.masked_weight = (
            check_real("DPMLoss", name, value, 0, MAX_COEFFICIENT)
            for name, value in (
                ("hem_weight", hem_weight),
                ("id_weight", id_weight),
                ("triplet_weight", triplet_weight),
                ("plain_weight", plain_weight),
                ("masked_weight", masked_weight),
            )
        )
        self.backend = check_backend_name("DPMLoss", backend)

    def terms(self, output, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted terms, for logging; ``output`` is the model's ``DPMTrainOutput`` (terms id_plain,
        id_masked) or ``DPMLossInputs`` (term id: the already weighted sum of both CE branches)."""
        if hasattr(output, "bn_feature"):  # DPMLossInputs (duck-typed: losses do not import models)
            _check_output("DPMLoss", output, ("bn_feature", "mask", "feature", "hem_logits"), "DPMLossInputs")
            identity = masked_arcface_cross_entropy(
                output.bn_feature,
                output.mask,
                output.weight,
                labels,
                output.scale,
                output.margin,
                output.easy_margin,
                plain_weight=self.plain_weight,
                masked_weight=self.masked_weight,
                backend=self.backend,
            )
            terms = {"id": identity}
        else:
            fields = ("plain_logits", "masked_logits", "feature", "hem_logits")
            _check_output("DPMLoss", output, fields, "DPMTrainOutput or DPMLossInputs")
            terms = {
                "id_plain": _cross_entropy("DPMLoss", output.plain_logits, labels, "plain_logits"),
                "id_masked": _cross_entropy("DPMLoss", output.masked_logits, labels, "masked_logits"),
            }
            _check_margin_labels(getattr(output, "margin_labels", None), labels)
        terms["hem"] = hem_loss(output.hem_logits, backend=self.backend)
        terms["triplet"] = batch_hard_soft_margin_triplet(
            *self.triplet_batch(output.feature, labels), backend=self.backend
        )
        return terms

    def total(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of :meth:`terms` (a trainer logs the terms it summed)."""
        classification = (
            t["id"] if "id" in t else self.plain_weight * t["id_plain"] + self.masked_weight * t["id_masked"]
        )
        id_loss = classification + self.hem_weight * t["hem"]
        return self.id_weight * id_loss + self.triplet_weight * t["triplet"]

    def forward(self, output, labels: torch.Tensor) -> torch.Tensor:
        return self.total(self.terms(output, labels))

    def extra_repr(self) -> str:
        return (
            f"hem_weight={self.hem_weight}, id_weight={self.id_weight}, "
            f"triplet_weight={self.triplet_weight}, plain_weight={self.plain_weight}, "
            f"masked_weight={self.masked_weight}, backend={self.backend!r}"
        )


class BaselineReIDLoss(nn.Module):
    """ViT baseline: ``id_w·CE(logits) + tri_w·L_TRI`` (no label smoothing, soft-margin triplet)."""

    def __init__(
        self,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        backend: Optional[str] = None,
        triplet_batch: Optional[Callable] = None,
    ):
        super().__init__()
        self.triplet_batch = check_batch_option("BaselineReIDLoss", "triplet_batch", triplet_batch)
        self.id_weight = check_real("BaselineReIDLoss", "id_weight", id_weight, 0, MAX_COEFFICIENT)
        self.triplet_weight = check_real("BaselineReIDLoss", "triplet_weight", triplet_weight, 0, MAX_COEFFICIENT)
        self.backend = check_backend_name("BaselineReIDLoss", backend)

    def terms(self, output, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted terms, for logging; ``output`` is the model's ``ViTBaselineTrainOutput``."""
        _check_output("BaselineReIDLoss", output, ("logits", "feature"), "ViTBaselineTrainOutput")
        return {
            "id": _cross_entropy("BaselineReIDLoss", output.logits, labels),
            "triplet": batch_hard_soft_margin_triplet(
                *self.triplet_batch(output.feature, labels), backend=self.backend
            ),
        }

    def total(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.id_weight * t["id"] + self.triplet_weight * t["triplet"]

    def forward(self, output, labels: torch.Tensor) -> torch.Tensor:
        return self.total(self.terms(output, labels))
