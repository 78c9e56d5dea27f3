"""Plain-PyTorch reference of MaskReID's ranking loss (spec maskreid.md §4.2, Eq. 5).

For an anchor k with positives P (same identity, anchor excluded) and negatives N, on
L2-normalised embeddings with ``s_kj = x_kᵀ x_j``:

    L_k = log(1 + Σ_{j∈N} exp([s_kj − s_k^{p*} + α]_+)) + λ/(2|P|) Σ_{i∈P} (s_ki − 1)²,
    s_k^{p*} = min_{i∈P} s_ki  (the hardest positive),  α = 0.15,  λ = 2.

Anchors are the samples with at least one positive (with the paper's 10 + 54 batch: the 10 images
of the sampled identity); the batch loss is their mean (0 when there is no anchor).

Options (the paper's text is ambiguous, see the spec):
* ``neg_mode="literal"`` (default): Eq. 5 as printed; a satisfied negative still adds exp(0) = 1,
  so the first term never drops below log(1 + |N|).
  ``neg_mode="violating_only"``: only negatives with a positive hinge argument enter the sum.
* ``pos_mode="hardest"`` (default): Eq. 5's hardest positive (ties: the first index, as torch.min).
  ``pos_mode="all"``: every (positive, negative) pair as in Eq. 4, with Eq. 5's margin and hinge.

The embeddings are taken as given (not re-normalised); fp16/bf16 are computed in fp32.
"""

import torch

from .._precision import at_least_fp32

NEG_MODES = ("literal", "violating_only")
POS_MODES = ("hardest", "all")


def maskreid_ranking_loss_reference(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 0.15,
                                    lam: float = 2.0, neg_mode: str = "literal", pos_mode: str = "hardest"
                                    ) -> torch.Tensor:
    if neg_mode not in NEG_MODES:
        raise ValueError(f"neg_mode must be one of {NEG_MODES}, got {neg_mode!r}")
    if pos_mode not in POS_MODES:
        raise ValueError(f"pos_mode must be one of {POS_MODES}, got {pos_mode!r}")
    x = at_least_fp32(embeddings)
    sim = x @ x.t()
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    eye = torch.eye(len(labels), dtype=torch.bool, device=sim.device)
    positive = same & ~eye
    negative = ~same
    num_positive = positive.sum(1)
    is_anchor = num_positive > 0

    if pos_mode == "hardest":
        hardest = sim.masked_fill(~positive, float("inf")).min(1).values
        hardest = torch.where(is_anchor, hardest, torch.zeros_like(hardest))  # keep non-anchors finite
        hinge_arg = sim - hardest.unsqueeze(1) + alpha           # (k, j)
        pairs = negative
    else:
        hinge_arg = sim.unsqueeze(1) - sim.unsqueeze(2) + alpha  # (k, i, j): s_kj − s_ki + α
        pairs = positive.unsqueeze(2) & negative.unsqueeze(1)
    if neg_mode == "literal":
        terms = torch.exp(torch.relu(hinge_arg))
    else:
        terms = torch.where(hinge_arg > 0, torch.exp(hinge_arg), torch.zeros_like(hinge_arg))
    summed = (terms * pairs).flatten(1).sum(1)
    rank_term = torch.log1p(summed)
    # |P| in sim's dtype: an int tensor times 2.0 would be float32 and round λ/(2|P|) for fp64 inputs.
    pull_term = lam / (2.0 * num_positive.clamp_min(1).to(sim.dtype)) * ((sim - 1.0).pow(2) * positive).sum(1)
    per_anchor = (rank_term + pull_term) * is_anchor
    return per_anchor.sum() / is_anchor.sum().clamp_min(1)
