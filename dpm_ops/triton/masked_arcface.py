"""Triton kernels of the fused masked ArcFace cross-entropy (maths: csrc/masked_arcface/masked_arcface_math.h,
reference: dpm_ops.losses.masked_arcface_cross_entropy(..., backend="reference")).

One tile kernel, grid (B tiles, K tiles), streams C once per tile for both dot products of the masked
cosine (and the plain logits f·wᵀ), then, in the epilogue:
* forward: the tile's partial log-sum-exp per row (max, sum) of the ArcFace and plain logits, and the
  target logits; partials (B, K/BLOCK_K) are merged in torch. No (B, K) matrix is written at all.
* gradients (for a unit upstream gradient, when autograd needs them; per row chunk of ceil(B/2) rows
  as the C++ driver): the tile recomputed, the masked cosine's coefficients g_num, h and the plain
  logits' gradient; the GEMMs against the prototypes / queries then run in torch (cuBLAS), and the
  rows' normalisation backward reuses the masked cosine's Triton helpers.
The tile's dots follow triton/_precision.py (fp32: IEEE, or TF32 under torch's "high"/"medium"
matmul precision, as the torch GEMMs of the gradients; fp64: fp64).
"""

import math

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._precision import COMPILE_OPTIONS, div_rn, dot, dot_precision, scalar_as, sqrt_rn
from .._precision import compute_dtype
from .masked_cosine import _cosine_grads, _inv_norm, _normalize_backward, _prepared

EPS = 1e-12
BLOCK_B = 32
BLOCK_K = 32


@triton.jit
def _tile_dots(
    f_ptr, m_ptr, w_ptr, inv_f, inv_w, rows, ks, in_b, in_k, C, WITH_PLAIN, PRECISION, BLOCK_B, BLOCK_K, BLOCK_C
):
    """The masked cosine's numerator <f̂ ⊙ m, ŵ> and squared denominator ||m ⊙ ŵ||², and the plain
    logits f·wᵀ, of one (BLOCK_B, BLOCK_K) tile, streaming C once."""
    acc_t = inv_f.dtype
    in_t = w_ptr.dtype.element_ty
    num = tl.zeros((BLOCK_B, BLOCK_K), dtype=acc_t)
    den_sq = tl.zeros((BLOCK_B, BLOCK_K), dtype=acc_t)
    plain = tl.zeros((BLOCK_B, BLOCK_K), dtype=acc_t)
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        in_c = c < C
        qmask = in_b[:, None] & in_c[None, :]
        f = tl.load(f_ptr + rows[:, None].to(tl.int64) * C + c[None, :], mask=qmask, other=0.0).to(acc_t)
        m = tl.load(m_ptr + rows[:, None].to(tl.int64) * C + c[None, :], mask=qmask, other=0.0).to(acc_t)
        w = tl.load(
            w_ptr + ks[:, None].to(tl.int64) * C + c[None, :], mask=in_k[:, None] & in_c[None, :], other=0.0
        ).to(acc_t)
        wh = w * inv_w[:, None]
        num = dot(f * inv_f[:, None] * m, tl.trans(wh), num, PRECISION, in_t)
        den_sq = dot(m * m, tl.trans(wh * wh), den_sq, PRECISION, in_t)
        if WITH_PLAIN:
            plain = dot(f, tl.trans(w), plain, PRECISION, in_t)
    return num, den_sq, plain


@triton.jit
def _target_phi(cos, cos_m, sin_m, th, mm, lo, hi, EASY: tl.constexpr):
    """ArcFace's target logit phi(cos) = cos(theta + margin) and its slope d phi / d cos.
    The clamp is only inside the sqrt (bounds inclusive, as torch.clamp)."""
    cos_m = scalar_as(cos_m, cos.dtype)
    sin_m = scalar_as(sin_m, cos.dtype)
    th = scalar_as(th, cos.dtype)
    mm = scalar_as(mm, cos.dtype)
    lo = scalar_as(lo, cos.dtype)
    hi = scalar_as(hi, cos.dtype)
    inside = (cos >= lo) & (cos <= hi)
    cc = tl.minimum(tl.maximum(cos, lo), hi)
    sine = sqrt_rn(1.0 - cc * cc)
    phi = cos * cos_m - sine * sin_m
    dphi = cos_m + tl.where(inside & (sine > 0.0), div_rn(sin_m * cos, sine), 0.0)  # flat sqrt at 0, as the C++ kernel
    if EASY:
        keep = cos > 0.0
        phi = tl.where(keep, phi, cos)
    else:
        keep = cos > th
        phi = tl.where(keep, phi, cos - mm)
    dphi = tl.where(keep, dphi, 1.0)
    return phi, dphi


@triton.jit
def _store_partial_lse(ptr, plane, logits, valid, in_b):
    """The tile's partial log-sum-exp of each row: its max at ``ptr``, its sum of exp(x - max) one
    (B, K tiles) ``plane`` further on."""
    lm = tl.where(valid, logits, float("-inf"))
    mx = tl.where(in_b, tl.max(lm, axis=1), 0.0)  # padding rows: no -inf - -inf
    tl.store(ptr, mx, mask=in_b)
    tl.store(ptr + plane, tl.sum(tl.where(valid, tl.exp(lm - mx[:, None]), 0.0), axis=1), mask=in_b)


@triton.jit
def _forward_epilogue(part_ptr, target_ptr, rows, pid_k, B, n_ktiles, logit, plain, is_t, valid, in_b, WITH_PLAIN):
    """Partial log-sum-exps (B, K tiles) of the ArcFace logits (planes 0, 1) and the plain logits
    (planes 2, 3), and each row's target logits where the tile holds the row's label."""
    part = rows.to(tl.int64) * n_ktiles + pid_k
    plane = B * n_ktiles
    has_t = tl.sum(is_t.to(tl.int32), axis=1) > 0
    _store_partial_lse(part_ptr + part, plane, logit, valid, in_b)
    tl.store(target_ptr + rows, tl.sum(tl.where(is_t, logit, 0.0), axis=1), mask=in_b & has_t)
    if WITH_PLAIN:
        _store_partial_lse(part_ptr + 2 * plane + part, plane, plain, valid, in_b)
        tl.store(target_ptr + B + rows, tl.sum(tl.where(is_t, plain, 0.0), axis=1), mask=in_b & has_t)


@triton.jit
def _arcface_tile_kernel(
    f_ptr,
    m_ptr,
    w_ptr,
    inv_f_ptr,
    inv_w_ptr,
    labels_ptr,
    part_ptr,
    target_ptr,
    grad_ptr,
    mlse_ptr,
    plse_ptr,
    gnum_ptr,
    h_ptr,
    gp_ptr,
    row0,
    n_rows,
    B,
    K,
    C,
    n_ktiles,
    # the loss constants (see scalar_as)
    scale: tl.float64,
    cos_m: tl.float64,
    sin_m: tl.float64,
    th: tl.float64,
    mm: tl.float64,
    lo: tl.float64,
    hi: tl.float64,
    plain_w: tl.float64,
    masked_w: tl.float64,
    inv_batch: tl.float64,
    eps: tl.float64,
    EASY: tl.constexpr,
    WITH_PLAIN: tl.constexpr,
    BACKWARD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    acc_t = inv_f_ptr.dtype.element_ty
    scale = scalar_as(scale, acc_t)
    eps = scalar_as(eps, acc_t)
    pid_k = tl.program_id(1)
    local = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows = row0 + local
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_b = local < n_rows
    in_k = ks < K
    inv_f = tl.load(inv_f_ptr + rows, mask=in_b, other=0.0)
    inv_w = tl.load(inv_w_ptr + ks, mask=in_k, other=0.0)
    num, den_sq, plain = _tile_dots(
        f_ptr, m_ptr, w_ptr, inv_f, inv_w, rows, ks, in_b, in_k, C, WITH_PLAIN, PRECISION, BLOCK_B, BLOCK_K, BLOCK_C
    )
    den = sqrt_rn(den_sq)
    cos = div_rn(num, tl.maximum(den, eps))
    labels = tl.load(labels_ptr + rows, mask=in_b, other=-1)
    valid = in_b[:, None] & in_k[None, :]
    is_t = (labels[:, None] == ks[None, :]) & valid
    phi, dphi = _target_phi(cos, cos_m, sin_m, th, mm, lo, hi, EASY)
    logit = scale * tl.where(is_t, phi, cos)
    if not BACKWARD:
        _forward_epilogue(part_ptr, target_ptr, rows, pid_k, B, n_ktiles, logit, plain, is_t, valid, in_b, WITH_PLAIN)
    else:
        g = tl.load(grad_ptr).to(acc_t) * scalar_as(inv_batch, acc_t)
        mlse = tl.load(mlse_ptr + rows, mask=in_b, other=0.0)
        prob = tl.exp(logit - mlse[:, None])
        onehot = tl.where(is_t, 1.0, 0.0)
        gcos = scale * (g * scalar_as(masked_w, acc_t)) * (prob - onehot) * tl.where(is_t, dphi, 1.0)
        g_num, h = _cosine_grads(gcos, cos, den, den_sq, eps)
        # This order (exponential, coefficients, then offsets) keeps Triton 3.6 spill-free on sm_80 / sm_90.
        offs = local[:, None].to(tl.int64) * K + ks[None, :]
        tl.store(gnum_ptr + offs, g_num, mask=valid)
        tl.store(h_ptr + offs, h, mask=valid)
        if WITH_PLAIN:
            plse = tl.load(plse_ptr + rows, mask=in_b, other=0.0)
            tl.store(
                gp_ptr + offs, (g * scalar_as(plain_w, acc_t)) * (tl.exp(plain - plse[:, None]) - onehot), mask=valid
            )


def _loss_args(scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight, inv_batch, precision, backward):
    """The tile kernel's loss constants and compile-time options, shared by the forward and gradient launches."""
    return dict(
        scale=scale,
        cos_m=math.cos(margin),
        sin_m=math.sin(margin),
        th=math.cos(math.pi - margin),
        mm=math.sin(math.pi - margin) * margin,
        lo=-1.0 + clamp_eps,
        hi=1.0 - clamp_eps,
        plain_w=plain_weight,
        masked_w=masked_weight,
        inv_batch=inv_batch,
        eps=EPS,
        EASY=easy_margin,
        WITH_PLAIN=plain_weight != 0,
        BACKWARD=backward,
        PRECISION=precision,
        BLOCK_B=BLOCK_B,
        BLOCK_K=BLOCK_K,
        **_tile_options(precision),
    )


def _tile_options(precision: str) -> dict:
    """FMA (IEEE / fp64) dots hold whole operand tiles per thread: a narrow C chunk keeps the three
    accumulators spill-free; tensor cores take 32 (128-byte fp32 rows) over 8 warps (with 4, Triton
    3.6's ptxas spilled a few bytes on sm_80)."""
    return dict(BLOCK_C=16, num_warps=4) if precision == "ieee" else dict(BLOCK_C=32, num_warps=8)


def _rows_per_chunk(B):
    return max(1, -(-B // 2))  # the (rows, K) coefficient buffers hold at most ~one (B, K) matrix in all


def _forward(features, mask, weight, labels, scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight):
    B, C = features.shape
    K = weight.shape[0]
    acc = compute_dtype(features.dtype)
    precision = dot_precision(features.dtype)
    f, m, w, labels = features.contiguous(), mask.contiguous(), weight.contiguous(), labels.contiguous()
    with_plain = plain_weight != 0
    n_ktiles = triton.cdiv(K, BLOCK_K)
    parts = torch.zeros((4, B, n_ktiles), dtype=acc, device=f.device)
    targets = torch.zeros((2, B), dtype=acc, device=f.device)
    if B > 0:
        _arcface_tile_kernel[(triton.cdiv(B, BLOCK_B), n_ktiles)](
            f,
            m,
            w,
            _inv_norm(f, EPS),
            _inv_norm(w, EPS),
            labels,
            parts,
            targets,
            parts,
            parts,
            parts,
            parts,
            parts,
            parts,
            0,
            B,
            B,
            K,
            C,
            n_ktiles,
            **_loss_args(
                scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight, 1.0, precision, backward=False
            ),
            **COMPILE_OPTIONS,
        )

    def merge(maxes, sums):
        top = maxes.amax(1)
        return top + (sums * torch.exp(maxes - top[:, None])).sum(1).log()

    masked_lse = merge(parts[0], parts[1])
    plain_lse = merge(parts[2], parts[3]) if with_plain else torch.zeros_like(masked_lse)
    row_loss = masked_weight * (masked_lse - targets[0])
    if with_plain:
        row_loss = row_loss + plain_weight * (plain_lse - targets[1])
    # a label out of [0, K) has no target logit: NaN, as the CUDA kernel gives (the range is checked before,
    # except under torch.compile, where the finite loss of a zero target went unnoticed)
    row_loss = row_loss.masked_fill((labels < 0) | (labels >= K), math.nan)
    return row_loss.sum() / B, masked_lse, plain_lse


def _gradients(
    features,
    mask,
    weight,
    labels,
    masked_lse,
    plain_lse,
    scale,
    margin,
    easy_margin,
    clamp_eps,
    plain_weight,
    masked_weight,
):
    """Gradients of the loss w.r.t. (features, mask, weight), for a unit upstream gradient."""
    B, C = features.shape
    K = weight.shape[0]
    precision = dot_precision(features.dtype)
    f, m, w, labels = features.contiguous(), mask.contiguous(), weight.contiguous(), labels.contiguous()
    masked_lse, plain_lse = masked_lse.contiguous(), plain_lse.contiguous()
    with_plain = plain_weight != 0
    inv_f, inv_w = _inv_norm(f, EPS), _inv_norm(w, EPS)
    (fh_m, m_sq), (wh, wh_sq) = _prepared(f, inv_f, m), _prepared(w, inv_w)
    up, vp = torch.zeros_like(w), torch.zeros_like(w)
    grad_w_plain = torch.zeros_like(w)
    grad_f, grad_m = torch.empty_like(f), torch.empty_like(m)
    chunk = _rows_per_chunk(B)
    rows = min(chunk, B)
    g_num = torch.empty((rows, K), dtype=f.dtype, device=f.device)
    h = torch.empty_like(g_num)
    gp = torch.empty((rows if with_plain else 0, K), dtype=f.dtype, device=f.device)
    grad = torch.ones(1, dtype=f.dtype, device=f.device)
    for r0 in range(0, B, chunk):
        n = min(chunk, B - r0)
        _arcface_tile_kernel[(triton.cdiv(n, BLOCK_B), triton.cdiv(K, BLOCK_K))](
            f,
            m,
            w,
            inv_f,
            inv_w,
            labels,
            g_num,
            g_num,
            grad,
            masked_lse,
            plain_lse,
            g_num,
            h,
            gp,
            r0,
            n,
            B,
            K,
            C,
            1,
            **_loss_args(
                scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight, 1.0 / B, precision, backward=True
            ),
            **COMPILE_OPTIONS,
        )
        gn, hh, rs = g_num[:n], h[:n], slice(r0, r0 + n)
        u, v = gn @ wh, hh @ wh_sq
        up.addmm_(gn.t(), fh_m[rs])
        vp.addmm_(hh.t(), m_sq[rs])
        grad_m[rs] = f[rs] * inv_f[rs, None] * u - m[rs] * v
        grad_f[rs] = _normalize_backward(m[rs] * u, f[rs], inv_f[rs], EPS)
        if with_plain:
            grad_f[rs] += gp[:n] @ w
            grad_w_plain.addmm_(gp[:n].t(), f[rs])
    grad_w = _normalize_backward(up - wh * vp, w, inv_w, EPS) + grad_w_plain
    return grad_f, grad_m, grad_w


@on_input_device
def loss_and_grads(
    features, mask, weight, labels, scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight, with_grad
):
    """The dpm_ops::masked_arcface_ce_triton op: (loss, grad_features, grad_mask, grad_weight)."""
    options = (scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight)
    loss, masked_lse, plain_lse = _forward(features, mask, weight, labels, *options)
    if not with_grad:
        empty = features.new_empty((0,))
        return loss, empty, empty.clone(), empty.clone()
    return (loss, *_gradients(features, mask, weight, labels, masked_lse, plain_lse, *options))
