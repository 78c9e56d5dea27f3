"""Triton kernels of DPM's HEM loss (maths: dpm_ops/ops/hem_loss_reference.py, csrc/hem_loss/hem_loss_math.h).

One program per sample streams its (heads × N) logits in chunks and accumulates the raw Gram
R = A Aᵀ; the norms are R's diagonal, G = r_h r_i R_hi. Forward: the sample's ‖G − I‖²_F / heads².
Backward (same program, GRAD): a second pass over the chunks writes
dL/dA = r ⊙ (c (G − I) Â − Â ⊙ d), c = 4w/heads², d_h = c ((G − I) G)_hh.
The Gram and the mixing products are IEEE dots in fp32 (fp64 for fp64 logits) whatever torch's
matmul precision (triton/_precision.py is for the GEMM-sized kernels): a (heads x heads) Gram per
sample is little work next to streaming the logits.
"""

import functools

import torch
import triton
import triton.language as tl

from .._precision import compute_dtype
from ._device import on_input_device
from ._precision import COMPILE_OPTIONS, div_rn, scalar_as, sqrt_rn

BLOCK_N = 64


@triton.jit
def _hem_sample_kernel(
    a_ptr,
    loss_ptr,
    grad_ptr,
    grad_out_ptr,
    H,
    N,
    eps: tl.float64,  # see scalar_as
    weight: tl.float64,
    GRAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    acc_t = loss_ptr.dtype.element_ty
    eps = scalar_as(eps, acc_t)
    weight = scalar_as(weight, acc_t)
    rows = tl.arange(0, BLOCK_H)
    in_h = rows < H
    base = a_ptr + b.to(tl.int64) * H * N
    gram = tl.zeros((BLOCK_H, BLOCK_H), dtype=acc_t)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        a = tl.load(base + rows[:, None] * N + cols[None, :], mask=in_h[:, None] & (cols < N)[None, :], other=0.0).to(
            acc_t
        )
        gram += tl.dot(a, tl.trans(a), input_precision="ieee")
    eye = rows[:, None] == rows[None, :]
    valid = in_h[:, None] & in_h[None, :]
    inv_row = div_rn(1.0, sqrt_rn(tl.sum(tl.where(eye, gram, 0.0), 1) + eps))
    inv_col = div_rn(1.0, sqrt_rn(tl.sum(tl.where(eye, gram, 0.0), 0) + eps))
    gram = gram * inv_row[:, None] * inv_col[None, :]
    residual = tl.where(valid, gram - tl.where(eye, 1.0, 0.0), 0.0)
    if not GRAD:
        tl.store(loss_ptr + b, div_rn(tl.sum(tl.sum(residual * residual, 1), 0), H * H))
    else:
        c = div_rn(4.0 * tl.load(grad_ptr).to(acc_t) * weight, H * H)
        proj = c * tl.sum(residual * gram, 1)  # d_h = c ((G − I) G)_hh, G symmetric
        mix = c * residual * inv_col[None, :]  # coefficient of A_ij in dÂ_hj
        out = grad_out_ptr + b.to(tl.int64) * H * N
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            m = in_h[:, None] & (cols < N)[None, :]
            a = tl.load(base + rows[:, None] * N + cols[None, :], mask=m, other=0.0).to(acc_t)
            grad_hat = tl.dot(mix, a, input_precision="ieee")
            g = inv_row[:, None] * (grad_hat - inv_row[:, None] * a * proj[:, None])
            tl.store(out + rows[:, None] * N + cols[None, :], g.to(grad_out_ptr.dtype.element_ty), mask=m)


def _weight(batch: int, reduction: str) -> float:
    if reduction == "sum":
        return 1.0
    return 1.0 / batch if batch > 0 else float("nan")  # the mean of no sample is NaN, like torch's


def _block_h(heads: int) -> int:
    return max(16, triton.next_power_of_2(heads))  # tl.dot needs >= 16


@on_input_device
def hem_loss_forward(cls_logits: torch.Tensor, eps: float, reduction: str) -> torch.Tensor:
    B, H, N = cls_logits.shape
    acc = compute_dtype(cls_logits.dtype)
    per_sample = torch.zeros(B, dtype=acc, device=cls_logits.device)
    if B > 0 and H > 0:
        a = cls_logits.contiguous()
        _hem_sample_kernel[(B,)](
            a,
            per_sample,
            per_sample,
            a,
            H,
            N,
            eps,
            1.0,
            GRAD=False,
            BLOCK_H=_block_h(H),
            BLOCK_N=BLOCK_N,
            **COMPILE_OPTIONS,
        )
    return per_sample.sum() * _weight(B, reduction)


@functools.partial(on_input_device, device_of=1)  # the logits' device: the gradient may lie on any
def hem_loss_backward(grad: torch.Tensor, cls_logits: torch.Tensor, eps: float, reduction: str) -> torch.Tensor:
    B, H, N = cls_logits.shape
    out = torch.empty_like(cls_logits, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    a = cls_logits.contiguous()
    scratch = torch.empty(1, dtype=compute_dtype(cls_logits.dtype), device=a.device)
    _hem_sample_kernel[(B,)](
        a,
        scratch,
        grad.reshape(1).to(scratch),
        out,
        H,
        N,
        eps,
        _weight(B, reduction),
        GRAD=True,
        BLOCK_H=_block_h(H),
        BLOCK_N=BLOCK_N,
        **COMPILE_OPTIONS,
    )
    return out
