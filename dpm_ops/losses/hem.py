"""Head Enrichment Module loss of DPM: orthonormality of the heads' CLS->patch logits.

``Â[b,h] = A[b,h] / sqrt(Σ_j A[b,h,j]² + 1e-6)``, ``G_b = Â_b Â_bᵀ`` (heads × heads), and
``L = Σ_b ‖G_b − I‖²_F / heads²``: summed over the batch like the official
``mse_loss(size_average=False)``, so its effective weight grows with the batch size.

``fused=True`` (default) runs the fused op ``dpm_ops.ops.hem_loss`` (one pass per sample forward,
closed-form backward; the plain-torch reference where no kernel backend is available);
``fused=False`` the plain-torch reference (``dpm_ops.ops.hem_loss_reference``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.hem_loss import hem_loss as fused_hem_loss
from ..ops.hem_loss_reference import REDUCTIONS


def hem_loss(cls_logits: torch.Tensor, eps: float = 1e-6, reduction: str = "sum", fused: bool = True) -> torch.Tensor:
    """``cls_logits``: (B, heads, N) pre-softmax, scaled logits of the last block (the model's ``hem_logits``)."""
    if fused:
        return fused_hem_loss(cls_logits, eps, reduction)
    return fused_hem_loss(cls_logits, eps, reduction, backend="reference")  # checked like the fused op


class HEMLoss(nn.Module):
    """Unweighted HEM loss; DPM weighs it by 0.1 (0.01 for Occluded-REID) in ``DPMLoss``."""

    def __init__(self, eps: float = 1e-6, reduction: str = "sum", fused: bool = True):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'sum' (official) or 'mean', got {reduction!r}")
        self.eps, self.reduction, self.fused = eps, reduction, fused

    def forward(self, cls_logits: torch.Tensor) -> torch.Tensor:
        return hem_loss(cls_logits, self.eps, self.reduction, self.fused)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction!r}, fused={self.fused}"
