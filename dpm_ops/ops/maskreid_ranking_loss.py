"""MaskReID's ranking loss (maskreid.md §4.1–4.2, Eq. 5 and the Eq. 4 option) as a fused torch custom op.

Schemas ``dpm_ops::maskreid_ranking_loss(embeddings, labels, alpha, lam, neg_mode, pos_mode) ->
(loss, coef)`` and ``dpm_ops::maskreid_ranking_loss_backward(grad, embeddings, coef)``
(python_bindings/maskreid_ranking_loss.cpp; C++ kernels for CPU and CUDA), and
``dpm_ops::maskreid_ranking_loss_triton`` / ``..._triton_backward`` (Triton). One forward computes
S = X Xᵀ, mines each anchor row, sums the loss and writes the closed-form ``coef = G + Gᵀ`` with
G = dL/dS, so the backward is a single GEMM: ``dL/dX = grad · coef X``. The maths is the
reference's (maskreid_ranking_loss_reference.py, differentiated by torch itself)."""

import math

import torch

from .. import _backend
from ._checks import check_batch, check_finite_rows, check_number, check_tensors, compute_dtype
from ._registration import register_forward_backward
from .maskreid_ranking_loss_reference import check_modes, maskreid_ranking_loss_reference


def check_ranking_args(embeddings, labels, alpha, lam, neg_mode, pos_mode) -> None:
    """ValueError naming the argument for anything the kernels cannot take."""
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
    for name, value in (("alpha", alpha), ("lam", lam)):
        check_number("maskreid_ranking_loss", name, value)
    check_modes(neg_mode, pos_mode)
    check_batch("maskreid_ranking_loss", "embeddings", embeddings)
    max_norm = None if pos_mode == "eq4" else exp_safe_norm(compute_dtype(embeddings.dtype), alpha, len(embeddings))
    check_finite_rows("maskreid_ranking_loss", max_norm=max_norm, embeddings=embeddings)


def exp_safe_norm(dtype: torch.dtype, alpha: float, batch: int) -> float:
    """Eq. 5 sums up to B^2 terms exp(s_kj - s_ki + alpha) with |s| <= max |x|^2: the largest row
    norm for which that sum stays finite in `dtype` (6.3 in float32 at B = 64, alpha = 0.15; MaskReID's
    embeddings are L2-normalised). Eq. 4 takes log-sum-exps and needs no such bound."""
    budget = math.log(torch.finfo(dtype).max) - 2 * math.log(batch) - max(alpha, 0.0)
    if budget <= 0:
        raise ValueError(
            f"maskreid_ranking_loss: alpha must stay below {budget + alpha:.3g} at B = {batch} "
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
    return torch.empty_like(embeddings)


def _make_backward(backward_op):
    def backward(ctx, grad, _grad_coef):
        embeddings, coef = ctx.saved_tensors
        return backward_op(grad, embeddings, coef), None, None, None, None, None

    return backward


def _register(forward_op, backward_op) -> None:
    register_forward_backward(
        forward_op,
        backward_op,
        fake_forward=_fake_forward,
        fake_backward=_fake_backward,
        make_backward=_make_backward,
        setup_context=_setup_context,
    )


if _backend.extension()[0] is not None:
    _register(torch.ops.dpm_ops.maskreid_ranking_loss.default, torch.ops.dpm_ops.maskreid_ranking_loss_backward.default)


@torch.library.custom_op("dpm_ops::maskreid_ranking_loss_triton", mutates_args=())
def maskreid_ranking_loss_triton(
    embeddings: torch.Tensor, labels: torch.Tensor, alpha: float, lam: float, neg_mode: str, pos_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    check_modes(neg_mode, pos_mode)  # for direct torch.ops callers, as the C++ op's parse_options
    from ..triton import maskreid_ranking_loss as kernels

    return kernels.ranking_loss_forward(embeddings, labels, alpha, lam, neg_mode, pos_mode)


@torch.library.custom_op("dpm_ops::maskreid_ranking_loss_triton_backward", mutates_args=())
def maskreid_ranking_loss_triton_backward(
    grad: torch.Tensor, embeddings: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    # The closed form is one GEMM: torch's (as the C++ backward does with ATen), kept in the compute
    # dtype even under autocast.
    with torch.autocast(embeddings.device.type, enabled=False):
        return (torch.mm(coef, embeddings.to(coef.dtype)) * grad).to(embeddings.dtype)


_register(maskreid_ranking_loss_triton, maskreid_ranking_loss_triton_backward)


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
    name = _backend.resolve(backend, embeddings.device)
    if name == "reference":
        return maskreid_ranking_loss_reference(embeddings, labels, alpha, lam, neg_mode, pos_mode)
    op = torch.ops.dpm_ops.maskreid_ranking_loss_triton if name == "triton" else torch.ops.dpm_ops.maskreid_ranking_loss
    return op(embeddings, labels, float(alpha), float(lam), neg_mode, pos_mode)[0]
