"""DPM's masked prototype cosine as a torch custom op, with every backend behind one call.

    C[b,k] = < n(x_b), n(m_b ⊙ n(p_k)) >,  n(v) = v / max(||v||, eps)       (dpm.md §3)

Schemas: ``dpm_ops::masked_cosine``, ``dpm_ops::masked_cosine_train`` (also returns den^2, which its
backward reuses: the path taken when a gradient is needed) and ``dpm_ops::masked_cosine_backward``
(declared in python_bindings/masked_cosine.cpp, C++ kernels for CPU and CUDA), and
``dpm_ops::masked_cosine_triton`` / ``..._triton_backward`` (Triton kernels). All share the fake (meta)
functions and the autograd formula below; the reference (masked_cosine_reference.py) is differentiated by torch itself.
"""

import torch

from .. import _backend
from ._checks import check_finite_rows, check_number, check_tensors
from ._registration import register_forward_backward
from .masked_cosine_reference import masked_cosine_reference

ARCCOS_CLIP = 1e-5  # DPM's test metric clips the cosine to [-1+1e-5, 1-1e-5] before arccos


def check_masked_cosine_args(x, mask, protos, eps) -> None:
    """ValueError naming the argument for anything the kernels cannot take."""
    check_tensors("masked_cosine", x=x, mask=mask, protos=protos)
    if x.dim() != 2:
        raise ValueError(f"masked_cosine: x must be 2-D (B, C), got shape {tuple(x.shape)}")
    if protos.dim() != 2:
        raise ValueError(f"masked_cosine: protos must be 2-D (K, C), got shape {tuple(protos.shape)}")
    if mask.shape != x.shape:
        raise ValueError(f"masked_cosine: mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    if protos.shape[1] != x.shape[1]:
        raise ValueError(f"masked_cosine: protos must have C = {x.shape[1]} columns like x, got {protos.shape[1]}")
    if not x.is_floating_point():
        raise ValueError(f"masked_cosine: x must be floating point, got {x.dtype}")
    if mask.dtype != x.dtype or protos.dtype != x.dtype:
        raise ValueError(
            f"masked_cosine: x, mask and protos must share one dtype, got {x.dtype}, {mask.dtype}, {protos.dtype}"
        )
    if mask.device != x.device or protos.device != x.device:
        raise ValueError(
            f"masked_cosine: x, mask and protos must be on one device, got {x.device}, {mask.device}, {protos.device}"
        )
    check_number("masked_cosine", "eps", eps, positive=True)


def _fake_forward(x, mask, protos, eps=1e-12):
    return x.new_empty((x.shape[0], protos.shape[0]))


def _fake_train_forward(x, mask, protos, eps=1e-12):
    accumulation = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _fake_forward(x, mask, protos), x.new_empty((x.shape[0], protos.shape[0]), dtype=accumulation)


def _fake_backward(grad, x, mask, protos, out, *den_sq_and_eps):
    return torch.empty_like(x), torch.empty_like(mask), torch.empty_like(protos)


def _setup_context(ctx, inputs, output):
    x, mask, protos, eps = inputs
    ctx.save_for_backward(x, mask, protos, output)
    ctx.eps = eps


def _setup_train_context(ctx, inputs, output):
    x, mask, protos, eps = inputs
    out, den_sq = output
    ctx.mark_non_differentiable(den_sq)
    ctx.save_for_backward(x, mask, protos, out, den_sq)
    ctx.eps = eps


def _backward_recomputing_den(backward_op, pass_den: bool):
    """Autograd backward of a forward that did not keep den^2 (the backward recomputes it)."""

    def backward(ctx, grad):
        x, mask, protos, out = ctx.saved_tensors
        extra = (None, ctx.eps) if pass_den else (ctx.eps,)
        grad_x, grad_mask, grad_protos = backward_op(grad, x, mask, protos, out, *extra)
        return grad_x, grad_mask, grad_protos, None

    return backward


def _backward_with_den(ctx, grad, _grad_den_sq):
    x, mask, protos, out, den_sq = ctx.saved_tensors
    grad_x, grad_mask, grad_protos = torch.ops.dpm_ops.masked_cosine_backward(
        grad, x, mask, protos, out, den_sq, ctx.eps
    )
    return grad_x, grad_mask, grad_protos, None


def _register(forward_op, backward_op, pass_den: bool) -> None:
    register_forward_backward(
        forward_op,
        backward_op,
        fake_forward=_fake_forward,
        fake_backward=_fake_backward,
        make_backward=lambda op: _backward_recomputing_den(op, pass_den),
        setup_context=_setup_context,
    )


if _backend.extension()[0] is not None:
    _register(torch.ops.dpm_ops.masked_cosine.default, torch.ops.dpm_ops.masked_cosine_backward.default, True)
    torch.library.register_fake(torch.ops.dpm_ops.masked_cosine_train.default)(_fake_train_forward)
    torch.library.register_autograd(
        torch.ops.dpm_ops.masked_cosine_train.default, _backward_with_den, setup_context=_setup_train_context
    )


@torch.library.custom_op("dpm_ops::masked_cosine_triton", mutates_args=())
def masked_cosine_triton(x: torch.Tensor, mask: torch.Tensor, protos: torch.Tensor, eps: float) -> torch.Tensor:
    from ..triton import masked_cosine as kernels

    return kernels.masked_cosine_forward(x, mask, protos, eps)


@torch.library.custom_op("dpm_ops::masked_cosine_triton_backward", mutates_args=())
def masked_cosine_triton_backward(
    grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, protos: torch.Tensor, out: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton import masked_cosine as kernels

    return kernels.masked_cosine_backward(grad, x, mask, protos, out, eps)


_register(masked_cosine_triton, masked_cosine_triton_backward, False)


def masked_cosine(
    x: torch.Tensor, mask: torch.Tensor, protos: torch.Tensor, eps: float = 1e-12, backend: str | None = None
) -> torch.Tensor:
    """Masked prototype cosine C (B, K) of features x (B, C), masks (B, C) and prototypes (K, C).

    Differentiable in x, mask and protos. ``backend`` forces "reference" | "cpp" | "cuda" | "triton"
    (default: by device, see dpm_ops.backends()).
    """
    check_masked_cosine_args(x, mask, protos, eps)
    name = _backend.resolve(backend, x.device)
    if name != "cpp":  # the C++ CPU kernel applies the same check inside its first pass, for free
        check_finite_rows("masked_cosine", x=x, mask=mask, protos=protos)
    if name == "reference":
        return masked_cosine_reference(x, mask, protos, eps)
    if name == "triton":
        return torch.ops.dpm_ops.masked_cosine_triton(x, mask, protos, eps)
    if torch.is_grad_enabled() and (x.requires_grad or mask.requires_grad or protos.requires_grad):
        return torch.ops.dpm_ops.masked_cosine_train(x, mask, protos, eps)[0]  # keeps den^2 for the backward
    return torch.ops.dpm_ops.masked_cosine(x, mask, protos, eps)


def masked_arccos_distance(
    q: torch.Tensor, q_mask: torch.Tensor, g: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """DPM's test distance (dpm.md §3.1): arccos(clip(<q̂, n(m_q ⊙ ĝ)>, -1+1e-5, 1-1e-5)), (Q, G).

    Only the query's mask is used, applied to the gallery features (asymmetric by design).
    """
    # Values checked under this function's own names (masked_cosine's shape checks name x / mask / protos).
    check_tensors("masked_arccos_distance", q=q, q_mask=q_mask, g=g)
    check_finite_rows("masked_arccos_distance", q=q, q_mask=q_mask, g=g)
    cos = masked_cosine(q, q_mask, g, backend=backend)
    return torch.arccos(torch.clamp(cos, -1 + ARCCOS_CLIP, 1 - ARCCOS_CLIP))
