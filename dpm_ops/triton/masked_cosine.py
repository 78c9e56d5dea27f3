"""Triton kernels of the masked prototype cosine (maths: dpm_ops/ops/masked_cosine_reference.py).

Forward: the queries' operands a = xh*m and m² are prepared in torch (B rows: small); one program
per (B-tile, K-tile) streams C in chunks, normalises its prototype tile ph = p/|p| in registers
and accumulates both dot products, num = ph·a and den² = (ph*ph)·m², then writes C once. The tile
is held transposed (prototypes as rows): ph and ph² are the dots' first operand, which tensor
cores take from registers, while a and m² go straight from memory to shared memory.
Backward: the same kernel in "coefficient" mode recomputes C (the forward's output may be rounded to
fp16 / bf16, which put the gradients several roundings off) and turns the upstream gradient into
g_num = g/den' and h = g*C/den² (fp32/fp64, (B,K)); one more kernel streams those against the
prepared prototypes (for x and mask) and queries (for protos); the cheap row-normalisation
backward then runs in torch.
Dot precision (IEEE, TF32 or fp16/bf16 tensor cores; fp32/fp64 accumulation): triton/_precision.py; the
backward of fp16 / bf16 inputs takes fp32 operands, as fp32 inputs (the mask's and prototypes' gradients
are differences of nearly equal terms where a feature lies close to the prototypes' direction: bf16
operands put them 4x the reference's rounding off; training shapes, small dots).
"""

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._precision import compute_dtype
from ._device import on_input_device
from ._precision import COMPILE_OPTIONS, div_rn, dot, dot_precision, scalar_as, sqrt_rn


@triton.jit
def _cosine_grads(gcos, cos, den, den_sq, eps):
    """The masked cosine's backward coefficients for the upstream gradient ``gcos``: g_num = gcos / den
    (of the numerator) and h = gcos * cos / den² (of the denominator), 0 where den vanishes."""
    live = den > eps
    return div_rn(gcos, tl.maximum(den, eps)), tl.where(live, div_rn(gcos * cos, tl.where(live, den_sq, 1.0)), 0.0)


@triton.jit
def _masked_cosine_tile_kernel(
    a_ptr,
    m2_ptr,
    p_ptr,
    inv_p_ptr,
    out_ptr,  # the forward's C; unused in coefficient mode
    grad_ptr,
    g_num_ptr,
    h_ptr,
    B,
    K,
    C,
    eps: tl.float64,  # see scalar_as
    COEFS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_C)
    in_b = rows_b < B
    in_k = rows_k < K
    acc_t = inv_p_ptr.dtype.element_ty
    in_t = a_ptr.dtype.element_ty
    eps = scalar_as(eps, acc_t)
    inv_p = tl.load(inv_p_ptr + rows_k, mask=in_k, other=0.0)
    num = tl.zeros((BLOCK_K, BLOCK_B), dtype=acc_t)
    den_sq = tl.zeros((BLOCK_K, BLOCK_B), dtype=acc_t)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        in_c = c < C
        qmask = in_b[:, None] & in_c[None, :]
        a = tl.load(a_ptr + rows_b[:, None].to(tl.int64) * C + c[None, :], mask=qmask, other=0.0)
        m2 = tl.load(m2_ptr + rows_b[:, None].to(tl.int64) * C + c[None, :], mask=qmask, other=0.0)
        p = tl.load(
            p_ptr + rows_k[:, None].to(tl.int64) * C + c[None, :], mask=in_k[:, None] & in_c[None, :], other=0.0
        ).to(acc_t)
        ph = p * inv_p[:, None]
        num = dot(ph, tl.trans(a), num, PRECISION, in_t)
        den_sq = dot(ph * ph, tl.trans(m2), den_sq, PRECISION, in_t)
    den = sqrt_rn(den_sq)
    cos = div_rn(num, tl.maximum(den, eps))
    offs = rows_b[None, :].to(tl.int64) * K + rows_k[:, None]
    omask = in_k[:, None] & in_b[None, :]
    if COEFS:
        g = tl.load(grad_ptr + offs, mask=omask, other=0.0).to(acc_t)
        g_num, h = _cosine_grads(g, cos, den, den_sq, eps)
        tl.store(g_num_ptr + offs, g_num, mask=omask)
        tl.store(h_ptr + offs, h, mask=omask)
    else:
        tl.store(out_ptr + offs, cos.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _coef_grad_kernel(
    g_num_ptr,
    h_ptr,
    first_ptr,
    second_ptr,
    x_ptr,
    m_ptr,
    inv_x_ptr,
    p_ptr,
    inv_p_ptr,
    out1_ptr,
    out2_ptr,
    B,
    K,
    C,
    FOR_QUERY: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Streams the (B, K) coefficients against the other side's prepared rows (first, second), for a
    (rows x C) tile:

    FOR_QUERY (rows b, inner k): u = G_num @ Ph, v = H @ Ph²  ->  out1 = grad_xh = m*u, out2 = grad_m = xh*u - m*v
    else (rows k, inner b): up = G_numᵀ @ (Xh*M), vp = Hᵀ @ M²  ->  out1 = grad_ph = up - ph*vp
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < C
    acc_t = inv_x_ptr.dtype.element_ty
    in_t = first_ptr.dtype.element_ty
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
        acc1 = dot(g_num, tl.load(first_ptr + offs, mask=omask, other=0.0), acc1, PRECISION, in_t)
        acc2 = dot(h, tl.load(second_ptr + offs, mask=omask, other=0.0), acc2, PRECISION, in_t)
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


def _tile_blocks(precision: str, element_size: int, coefs: bool) -> dict:
    """IEEE / fp64 dots run on FMA units with whole operand tiles in registers per thread: small
    tiles keep them and both accumulators spill-free. Tensor cores: a GEMM tile (wgmma's 64-row warp
    groups, 128 bytes of C per operand row and stage, 3 stages in flight); half as many prototype
    rows in coefficient mode, whose epilogue holds two more (K, B) tiles (grad, C)."""
    if precision == "ieee":
        return dict(BLOCK_B=32, BLOCK_K=32, BLOCK_C=32, num_warps=4)
    return dict(BLOCK_B=64, BLOCK_K=64 if coefs else 128, BLOCK_C=128 // element_size, num_warps=8, num_stages=3)


def _coef_blocks(precision: str) -> dict:
    if precision == "ieee":
        return dict(BLOCK_R=32, BLOCK_I=16, BLOCK_C=32, num_warps=4)
    return dict(BLOCK_R=64, BLOCK_I=32, BLOCK_C=64, num_warps=4, num_stages=3)


def _inv_norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v.to(compute_dtype(v.dtype)).norm(dim=1).clamp_min(eps).reciprocal()


def _interpreted_bf16(dtype: torch.dtype) -> bool:
    """bf16 under the Triton interpreter, whose bf16 tl.dot multiplies the values' bit patterns
    (triton-lang/triton#11584: cosines of 3e5): its operands are fp32, multiplied in IEEE fp32 instead."""
    return dtype == torch.bfloat16 and triton_interpreted()


def _operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The prepared operands' dtype: the input dtype, except fp16, whose range is too narrow for
    them (mask values below 2^-7 square into subnormals, and x̂ ⊙ mask too for small masks): fp16
    inputs take fp32 operands on TF32 tensor cores (_operand_precision), as bf16 has fp32's range
    (bf16 under the interpreter: fp32 operands too, _interpreted_bf16)."""
    return torch.float32 if dtype == torch.float16 or _interpreted_bf16(dtype) else dtype


def _operand_precision(dtype: torch.dtype) -> str:
    if _interpreted_bf16(dtype):
        return "ieee"
    return "tf32" if dtype == torch.float16 else dot_precision(dtype)


def _prepared(v: torch.Tensor, inv: torch.Tensor, mask: torch.Tensor | None = None, operand=None):
    """(v̂ ⊙ mask, mask²) with v̂ = v * inv (rows), or (v̂, v̂²) without a mask: the dots' operands,
    computed in the accumulation dtype and stored in `operand` (default: the forward's, _operand_dtype)."""
    v_hat = v.to(inv.dtype) * inv[:, None]
    if mask is None:
        first, second = v_hat, v_hat * v_hat
    else:
        m = mask.to(inv.dtype)
        first, second = v_hat * m, m * m
    operand = operand or _operand_dtype(v.dtype)
    return first.to(operand).contiguous(), second.to(operand).contiguous()


def _normalize_backward(grad_hat: torch.Tensor, v: torch.Tensor, inv: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient through v / max(||v||, eps), rows; the clamped rows pass grad/eps straight."""
    v_hat = v.to(inv.dtype) * inv[:, None]
    along = (v_hat * grad_hat).sum(dim=1, keepdim=True)
    clamped = (inv >= 1.0 / eps)[:, None]
    return torch.where(clamped, grad_hat, grad_hat - v_hat * along) * inv[:, None]


def _tiles(a, m2, protos, inv_p, out, grad, g_num, h, eps, precision, coefs):
    """The tile kernel over (B, K), forward (coefs=False) or coefficient mode."""
    B, C = a.shape
    K = protos.shape[0]
    blocks = _tile_blocks(precision, a.element_size(), coefs)
    grid = (triton.cdiv(B, blocks["BLOCK_B"]), triton.cdiv(K, blocks["BLOCK_K"]))
    _masked_cosine_tile_kernel[grid](
        a,
        m2,
        protos,
        inv_p,
        out,
        grad,
        g_num,
        h,
        B,
        K,
        C,
        eps,
        COEFS=coefs,
        PRECISION=precision,
        **blocks,
        **COMPILE_OPTIONS,
    )


@on_input_device
def masked_cosine_forward(x: torch.Tensor, mask: torch.Tensor, protos: torch.Tensor, eps: float) -> torch.Tensor:
    B = x.shape[0]
    K = protos.shape[0]
    out = torch.empty((B, K), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    a, m2 = _prepared(x, _inv_norm(x, eps), mask)
    precision = _operand_precision(x.dtype)
    _tiles(a, m2, protos.contiguous(), _inv_norm(protos, eps), out, out, out, out, eps, precision, coefs=False)
    return out


@on_input_device
def masked_cosine_backward(grad, x, mask, protos, eps):
    B, C = x.shape
    K = protos.shape[0]
    if B == 0 or K == 0:
        return torch.zeros_like(x), torch.zeros_like(mask), torch.zeros_like(protos)
    grad, x, mask, protos = (t.contiguous() for t in (grad, x, mask, protos))
    acc = compute_dtype(x.dtype)
    precision = dot_precision(acc)
    inv_x, inv_p = _inv_norm(x, eps), _inv_norm(protos, eps)
    a, m2 = _prepared(x, inv_x, mask, acc)
    g_num = torch.empty((B, K), dtype=acc, device=x.device)
    h = torch.empty_like(g_num)
    _tiles(a, m2, protos, inv_p, grad, grad, g_num, h, eps, precision, coefs=True)
    blocks = _coef_blocks(precision)

    def grid(rows):
        return (triton.cdiv(rows, blocks["BLOCK_R"]), triton.cdiv(C, blocks["BLOCK_C"]))

    ph, ph_sq = _prepared(protos, inv_p, None, acc)
    grad_xh = torch.empty((B, C), dtype=acc, device=x.device)
    grad_m = torch.empty_like(grad_xh)
    _coef_grad_kernel[grid(B)](
        g_num,
        h,
        ph,
        ph_sq,
        x,
        mask,
        inv_x,
        protos,
        inv_p,
        grad_xh,
        grad_m,
        B,
        K,
        C,
        FOR_QUERY=True,
        PRECISION=precision,
        **blocks,
        **COMPILE_OPTIONS,
    )
    grad_ph = torch.empty((K, C), dtype=acc, device=x.device)
    _coef_grad_kernel[grid(K)](
        g_num,
        h,
        a,
        m2,
        x,
        mask,
        inv_x,
        protos,
        inv_p,
        grad_ph,
        grad_ph,
        B,
        K,
        C,
        FOR_QUERY=False,
        PRECISION=precision,
        **blocks,
        **COMPILE_OPTIONS,
    )
    grad_x = _normalize_backward(grad_xh, x, inv_x, eps)
    grad_p = _normalize_backward(grad_ph, protos, inv_p, eps)
    return grad_x.to(x.dtype), grad_m.to(mask.dtype), grad_p.to(protos.dtype)
