"""Triton kernel of the batch-hard soft-margin triplet (maths: csrc/batch_hard_triplet/batch_hard_triplet_math.h,
reference: dpm_ops.losses.batch_hard_soft_margin_triplet(..., backend="reference")).

The Gram matrix comes from one GEMM (cuBLAS); one program per anchor row then forms the distances,
mines the hardest positive / negative (first index on ties, as torch.max / min) and writes the row's
softplus. The closed-form gradient (each anchor's two mined pairs) is a few O(B·C) torch ops.
"""

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._precision import COMPILE_OPTIONS, log1p, scalar_as, sqrt_rn

MIN_SQUARED = 1e-12


@triton.jit
def _mine_kernel(
    gram_ptr,
    sq_ptr,
    labels_ptr,
    pos_idx_ptr,
    neg_idx_ptr,
    pos_d2_ptr,
    neg_d2_ptr,
    loss_ptr,
    B,
    min_squared: tl.float64,  # see scalar_as
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    valid = j < B
    acc_t = sq_ptr.dtype.element_ty
    d2 = (
        tl.load(sq_ptr + i)
        + tl.load(sq_ptr + j, mask=valid, other=0.0)
        - 2.0 * tl.load(gram_ptr + i.to(tl.int64) * B + j, mask=valid, other=0.0)
    )
    # a float constexpr would be an fp32 constant (Triton 3.6): 9.99999996e-13, not 1e-12, for fp64 rows
    d = sqrt_rn(tl.maximum(d2, scalar_as(min_squared, acc_t)))
    same = tl.load(labels_ptr + j, mask=valid, other=-1) == tl.load(labels_ptr + i)
    pos = tl.where(valid & same, d, float("-inf"))
    neg = tl.where(valid & ~same, d, float("inf"))
    ap = tl.max(pos, axis=0)
    an = tl.min(neg, axis=0)
    p = tl.min(tl.where(pos == ap, j, BLOCK), axis=0)  # first index of the extreme
    has_neg = an < float("inf")
    n = tl.where(has_neg, tl.min(tl.where(neg == an, j, BLOCK), axis=0), -1)
    tl.store(pos_idx_ptr + i, p.to(tl.int64))
    tl.store(neg_idx_ptr + i, n.to(tl.int64))
    tl.store(pos_d2_ptr + i, tl.sum(tl.where(j == p, d2, 0.0), axis=0))
    tl.store(neg_d2_ptr + i, tl.sum(tl.where(j == n, d2, 0.0), axis=0))
    v = ap - an
    tl.store(loss_ptr + i, tl.where(v > 20.0, v, log1p(tl.exp(tl.minimum(v, 20.0)))).to(acc_t))


@on_input_device
def loss_and_grad(features, labels, with_grad):
    """The dpm_ops::batch_hard_triplet_triton op: (loss, grad for a unit upstream gradient or empty)."""
    x, labels = features.contiguous(), labels.contiguous()
    B = x.shape[0]
    gram = x @ x.t()
    sq = (x * x).sum(1)
    pos_idx = torch.empty(B, dtype=torch.int64, device=x.device)
    neg_idx = torch.empty_like(pos_idx)
    pos_d2, neg_d2, row_loss = (torch.empty(B, dtype=x.dtype, device=x.device) for _ in range(3))
    if B > 0:
        _mine_kernel[(B,)](
            gram,
            sq,
            labels,
            pos_idx,
            neg_idx,
            pos_d2,
            neg_d2,
            row_loss,
            B,
            MIN_SQUARED,
            BLOCK=triton.next_power_of_2(B),
            **COMPILE_OPTIONS,
        )
    loss = row_loss.sum() / B
    if not with_grad:
        return loss, x.new_empty((0,))
    has_neg = neg_idx >= 0
    ap = pos_d2.clamp_min(MIN_SQUARED).sqrt()
    an = torch.where(has_neg, neg_d2.clamp_min(MIN_SQUARED).sqrt(), torch.full_like(ap, float("inf")))
    v = ap - an
    slope = torch.where(v > 20, torch.ones_like(v), torch.sigmoid(v)) / B
    pos_coef = torch.where(pos_d2 >= MIN_SQUARED, slope / ap, torch.zeros_like(ap))
    neg_coef = torch.where(has_neg & (neg_d2 >= MIN_SQUARED), -slope / an, torch.zeros_like(an))
    neg_safe = torch.where(has_neg, neg_idx, torch.arange(B, device=x.device))
    pos_term = pos_coef[:, None] * (x - x[pos_idx])
    neg_term = neg_coef[:, None] * (x - x[neg_safe])
    grad = pos_term + neg_term
    # anchors share hardest positives / negatives: on CUDA index_add_ adds them with atomics, in any order (the
    # last bits may differ between runs; the CUDA backend's kernel, the default there, is deterministic)
    grad.index_add_(0, pos_idx, -pos_term)
    grad.index_add_(0, neg_safe, -neg_term)
    return loss, grad
