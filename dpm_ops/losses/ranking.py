"""MaskReID ranking loss (spec maskreid.md §4.2, Eq. 5).

For an anchor k with positives P (same identity, anchor excluded) and negatives N, on
L2-normalised embeddings with ``s_kj = x_kᵀ x_j``:

    L_k = log(1 + Σ_{j∈N} exp([s_kj − s_k^{p*} + α]_+)) + λ/(2|P|) Σ_{i∈P} (s_ki − 1)²,
    s_k^{p*} = min_{i∈P} s_ki  (the hardest positive),  α = 0.15,  λ = 2.

Anchors are the samples with at least one positive (with the paper's 10 + 54 batch: the 10 images
of the sampled identity); the batch loss is their mean.

Options (the paper's text is ambiguous, see the spec):
* ``neg_mode="literal"`` (default): Eq. 5 as printed; a satisfied negative still adds exp(0) = 1,
  so the first term never drops below log(1 + |N|).
  ``neg_mode="violating_only"``: only negatives with a positive hinge argument enter the sum.
* ``pos_mode="hardest"`` (default): Eq. 5's hardest positive.
  ``pos_mode="all"``: every (positive, negative) pair as in Eq. 4, with Eq. 5's margin and hinge.
* ``fused=True`` (default): the fused op ``dpm_ops.ops.maskreid_ranking_loss`` (one kernel pass with
  the closed-form gradient; the plain-torch reference where no kernel backend is available);
  ``fused=False``: the plain-torch reference (``dpm_ops.ops.maskreid_ranking_loss_reference``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.maskreid_ranking_loss import maskreid_ranking_loss as fused_maskreid_ranking_loss
from ..ops.maskreid_ranking_loss_reference import NEG_MODES, POS_MODES, maskreid_ranking_loss_reference


def maskreid_ranking_loss(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 0.15,
                          lam: float = 2.0, neg_mode: str = "literal", pos_mode: str = "hardest",
                          fused: bool = True) -> torch.Tensor:
    if fused:
        return fused_maskreid_ranking_loss(embeddings, labels, alpha, lam, neg_mode, pos_mode)
    return maskreid_ranking_loss_reference(embeddings, labels, alpha, lam, neg_mode, pos_mode)


class MaskReIDRankingLoss(nn.Module):
    """Eq. 5 with the paper's α = 0.15, λ = 2 on L2-normalised embeddings."""

    def __init__(self, alpha: float = 0.15, lam: float = 2.0, neg_mode: str = "literal",
                 pos_mode: str = "hardest", fused: bool = True):
        super().__init__()
        if neg_mode not in NEG_MODES or pos_mode not in POS_MODES:
            raise ValueError(f"neg_mode must be in {NEG_MODES} and pos_mode in {POS_MODES}")
        self.alpha, self.lam, self.neg_mode, self.pos_mode, self.fused = alpha, lam, neg_mode, pos_mode, fused

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return maskreid_ranking_loss(embeddings, labels, self.alpha, self.lam, self.neg_mode, self.pos_mode,
                                     self.fused)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, lam={self.lam}, neg_mode={self.neg_mode!r}, pos_mode={self.pos_mode!r}, "
                f"fused={self.fused}")
