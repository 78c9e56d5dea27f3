"""Triton kernels of the masked prototype cosine (maths: dpm_ops/ops/masked_cosine_reference.py).

Forward: one program per (B-tile, K-tile) streams C in chunks and accumulates both dot products,
num = (xh*m)·ph and den² = (m*m)·(ph*ph), from the same loaded tiles, then writes C once.
Backward: the same kernel in "coefficient" mode turns the upstream gradient into
g_num = g/den' and h = g*C/den² (fp32/fp64, (B,K)); one more kernel streams those against the
prototypes (for x and mask) and against the queries (for protos); the cheap row-normalisation
backward then runs in torch.
fp32 dots use IEEE precision (no TF32), fp16/bf16 tiles use tensor cores with fp32 accumulation.
"""

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32
BLOCK_COLS = 32


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, low_t):
    """a @ b with full-precision accumulation: IEEE products, or tensor cores on `low_t` operands."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(low_t), b.to(low_t)).to(a.dtype)


@triton.jit
def _masked_cosine_tile_kernel(x_ptr, m_ptr, p_ptr, inv_x_ptr, inv_p_ptr, out_ptr, grad_ptr, g_num_ptr, h_ptr,
                               B, K, C, eps,
                               COEFS: tl.constexpr, IEEE: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_C)
    in_b = rows_b < B
    in_k = rows_k < K
    acc_t = inv_x_ptr.dtype.element_ty
    inv_x = tl.load(inv_x_ptr + rows_b, mask=in_b, other=0.0)
    inv_p = tl.load(inv_p_ptr + rows_k, mask=in_k, other=0.0)
    num = tl.zeros((BLOCK_B, BLOCK_K), dtype=acc_t)
    den_sq = tl.zeros((BLOCK_B, BLOCK_K), dtype=acc_t)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        in_c = c < C
        qmask = in_b[:, None] & in_c[None, :]
        pmask = in_k[:, None] & in_c[None, :]
        x = tl.load(x_ptr + rows_b[:, None].to(tl.int64) * C + c[None, :], mask=qmask, other=0.0).to(acc_t)
        m = tl.load(m_ptr + rows_b[:, None].to(tl.int64) * C + c[None, :], mask=qmask, other=0.0).to(acc_t)
        p = tl.load(p_ptr + rows_k[:, None].to(tl.int64) * C + c[None, :], mask=pmask, other=0.0).to(acc_t)
        ph = p * inv_p[:, None]
        a = x * inv_x[:, None] * m
        num += _dot(a, tl.trans(ph), IEEE, p_ptr.dtype.element_ty)
        den_sq += _dot(m * m, tl.trans(ph * ph), IEEE, p_ptr.dtype.element_ty)
    den = tl.sqrt(den_sq)
    cos = num / tl.maximum(den, eps)
    offs = rows_b[:, None].to(tl.int64) * K + rows_k[None, :]
    omask = in_b[:, None] & in_k[None, :]
    if COEFS:
        g = tl.load(grad_ptr + offs, mask=omask, other=0.0).to(acc_t)
        c_out = tl.load(out_ptr + offs, mask=omask, other=0.0).to(acc_t)
        live = den > eps
        tl.store(g_num_ptr + offs, g / tl.maximum(den, eps), mask=omask)
        tl.store(h_ptr + offs, tl.where(live, g * c_out / tl.where(live, den_sq, 1.0), 0.0), mask=omask)
    else:
        tl.store(out_ptr + offs, cos.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _coef_grad_kernel(x_ptr, m_ptr, inv_x_ptr, p_ptr, inv_p_ptr, g_num_ptr, h_ptr, out1_ptr, out2_ptr, B, K, C,
                      FOR_QUERY: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """Streams the (B, K) coefficients against the other side's rows, for a (rows x C) tile:

    FOR_QUERY (rows b, inner k): u = G_num @ Ph, v = H @ Ph²  ->  out1 = grad_xh = m*u, out2 = grad_m = xh*u - m*v
    else (rows k, inner b): up = G_numᵀ @ (Xh*M), vp = Hᵀ @ M²  ->  out1 = grad_ph = up - ph*vp
    The coefficients are fp32/fp64, so the dots are IEEE whatever the input dtype.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < C
    acc_t = inv_x_ptr.dtype.element_ty
    if FOR_QUERY:
        num_rows, num_inner, stride_row, stride_inner = B, K, K, 1
    else:
        num_rows, num_inner, stride_row, stride_inner = K, B, 1, K
    in_r = rows < num_rows
    acc1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
    acc2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
    for i0 in range(0, num_inner, BLOCK_I):
        inner = i0 + tl.arange(0, BLOCK_I)
        in_i = inner < num_inner
        coef_offs = rows[:, None].to(tl.int64) * stride_row + inner[None, :].to(tl.int64) * stride_inner
        cmask = in_r[:, None] & in_i[None, :]
        g_num = tl.load(g_num_ptr + coef_offs, mask=cmask, other=0.0)
        h = tl.load(h_ptr + coef_offs, mask=cmask, other=0.0)
        offs = inner[:, None].to(tl.int64) * C + c[None, :]
        omask = in_i[:, None] & in_c[None, :]
        if FOR_QUERY:  # the other side: prototypes, (ph, ph²)
            inv_p = tl.load(inv_p_ptr + inner, mask=in_i, other=0.0)
            first = tl.load(p_ptr + offs, mask=omask, other=0.0).to(acc_t) * inv_p[:, None]
            second = first * first
        else:  # the other side: queries, (xh*m, m²)
            inv_x = tl.load(inv_x_ptr + inner, mask=in_i, other=0.0)
            m = tl.load(m_ptr + offs, mask=omask, other=0.0).to(acc_t)
            first = tl.load(x_ptr + offs, mask=omask, other=0.0).to(acc_t) * inv_x[:, None] * m
            second = m * m
        acc1 += tl.dot(g_num, first, input_precision="ieee")
        acc2 += tl.dot(h, second, input_precision="ieee")
    own = rows[:, None].to(tl.int64) * C + c[None, :]
    own_mask = in_r[:, None] & in_c[None, :]
    if FOR_QUERY:
        inv_x = tl.load(inv_x_ptr + rows, mask=in_r, other=0.0)
        x = tl.load(x_ptr + own, mask=own_mask, other=0.0).to(acc_t)
        m = tl.load(m_ptr + own, mask=own_mask, other=0.0).to(acc_t)
        tl.store(out1_ptr + own, m * acc1, mask=own_mask)
        tl.store(out2_ptr + own, (x * inv_x[:, None]) * acc1 - m * acc2, mask=own_mask)
    else:
        inv_p = tl.load(inv_p_ptr + rows, mask=in_r, other=0.0)
        ph = tl.load(p_ptr + own, mask=own_mask, other=0.0).to(acc_t) * inv_p[:, None]
        tl.store(out1_ptr + own, acc1 - ph * acc2, mask=own_mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inv_norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v.to(_acc_dtype(v.dtype)).norm(dim=1).clamp_min(eps).reciprocal()


def _ieee(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def _normalize_backward(grad_hat: torch.Tensor, v: torch.Tensor, inv: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient through v / max(||v||, eps), rows; the clamped rows pass grad/eps straight."""
    v_hat = v.to(inv.dtype) * inv[:, None]
    dot = (v_hat * grad_hat).sum(dim=1, keepdim=True)
    clamped = (inv >= 1.0 / eps)[:, None]
    return torch.where(clamped, grad_hat, grad_hat - v_hat * dot) * inv[:, None]


def _grid(rows: int, cols: int):
    return (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))


def masked_cosine_forward(x: torch.Tensor, mask: torch.Tensor, protos: torch.Tensor, eps: float) -> torch.Tensor:
    B, C = x.shape
    K = protos.shape[0]
    out = torch.empty((B, K), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x, mask, protos = x.contiguous(), mask.contiguous(), protos.contiguous()
    _masked_cosine_tile_kernel[_grid(B, K)](
        x, mask, protos, _inv_norm(x, eps), _inv_norm(protos, eps), out, out, out, out, B, K, C, eps,
        COEFS=False, IEEE=_ieee(x.dtype), BLOCK_B=BLOCK_ROWS, BLOCK_K=BLOCK_COLS, BLOCK_C=32)
    return out


def masked_cosine_backward(grad, x, mask, protos, out, eps):
    B, C = x.shape
    K = protos.shape[0]
    if B == 0 or K == 0:
        return torch.zeros_like(x), torch.zeros_like(mask), torch.zeros_like(protos)
    grad, x, mask, protos, out = (t.contiguous() for t in (grad, x, mask, protos, out))
    acc = _acc_dtype(x.dtype)
    inv_x, inv_p = _inv_norm(x, eps), _inv_norm(protos, eps)
    g_num = torch.empty((B, K), dtype=acc, device=x.device)
    h = torch.empty_like(g_num)
    _masked_cosine_tile_kernel[_grid(B, K)](
        x, mask, protos, inv_x, inv_p, out, grad, g_num, h, B, K, C, eps,
        COEFS=True, IEEE=_ieee(x.dtype), BLOCK_B=BLOCK_ROWS, BLOCK_K=BLOCK_COLS, BLOCK_C=32)
    grad_xh = torch.empty((B, C), dtype=acc, device=x.device)
    grad_m = torch.empty_like(grad_xh)
    _coef_grad_kernel[_grid(B, C)](
        x, mask, inv_x, protos, inv_p, g_num, h, grad_xh, grad_m, B, K, C, FOR_QUERY=True,
        BLOCK_R=BLOCK_ROWS, BLOCK_I=32, BLOCK_C=BLOCK_COLS)
    grad_ph = torch.empty((K, C), dtype=acc, device=x.device)
    _coef_grad_kernel[_grid(K, C)](
        x, mask, inv_x, protos, inv_p, g_num, h, grad_ph, grad_ph, B, K, C, FOR_QUERY=False,
        BLOCK_R=BLOCK_ROWS, BLOCK_I=32, BLOCK_C=BLOCK_COLS)
    grad_x = _normalize_backward(grad_xh, x, inv_x, eps)
    grad_p = _normalize_backward(grad_ph, protos, inv_p, eps)
    return grad_x.to(x.dtype), grad_m.to(mask.dtype), grad_p.to(protos.dtype)
