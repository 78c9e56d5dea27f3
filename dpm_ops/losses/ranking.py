"""MaskReID ranking loss (the paper's Eq. 5, and Eq. 4 as an option).

For an anchor k with positives P (same identity, anchor excluded) and negatives N, on
L2-normalised embeddings with ``s_kj = x_kᵀ x_j``, Eq. 5 (the paper's training loss) is

    L_k = log(1 + Σ_{j∈N} exp([s_kj − s_k^{p*} + α]_+)) + λ/(2|P|) Σ_{i∈P} (s_ki − 1)²,
    s_k^{p*} = min_{i∈P} s_ki  (the hardest positive),  α = 0.15,  λ = 2,

and Eq. 4 is ``L_k = log(1 + Σ_{i∈P} Σ_{j∈N} exp(s_kj − s_ki))`` (no margin, hinge or pull term).
Anchors are the samples with at least one positive (with the paper's 10 + 54 batch: the 10 images
of the sampled identity); the batch loss is their mean.

Options (the paper's text is ambiguous):
* ``pos_mode="hardest"`` (default): Eq. 5's hardest positive.
  ``pos_mode="all_eq5"``: Eq. 5's margin, hinge and pull term over every (positive, negative) pair
  (formerly ``"all"``, which is now refused with this name).
  ``pos_mode="eq4"``: Eq. 4; ``alpha``, ``lam`` are unused and ``neg_mode`` must stay "literal".
* ``neg_mode="literal"`` (default): Eq. 5 as printed; a satisfied negative still adds exp(0) = 1,
  so the first term never drops below log(1 + |N|).
  ``neg_mode="violating_only"``: only negatives with a positive hinge argument enter the sum.
* ``fused=True`` (default): the fused op ``dpm_ops.ops.maskreid_ranking_loss`` (one kernel pass with
  the closed-form gradient; the plain-torch reference where no kernel backend is available);
  ``fused=False``: the plain-torch reference (``dpm_ops.ops.maskreid_ranking_loss_reference``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.maskreid_ranking_loss import maskreid_ranking_loss as fused_maskreid_ranking_loss
from ..ops.maskreid_ranking_loss_reference import check_modes


def maskreid_ranking_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.15,
    lam: float = 2.0,
    neg_mode: str = "literal",
    pos_mode: str = "hardest",
    fused: bool = True,
) -> torch.Tensor:
    # fused=False: the reference, checked like the fused op
    backend = None if fused else "reference"
    return fused_maskreid_ranking_loss(embeddings, labels, alpha, lam, neg_mode, pos_mode, backend=backend)


class MaskReIDRankingLoss(nn.Module):
    """Eq. 5 with the paper's α = 0.15, λ = 2 on L2-normalised embeddings (or Eq. 4: ``pos_mode="eq4"``)."""

    def __init__(
        self,
        alpha: float = 0.15,
        lam: float = 2.0,
        neg_mode: str = "literal",
        pos_mode: str = "hardest",
        fused: bool = True,
    ):
        super().__init__()
        check_modes(neg_mode, pos_mode)
        self.alpha, self.lam, self.neg_mode, self.pos_mode, self.fused = alpha, lam, neg_mode, pos_mode, fused

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return maskreid_ranking_loss(embeddings, labels, self.alpha, self.lam, self.neg_mode, self.pos_mode, self.fused)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, lam={self.lam}, neg_mode={self.neg_mode!r}, pos_mode={self.pos_mode!r}, "
            f"fused={self.fused}"
        )
