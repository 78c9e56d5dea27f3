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
* ``backend=None`` (default): the fused op ``dpm_ops.ops.maskreid_ranking_loss`` (one kernel pass with
  the closed-form gradient; the plain-torch reference where no kernel backend is available);
  ``backend="reference"``: the plain-torch reference (``dpm_ops.ops.maskreid_ranking_loss_reference``).
  ``maskreid_ranking_loss`` is that op (its signature), also taking the deprecated ``fused=``.
* ``MaskReIDRankingLoss(ranking_batch=...)``: a callable giving the batch it mines over, as the triplet's
  ``triplet_batch=`` (the recipe passes ``engine.distributed.gather_batch`` on P x K batches: under DDP the
  whole batch, every rank's share); by default the one given.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..ops.maskreid_ranking_loss import maskreid_ranking_loss as fused_maskreid_ranking_loss
from ..ops.maskreid_ranking_loss import check_ranking_options
from ._options import LossModule, accepts_fused, check_batch_option

maskreid_ranking_loss = accepts_fused(fused_maskreid_ranking_loss)


class MaskReIDRankingLoss(LossModule):
    """Eq. 5 with the paper's α = 0.15, λ = 2 on L2-normalised embeddings (or Eq. 4: ``pos_mode="eq4"``);
    options: ``maskreid_ranking_loss``'s, and ``ranking_batch`` (the batch it mines over)."""

    loss_function = staticmethod(maskreid_ranking_loss)
    module_options = ("ranking_batch",)

    def __init__(self, *, ranking_batch: Optional[Callable] = None, **options):
        super().__init__(**options)
        check_ranking_options(self.alpha, self.lam, self.neg_mode, self.pos_mode)  # now, not at the first batch
        self.ranking_batch = check_batch_option("MaskReIDRankingLoss", "ranking_batch", ranking_batch)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_function(*self.ranking_batch(embeddings, labels), **self.options())
