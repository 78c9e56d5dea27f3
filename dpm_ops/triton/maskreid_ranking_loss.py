"""Triton kernel of MaskReID's ranking loss (maths: dpm_ops/ops/maskreid_ranking_loss_reference.py,
csrc/maskreid_ranking_loss/maskreid_ranking_loss_math.h).

The similarities S = X Xᵀ come from one GEMM in torch (the reference's, with torch's precision
settings); one program per anchor row k then mines its row s (positives, hardest positive with
first-index ties, negatives), sums the hinge terms and writes the row's closed-form dL/dS; in
pos_mode "all_eq5" the row's (positive, negative) pairs are visited BLOCK_P positives at a time,
never as one n × n tile (a program holds O(n) values: sized for training batches); pos_mode "eq4"
needs no pairs at all: its double sum factors into two log-sum-exps over the row. Torch then takes
the mean over anchors and symmetrises (coef = (G + Gᵀ) / #anchors): a handful of n² element ops.
"""

import torch
import triton
import triton.language as tl

from .._precision import compute_dtype
from ._device import on_input_device
from ._precision import COMPILE_OPTIONS, div_rn, log1p, scalar_as


@triton.jit
def _ranking_row_kernel(
    sim_ptr,
    labels_ptr,
    row_loss_ptr,
    anchor_ptr,
    coef_ptr,
    n,
    alpha: tl.float64,  # see scalar_as
    lam: tl.float64,
    VIOLATING_ONLY: tl.constexpr,
    POS_MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    k = tl.program_id(0)
    acc_t = row_loss_ptr.dtype.element_ty
    alpha = scalar_as(alpha, acc_t)
    lam = scalar_as(lam, acc_t)
    idx = tl.arange(0, BLOCK_B)
    valid = idx < n
    row = sim_ptr + k.to(tl.int64) * n
    s = tl.load(row + idx, mask=valid, other=0.0)
    labels = tl.load(labels_ptr + idx, mask=valid, other=0)
    label_k = tl.load(labels_ptr + k)
    pos = valid & (labels == label_k) & (idx != k)
    neg = valid & (labels != label_k)
    num_pos = tl.sum(pos.to(tl.int32), 0)
    if POS_MODE == "eq4":
        # softplus(a + b), a = LSE_N(s), b = LSE_P(−s), shifted by the most similar negative and the
        # hardest positive (0 for an empty set: no inf enters the arithmetic).
        has_neg = tl.sum(neg.to(tl.int32), 0) > 0
        top = tl.where(has_neg, tl.max(tl.where(neg, s, float("-inf")), 0), 0.0)
        hardest = tl.where(num_pos > 0, tl.min(tl.where(pos, s, float("inf")), 0), 0.0)
        neg_exp = tl.exp(tl.where(neg, s - top, float("-inf")))  # each <= 1, exactly 0 off the set
        pos_exp = tl.exp(tl.where(pos, hardest - s, float("-inf")))
        # >= 1 already for a non-empty set (its largest term is 1); 1 keeps an empty set's log finite
        neg_sum = tl.maximum(tl.sum(neg_exp, 0), 1.0)
        pos_sum = tl.maximum(tl.sum(pos_exp, 0), 1.0)
        t = (top - hardest) + (tl.log(neg_sum) + tl.log(pos_sum))  # shifts first, as the C++ kernel
        e = tl.exp(-tl.abs(t))  # e^-|t| <= 1: softplus and sigmoid without overflow
        sig = tl.where(t < 0, div_rn(e, 1.0 + e), div_rn(1.0, 1.0 + e))
        # no negative: log(1 + 0) = 0 and no gradient
        loss = tl.where(has_neg, tl.maximum(t, 0.0) + log1p(e), 0.0)
        g = tl.where(has_neg, sig * (div_rn(neg_exp, neg_sum) - div_rn(pos_exp, pos_sum)), 0.0)
    else:
        satisfied = 0.0 if VIOLATING_ONLY else 1.0  # literal Eq. 5: exp(max(z, 0)) = 1 for z <= 0
        if POS_MODE == "all_eq5":
            # The (reference i, negative j) pairs, BLOCK_P reference rows at a time (a whole n x n tile
            # would not fit in registers); w_ij summed over i for the negatives, over j for the positives.
            total = tl.zeros((), dtype=acc_t)
            neg_weight = tl.zeros((BLOCK_B,), dtype=acc_t)
            pos_weight = tl.zeros((BLOCK_B,), dtype=acc_t)
            for i0 in range(0, n, BLOCK_P):
                i = i0 + tl.arange(0, BLOCK_P)
                s_i = tl.load(row + i, mask=i < n, other=0.0)
                labels_i = tl.load(labels_ptr + i, mask=i < n, other=0)
                pair = ((i < n) & (labels_i == label_k) & (i != k))[:, None] & neg[None, :]
                z = s[None, :] - s_i[:, None] + alpha
                weight = tl.where(pair & (z > 0), tl.exp(z), 0.0)
                total += tl.sum(tl.sum(tl.where(pair, tl.where(z > 0, tl.exp(z), satisfied), 0.0), 1), 0)
                neg_weight += tl.sum(weight, 0)
                # the chunk's row sums, placed at their rows of the full vector
                pos_weight += tl.sum(tl.where(i[:, None] == idx[None, :], tl.sum(weight, 1)[:, None], 0.0), 0)
        else:
            hardest = tl.min(tl.where(pos, s, float("inf")), 0)
            hardest_idx = tl.min(tl.where(pos & (s == hardest), idx, BLOCK_B), 0)  # first index among ties
            z = s - hardest + alpha
            neg_weight = tl.where(neg & (z > 0), tl.exp(z), 0.0)
            total = tl.sum(tl.where(neg, tl.where(z > 0, tl.exp(z), satisfied), 0.0), 0)
            pos_weight = tl.where(idx == hardest_idx, tl.sum(neg_weight, 0), 0.0)
        pos_count = tl.maximum(num_pos, 1).to(acc_t)
        pull = tl.sum(tl.where(pos, (s - 1.0) * (s - 1.0), 0.0), 0)
        loss = log1p(total) + div_rn(lam, 2.0 * pos_count) * pull
        inv = div_rn(1.0, 1.0 + total)
        pull_slope = div_rn(lam, pos_count)  # of the pull term, per (s - 1)
        g = tl.where(neg, neg_weight * inv, 0.0) + tl.where(pos, pull_slope * (s - 1.0) - pos_weight * inv, 0.0)
    anchor = num_pos > 0
    tl.store(row_loss_ptr + k, tl.where(anchor, loss, 0.0))
    tl.store(anchor_ptr + k, anchor.to(acc_t))
    tl.store(coef_ptr + k.to(tl.int64) * n + idx, tl.where(anchor, g, 0.0), mask=valid)


@on_input_device
def ranking_loss_forward(
    embeddings: torch.Tensor, labels: torch.Tensor, alpha: float, lam: float, neg_mode: str, pos_mode: str
):
    """(loss, coef = G + Gᵀ) with G = dL/dS, as the C++ op returns them."""
    n = embeddings.shape[0]
    acc = compute_dtype(embeddings)
    device = embeddings.device
    with torch.autocast(device.type, enabled=False):  # the reference's GEMM, in the compute dtype
        x = embeddings.to(acc)
        sim = (x @ x.t()).contiguous()
    row_loss = torch.zeros(n, dtype=acc, device=device)
    anchor = torch.zeros(n, dtype=acc, device=device)
    coef = torch.zeros((n, n), dtype=acc, device=device)
    if n > 0:
        block_b = max(16, triton.next_power_of_2(n))
        _ranking_row_kernel[(n,)](
            sim,
            labels.to(torch.int64).contiguous(),
            row_loss,
            anchor,
            coef,
            n,
            alpha,
            lam,
            VIOLATING_ONLY=neg_mode == "violating_only",
            POS_MODE=pos_mode,
            BLOCK_B=block_b,
            BLOCK_P=max(1, min(block_b, 2048 // block_b)),
            **COMPILE_OPTIONS,
        )
    count = anchor.sum().clamp_min(1.0)
    return row_loss.sum() / count, (coef + coef.t()) / count
