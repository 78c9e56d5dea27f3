"""DPM's Head Enrichment Module loss (the heads' normalised CLS attention rows pushed towards
orthogonality, a term of DPM's training loss) as a fused torch custom op.

Declared ops ``hem_loss(cls_logits, eps, reduction)`` and ``hem_loss_backward``, with C++ kernels
for CPU and CUDA and Triton twins. Each sample's raw Gram A Aᵀ comes from one pass over its logits
(the norms are its diagonal); the backward recomputes it (heads² · N per sample, cheaper than
keeping anything) and writes the closed-form gradient. The maths is the reference's
(hem_loss_reference.py, differentiated by torch itself).
"""

import torch

from .. import _backend
from .._precision import compute_dtype
from ._checks import check_batch, check_eps, check_finite_rows, check_loss_grad
from ._declare import declare
from .hem_loss_reference import REDUCTIONS, hem_loss_reference


def check_hem_args(cls_logits, eps, reduction) -> None:
    """ValueError naming the argument for anything the kernels cannot take (the Triton twins' check; the C++
    ops make the same ones)."""
    if not isinstance(cls_logits, torch.Tensor):
        raise ValueError(f"hem_loss: cls_logits must be a torch.Tensor, got {type(cls_logits).__name__}")
    if cls_logits.dim() != 3:
        raise ValueError(f"hem_loss: cls_logits must be 3-D (B, heads, N), got shape {tuple(cls_logits.shape)}")
    if cls_logits.shape[1] == 0 or cls_logits.shape[2] == 0:  # no token: no attention to diversify (it gave 1)
        raise ValueError(
            f"hem_loss: cls_logits must have at least one head and one patch token, got shape {tuple(cls_logits.shape)}"
        )
    if not cls_logits.is_floating_point():
        raise ValueError(f"hem_loss: cls_logits must be floating point, got {cls_logits.dtype}")
    check_eps("hem_loss", eps, cls_logits.dtype)
    if reduction not in REDUCTIONS:
        raise ValueError(f"hem_loss: reduction must be 'sum' (official) or 'mean', got {reduction!r}")
    if reduction == "mean":  # the sum over no samples is 0; their mean has no value
        check_batch("hem_loss", "cls_logits", cls_logits)


def _check_backward_args(grad, cls_logits, eps, reduction) -> None:
    check_hem_args(cls_logits, eps, reduction)
    check_loss_grad("hem_loss_backward", grad)


def _fake_forward(cls_logits, eps, reduction):
    return cls_logits.new_empty((), dtype=compute_dtype(cls_logits.dtype))


def _fake_backward(grad, cls_logits, eps, reduction):
    return torch.empty_like(cls_logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    cls_logits, eps, reduction = inputs
    ctx.save_for_backward(cls_logits)
    ctx.eps, ctx.reduction = eps, reduction


def _autograd(backward_op, ctx, grad):
    (cls_logits,) = ctx.saved_tensors
    return backward_op(grad, cls_logits, ctx.eps, ctx.reduction), None, None


HEM_LOSS_BACKWARD = declare(
    "hem_loss_backward",
    # dL/d cls_logits (in cls_logits' dtype) for the upstream gradient `grad` (0-d, the loss's dtype)
    "(Tensor grad, Tensor cls_logits, float eps, str reduction) -> Tensor",
    _fake_backward,
    triton="triton.hem_loss:hem_loss_backward",
    check=_check_backward_args,
)
HEM_LOSS = declare(
    "hem_loss",
    "(Tensor cls_logits, float eps, str reduction) -> Tensor",  # the loss in the compute dtype
    _fake_forward,
    triton="triton.hem_loss:hem_loss_forward",
    check=check_hem_args,
    reference=hem_loss_reference,
    backward=HEM_LOSS_BACKWARD,
    setup_context=_setup_context,
    autograd=_autograd,
)


def hem_loss(
    cls_logits: torch.Tensor, eps: float = 1e-6, reduction: str = "sum", backend: str | None = None
) -> torch.Tensor:
    """HEM loss of the last block's pre-softmax, scaled CLS->patch logits (B, heads, N), as the model's
    ``hem_logits``: Σ_b ‖Â_b Â_bᵀ − I‖²_F / heads² ("sum", official) or its batch mean ("mean");
    a 0-d tensor in at least fp32. ``backend`` forces "reference" | "cpp" | "cuda" | "triton".
    """
    check_hem_args(cls_logits, eps, reduction)
    check_finite_rows("hem_loss", cls_logits=cls_logits)  # each (sample, head) row is normalised
    name = _backend.resolve(backend, cls_logits.device)
    return HEM_LOSS.run(name, cls_logits, float(eps), reduction)
