"""Triton kernel of MaskReID's ranking loss (maths: dpm_ops/ops/maskreid_ranking_loss_reference.py,
csrc/maskreid_ranking_loss/maskreid_ranking_loss_math.h).

One program per anchor row k computes its similarity row s = X x_k (streaming D in chunks), mines it
(positives, hardest positive with first-index ties, negatives), sums the hinge terms and writes the
row's closed-form dL/dS; in pos_mode "all" the (positive, negative) pairs of the row form one n × n
tile, so the kernel is sized for training batches (n up to a few hundred). Torch then takes the
mean over anchors and symmetrises (coef = (G + Gᵀ) / #anchors): a handful of n² element ops.
"""

import torch
import triton
import triton.language as tl

from ._device import on_input_device


@triton.jit
def _log1p(t):
    """log(1 + t) to a few ulps for small t too (Goldberg's trick; libdevice's log1p has no interpreter)."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * t / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def _ranking_row_kernel(x_ptr, labels_ptr, row_loss_ptr, anchor_ptr, coef_ptr, n, D, alpha, lam,
                        VIOLATING_ONLY: tl.constexpr, ALL_POSITIVES: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    k = tl.program_id(0)
    acc_t = row_loss_ptr.dtype.element_ty
    idx = tl.arange(0, BLOCK_B)
    valid = idx < n
    s = tl.zeros((BLOCK_B,), dtype=acc_t)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < D
        xk = tl.load(x_ptr + k.to(tl.int64) * D + d, mask=in_d, other=0.0).to(acc_t)
        xs = tl.load(x_ptr + idx[:, None].to(tl.int64) * D + d[None, :], mask=valid[:, None] & in_d[None, :],
                     other=0.0).to(acc_t)
        s += tl.sum(xs * xk[None, :], 1)
    labels = tl.load(labels_ptr + idx, mask=valid, other=0)
    label_k = tl.load(labels_ptr + k)
    pos = valid & (labels == label_k) & (idx != k)
    neg = valid & (labels != label_k)
    num_pos = tl.sum(pos.to(tl.int32), 0)
    hardest = tl.min(tl.where(pos, s, float("inf")), 0)
    hardest_idx = tl.min(tl.where(pos & (s == hardest), idx, BLOCK_B), 0)  # first index among ties
    pull = tl.sum(tl.where(pos, (s - 1.0) * (s - 1.0), 0.0), 0)
    satisfied = 0.0 if VIOLATING_ONLY else 1.0  # literal Eq. 5: exp(max(z, 0)) = 1 for z <= 0
    if ALL_POSITIVES:
        z = s[None, :] - s[:, None] + alpha  # (reference i, negative j)
        pair = pos[:, None] & neg[None, :]
        weight = tl.where(pair & (z > 0), tl.exp(z), 0.0)
        total = tl.sum(tl.sum(tl.where(pair, tl.where(z > 0, tl.exp(z), satisfied), 0.0), 1), 0)
        neg_weight = tl.sum(weight, 0)  # Σ_i w_ij, per negative j
        pos_weight = tl.sum(weight, 1)  # Σ_j w_ij, per positive i
    else:
        z = s - hardest + alpha
        weight = tl.where(neg & (z > 0), tl.exp(z), 0.0)
        total = tl.sum(tl.where(neg, tl.where(z > 0, tl.exp(z), satisfied), 0.0), 0)
        neg_weight = weight
        pos_weight = tl.where(idx == hardest_idx, tl.sum(weight, 0), 0.0)
    anchor = num_pos > 0
    pos_count = tl.maximum(num_pos, 1).to(acc_t)
    loss = _log1p(total) + lam / (2.0 * pos_count) * pull
    inv = 1.0 / (1.0 + total)
    g = tl.where(neg, neg_weight * inv, 0.0) + tl.where(pos, lam / pos_count * (s - 1.0) - pos_weight * inv, 0.0)
    tl.store(row_loss_ptr + k, tl.where(anchor, loss, 0.0))
    tl.store(anchor_ptr + k, anchor.to(acc_t))
    tl.store(coef_ptr + k.to(tl.int64) * n + idx, tl.where(anchor, g, 0.0), mask=valid)


@on_input_device
def ranking_loss_forward(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float, lam: float, neg_mode: str,
                         pos_mode: str):
    """(loss, coef = G + Gᵀ) with G = dL/dS, as the C++ op returns them."""
    n, D = embeddings.shape
    acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x = embeddings.contiguous()
    row_loss = torch.zeros(n, dtype=acc, device=x.device)
    anchor = torch.zeros(n, dtype=acc, device=x.device)
    coef = torch.zeros((n, n), dtype=acc, device=x.device)
    if n > 0:
        block_b = max(16, triton.next_power_of_2(n))
        _ranking_row_kernel[(n,)](x, labels.to(torch.int64).contiguous(), row_loss, anchor, coef, n, D, alpha, lam,
                                  VIOLATING_ONLY=neg_mode == "violating_only", ALL_POSITIVES=pos_mode == "all",
                                  BLOCK_B=block_b, BLOCK_D=max(16, min(128, 4096 // block_b)))
    count = anchor.sum().clamp_min(1.0)
    return row_loss.sum() / count, (coef + coef.t()) / count
