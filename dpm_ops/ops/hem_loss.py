"""DPM's Head Enrichment Module loss (dpm.md §4, §6) as a fused torch custom op.

Schemas ``dpm_ops::hem_loss(cls_logits, eps, reduction)`` and ``dpm_ops::hem_loss_backward``
(python_bindings/hem_loss.cpp; C++ kernels for CPU and CUDA), and ``dpm_ops::hem_loss_triton`` /
``..._triton_backward`` (Triton). Each sample's raw Gram A Aᵀ comes from one pass over its logits
(the norms are its diagonal); the backward recomputes it (heads² · N per sample, cheaper than
keeping anything) and writes the closed-form gradient. The maths is the reference's
(hem_loss_reference.py, differentiated by torch itself).
"""

import torch

from .. import _backend
from ._checks import check_batch, check_finite_rows, check_number
from ._registration import register_forward_backward
from .hem_loss_reference import REDUCTIONS, hem_loss_reference


def check_hem_args(cls_logits, eps, reduction) -> None:
    """ValueError naming the argument for anything the kernels cannot take."""
    if not isinstance(cls_logits, torch.Tensor):
        raise ValueError(f"hem_loss: cls_logits must be a torch.Tensor, got {type(cls_logits).__name__}")
    if cls_logits.dim() != 3:
        raise ValueError(f"hem_loss: cls_logits must be 3-D (B, heads, N), got shape {tuple(cls_logits.shape)}")
    if cls_logits.shape[1] == 0:
        raise ValueError(f"hem_loss: cls_logits must have at least one head, got shape {tuple(cls_logits.shape)}")
    if not cls_logits.is_floating_point():
        raise ValueError(f"hem_loss: cls_logits must be floating point, got {cls_logits.dtype}")
    check_number("hem_loss", "eps", eps, positive=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"hem_loss: reduction must be 'sum' (official) or 'mean', got {reduction!r}")
    if reduction == "mean":  # the sum over no samples is 0; their mean has no value
        check_batch("hem_loss", "cls_logits", cls_logits)
    check_finite_rows("hem_loss", cls_logits=cls_logits)  # each (sample, head) row is normalised


def _fake_forward(cls_logits, eps, reduction):
    return cls_logits.new_empty((), dtype=torch.float64 if cls_logits.dtype == torch.float64 else torch.float32)


def _fake_backward(grad, cls_logits, eps, reduction):
    return torch.empty_like(cls_logits)


def _setup_context(ctx, inputs, output):
    cls_logits, eps, reduction = inputs
    ctx.save_for_backward(cls_logits)
    ctx.eps, ctx.reduction = eps, reduction


def _make_backward(backward_op):
    def backward(ctx, grad):
        (cls_logits,) = ctx.saved_tensors
        return backward_op(grad, cls_logits, ctx.eps, ctx.reduction), None, None

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
    _register(torch.ops.dpm_ops.hem_loss.default, torch.ops.dpm_ops.hem_loss_backward.default)


@torch.library.custom_op("dpm_ops::hem_loss_triton", mutates_args=())
def hem_loss_triton(cls_logits: torch.Tensor, eps: float, reduction: str) -> torch.Tensor:
    from ..triton import hem_loss as kernels

    return kernels.hem_loss_forward(cls_logits, eps, reduction)


@torch.library.custom_op("dpm_ops::hem_loss_triton_backward", mutates_args=())
def hem_loss_triton_backward(grad: torch.Tensor, cls_logits: torch.Tensor, eps: float, reduction: str) -> torch.Tensor:
    from ..triton import hem_loss as kernels

    return kernels.hem_loss_backward(grad, cls_logits, eps, reduction)


_register(hem_loss_triton, hem_loss_triton_backward)


def hem_loss(
    cls_logits: torch.Tensor, eps: float = 1e-6, reduction: str = "sum", backend: str | None = None
) -> torch.Tensor:
    """HEM loss of the last block's pre-softmax, scaled CLS->patch logits (B, heads, N), as the model's
    ``hem_logits``: Σ_b ‖Â_b Â_bᵀ − I‖²_F / heads² ("sum", official) or its batch mean ("mean");
    a 0-d tensor in at least fp32. ``backend`` forces "reference" | "cpp" | "cuda" | "triton".
    """
    check_hem_args(cls_logits, eps, reduction)
    name = _backend.resolve(backend, cls_logits.device)
    if name == "reference":
        return hem_loss_reference(cls_logits, eps, reduction)
    if name == "triton":
        return torch.ops.dpm_ops.hem_loss_triton(cls_logits, float(eps), reduction)
    return torch.ops.dpm_ops.hem_loss(cls_logits, float(eps), reduction)
