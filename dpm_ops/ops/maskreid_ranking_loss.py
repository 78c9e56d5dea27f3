"""MaskReID's ranking loss (the paper's Eq. 5, and its Eq. 4 option) as a fused torch custom op.

Declared ops ``maskreid_ranking_loss(embeddings, labels, alpha, lam, neg_mode, pos_mode) ->
(loss, coef)`` and ``maskreid_ranking_loss_backward(grad, embeddings, coef)``, with C++ kernels for
CPU and CUDA and Triton twins (the twin's backward is torch's GEMM). One forward computes
S = X Xᵀ, mines each anchor row, sums the loss and writes the closed-form ``coef = G + Gᵀ`` with
G = dL/dS, so the backward is a single GEMM: ``dL/dX = grad · coef X``. The maths is the
reference's (maskreid_ranking_loss_reference.py, differentiated by torch itself)."""

import math

import torch

from .. import _backend
from .._precision import compute_dtype
from ._checks import (
    MAX_COEFFICIENT,
    check_batch,
    check_finite_rows,
    check_loss_grad,
    check_number,
    check_real,
    check_tensors,
)
from ._declare import declare
from .maskreid_ranking_loss_reference import check_modes, maskreid_ranking_loss_reference


def check_ranking_args(embeddings, labels, alpha, lam, neg_mode, pos_mode) -> None:
    """ValueError naming the argument for anything the kernels cannot take (the Triton twins' check; the C++
    ops make the same ones)."""
    check_tensors("maskreid_ranking_loss", embeddings=embeddings, labels=labels)
    if embeddings.dim() != 2:
        raise ValueError(f"maskreid_ranking_loss: embeddings must be 2-D (B, D), got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"maskreid_ranking_loss: embeddings must be floating point, got {embeddings.dtype}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"maskreid_ranking_loss: labels must be 1-D with B = {embeddings.shape[0]} entries, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"maskreid_ranking_loss: labels must be integer, got {labels.dtype}")
    if labels.device != embeddings.device:
        raise ValueError(
            f"maskreid_ranking_loss: embeddings and labels must be on one device, got "
            f"{embeddings.device}, {labels.device}"
        )
    check_ranking_options(alpha, lam, neg_mode, pos_mode)
    check_batch("maskreid_ranking_loss", "embeddings", embeddings)


def check_ranking_options(alpha, lam, neg_mode, pos_mode) -> None:
    """The loss's numbers and modes (MaskReIDRankingLoss checks them when it is built)."""
    check_number("maskreid_ranking_loss", "alpha", alpha)  # any sign: a negative margin is a choice
    # lam weighs the positive pull: a negative one would push positives apart
    check_real("maskreid_ranking_loss", "lam", lam, 0, MAX_COEFFICIENT)
    check_modes(neg_mode, pos_mode)


def exp_safe_norm(dtype: torch.dtype, alpha: float, batch: int) -> float:
    """Eq. 5 sums up to B^2 terms exp(s_kj - s_ki + alpha) with |s| <= max |x|^2: the largest row
    norm for which that sum stays finite in `dtype` (6.3 in float32 at B = 64, alpha = 0.15; MaskReID's
    embeddings are L2-normalised). Eq. 4 takes log-sum-exps and needs no such bound."""
    alpha_limit = math.log(torch.finfo(dtype).max) - 2 * math.log(batch)  # (budget + alpha cancelled at alpha 1e39)
    budget = alpha_limit - max(alpha, 0.0)
    if budget <= 0:
        raise ValueError(
            f"maskreid_ranking_loss: alpha must stay below {alpha_limit:.3g} at B = {batch} "
            f"(exp(alpha) summed over B^2 pairs overflows {str(dtype).removeprefix('torch.')}), "
            f"got {alpha!r}"
        )
    return math.sqrt(budget / 2)


def _fake_forward(embeddings, labels, alpha, lam, neg_mode, pos_mode):
    acc = compute_dtype(embeddings.dtype)
    n = embeddings.shape[0]
    return embeddings.new_empty((), dtype=acc), embeddings.new_empty((n, n), dtype=acc)


def _setup_context(ctx, inputs, output):
    embeddings = inputs[0]
    _, coef = output
    ctx.mark_non_differentiable(coef)
    ctx.save_for_backward(embeddings, coef)


def _fake_backward(grad, embeddings, coef):
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format)


def _autograd(backward_op, ctx, grad, _grad_coef):
    embeddings, coef = ctx.saved_tensors
    return backward_op(grad, embeddings, coef), None, None, None, None, None


def _check_backward_args(grad, embeddings, coef) -> None:
    """coef (B, B), floating point (the backward computes in its dtype), and the loss's gradient."""
    op = "maskreid_ranking_loss_backward"
    check_tensors(op, embeddings=embeddings, coef=coef)
    batch = embeddings.shape[0] if embeddings.dim() == 2 else None
    if batch is None or not embeddings.is_floating_point():
        raise ValueError(
            f"{op}: embeddings must be 2-D floating point, got {embeddings.dtype} {list(embeddings.shape)}"
        )
    if tuple(coef.shape) != (batch, batch) or not coef.is_floating_point() or coef.device != embeddings.device:
        raise ValueError(
            f"{op}: coef must be (B, B) for B = {batch} embeddings, floating point on their device, got "
            f"{coef.dtype} {list(coef.shape)} on {coef.device}"
        )
    check_loss_grad(op, grad)


def _triton_backward(grad, embeddings, coef):
    # The closed form is one GEMM: torch's (as the C++ backward does with ATen), kept in the compute
    # dtype even under autocast.
    with torch.autocast(embeddings.device.type, enabled=False):
        return (torch.mm(coef, embeddings.to(coef.dtype)) * grad).to(embeddings.dtype)


MASKREID_RANKING_LOSS_BACKWARD = declare(
    "maskreid_ranking_loss_backward",
    # dL/dX = grad · coef X, in the embeddings' dtype (grad: the 0-d upstream gradient of the loss)
    "(Tensor grad, Tensor embeddings, Tensor coef) -> Tensor",
    _fake_backward,
    triton=_triton_backward,
    check=_check_backward_args,
)
MASKREID_RANKING_LOSS = declare(
    "maskreid_ranking_loss",
    # (loss, coef): the scalar loss and coef = G + Gᵀ with G = dL/dS (S = X Xᵀ), in the compute dtype
    "(Tensor embeddings, Tensor labels, float alpha, float lam, str neg_mode, str pos_mode) -> (Tensor, Tensor)",
    _fake_forward,
    triton="triton.maskreid_ranking_loss:ranking_loss_forward",
    check=check_ranking_args,
    reference=maskreid_ranking_loss_reference,
    backward=MASKREID_RANKING_LOSS_BACKWARD,
    setup_context=_setup_context,
    autograd=_autograd,
)


def maskreid_ranking_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.15,
    lam: float = 2.0,
    neg_mode: str = "literal",
    pos_mode: str = "hardest",
    backend: str | None = None,
) -> torch.Tensor:
    """Eq. 5 (or Eq. 4) of MaskReID on (B, D) L2-normalised embeddings and (B,) integer identity labels:
    the mean over anchors (samples with a positive) of the per-anchor loss, a 0-d tensor in at least fp32.

    ``pos_mode`` "hardest" (Eq. 5) | "all_eq5" (Eq. 5 over every positive) | "eq4" (Eq. 4: no ``alpha``,
    ``lam`` or ``neg_mode``); ``neg_mode`` "literal" | "violating_only" (see the reference).
    ``backend`` forces "reference" | "cpp" | "cuda" | "triton" (default: by device).
    """
    check_ranking_args(embeddings, labels, alpha, lam, neg_mode, pos_mode)
    max_norm = None if pos_mode == "eq4" else exp_safe_norm(compute_dtype(embeddings.dtype), alpha, len(embeddings))
    check_finite_rows("maskreid_ranking_loss", max_norm=max_norm, embeddings=embeddings)
    name = _backend.resolve(backend, embeddings.device)
    # as Python floats on every backend (a fractions.Fraction, a numbers.Real, was a TypeError in the reference)
    result = MASKREID_RANKING_LOSS.run(name, embeddings, labels, float(alpha), float(lam), neg_mode, pos_mode)
    return result if name == "reference" else result[0]
