"""Head Enrichment Module loss (spec dpm.md §4): orthonormality of the heads' CLS->patch logits.

``Â[b,h] = A[b,h] / sqrt(Σ_j A[b,h,j]² + 1e-6)``, ``G_b = Â_b Â_bᵀ`` (heads × heads), and
``L = Σ_b ‖G_b − I‖²_F / heads²``: summed over the batch like the official
``mse_loss(size_average=False)``, so its effective weight grows with the batch size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._precision import at_least_fp32


def hem_loss(cls_logits: torch.Tensor, eps: float = 1e-6, reduction: str = "sum") -> torch.Tensor:
    """``cls_logits``: (B, heads, N) pre-softmax, scaled logits of the last block."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' (official) or 'mean', got {reduction!r}")
    a = at_least_fp32(cls_logits)
    a_hat = a / torch.sqrt((a * a).sum(-1, keepdim=True) + eps)
    gram = a_hat @ a_hat.transpose(1, 2)
    heads = a.shape[1]
    identity = torch.eye(heads, device=a.device, dtype=a.dtype)
    per_sample = (gram - identity).pow(2).sum((1, 2)) / heads**2
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


class HEMLoss(nn.Module):
    """Unweighted HEM loss; DPM weighs it by 0.1 (0.01 for Occluded-REID) in ``DPMLoss``."""

    def __init__(self, eps: float = 1e-6, reduction: str = "sum"):
        super().__init__()
        self.eps, self.reduction = eps, reduction

    def forward(self, cls_logits: torch.Tensor) -> torch.Tensor:
        return hem_loss(cls_logits, self.eps, self.reduction)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction!r}"
