"""Plain-PyTorch reference of MaskReID's ranking loss (the paper's Eqs. 4 and 5).

For an anchor k with positives P (same identity, anchor excluded) and negatives N, on
L2-normalised embeddings with ``s_kj = x_kᵀ x_j``, Eq. 5 (the paper's training loss) is

    L_k = log(1 + Σ_{j∈N} exp([s_kj − s_k^{p*} + α]_+)) + λ/(2|P|) Σ_{i∈P} (s_ki − 1)²,
    s_k^{p*} = min_{i∈P} s_ki  (the hardest positive),  α = 0.15,  λ = 2,

and Eq. 4 (the full ranking loss it simplifies; no margin, hinge or pull term) is

    L_k = log(1 + Σ_{i∈P} Σ_{j∈N} exp(s_kj − s_ki)).

Anchors are the samples with at least one positive (with the paper's 10 + 54 batch: the 10 images
of the sampled identity); the batch loss is their mean (0 when there is no anchor). An anchor
without negatives adds log(1 + 0) (+ Eq. 5's pull term).

``pos_mode`` picks the equation and the positives:
* ``"hardest"`` (default): Eq. 5 (ties: the first index, as torch.min).
* ``"all_eq5"``: Eq. 5's margin, hinge and pull term over every (positive, negative) pair, i.e.
  ``exp([s_kj − s_ki + α]_+)`` summed over i ∈ P and j ∈ N (what ``pos_mode="all"`` used to be).
* ``"eq4"``: Eq. 4; ``alpha`` and ``lam`` are not used, ``neg_mode`` must stay "literal".
``neg_mode`` (Eq. 5's hinge; the paper's text allows both readings):
* ``"literal"`` (default): Eq. 5 as printed; a satisfied negative still adds exp(0) = 1,
  so the first term never drops below log(1 + |N|).
* ``"violating_only"``: only negatives with a positive hinge argument enter the sum.

The embeddings are taken as given (not re-normalised); fp16/bf16 are computed in fp32.
"""

import torch

from .._precision import at_least_fp32

NEG_MODES = ("literal", "violating_only")
POS_MODES = ("hardest", "all_eq5", "eq4")
# Old names refused with the new one: "all" read as Eq. 4 but kept Eq. 5's margin, hinge and pull.
RENAMED_POS_MODES = {"all": "all_eq5"}


def check_modes(neg_mode: str, pos_mode: str) -> None:
    """ValueError for a mode no backend takes (one line, naming the argument)."""
    if pos_mode in RENAMED_POS_MODES:
        raise ValueError(
            f"maskreid_ranking_loss: pos_mode {pos_mode!r} was renamed {RENAMED_POS_MODES[pos_mode]!r} "
            "(Eq. 5's margin, hinge and pull over every positive); the paper's Eq. 4 is 'eq4'"
        )
    if neg_mode not in NEG_MODES:
        raise ValueError(f"maskreid_ranking_loss: neg_mode must be one of {NEG_MODES}, got {neg_mode!r}")
    if pos_mode not in POS_MODES:
        raise ValueError(f"maskreid_ranking_loss: pos_mode must be one of {POS_MODES}, got {pos_mode!r}")
    if pos_mode == "eq4" and neg_mode != "literal":
        raise ValueError(
            "maskreid_ranking_loss: neg_mode does not apply to pos_mode 'eq4' (no margin, no hinge): "
            f"leave it 'literal', got {neg_mode!r}"
        )


def maskreid_ranking_loss_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.15,
    lam: float = 2.0,
    neg_mode: str = "literal",
    pos_mode: str = "hardest",
) -> torch.Tensor:
    check_modes(neg_mode, pos_mode)
    x = at_least_fp32(embeddings)
    sim = x @ x.t()
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    eye = torch.eye(len(labels), dtype=torch.bool, device=sim.device)
    positive = same & ~eye
    negative = ~same
    num_positive = positive.sum(1)
    is_anchor = num_positive > 0

    if pos_mode == "eq4":
        # Σ_i Σ_j exp(s_kj − s_ki) = Σ_j exp(s_kj) · Σ_i exp(−s_ki): log(1 + e^(a + b)) with the two
        # log-sum-exps, stable and O(n) per row. An empty set gives −inf, hence log(1 + 0) = 0;
        # masked_fill's backward zeroes the NaN logsumexp's backward makes on such a row.
        # Shifted by the most similar negative and the hardest positive (constants: a + b does not depend
        # on them), whose difference is taken first, as the kernels: else, at large similarities, the
        # log-sum-exps round their logs (the set sizes) away and their softmax gradients no longer sum to 1.
        top = sim.masked_fill(~negative, float("-inf")).amax(1).detach()
        hardest = sim.masked_fill(~positive, float("inf")).amin(1).detach()
        top, hardest = torch.where(top.isfinite(), top, 0.0), torch.where(hardest.isfinite(), hardest, 0.0)
        a = (sim - top[:, None]).masked_fill(~negative, float("-inf")).logsumexp(1)  # log Σ_N exp(s_kj − top)
        b = (hardest[:, None] - sim).masked_fill(~positive, float("-inf")).logsumexp(1)  # log Σ_P exp(hardest − s_ki)
        t = (top - hardest) + (a + b)
        per_anchor = torch.logaddexp(t, torch.zeros_like(t))  # log(1 + e^(a + b))
        return torch.where(is_anchor, per_anchor, 0.0).sum() / is_anchor.sum().clamp_min(1)

    if pos_mode == "hardest":
        hardest = sim.masked_fill(~positive, float("inf")).min(1).values
        hardest = torch.where(is_anchor, hardest, torch.zeros_like(hardest))  # keep non-anchors finite
        hinge_arg = sim - hardest.unsqueeze(1) + alpha  # (k, j)
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
