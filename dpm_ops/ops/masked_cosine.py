"""DPM's masked prototype cosine as a torch custom op, with every backend behind one call.

    C[b,k] = < n(x_b), n(m_b ⊙ n(p_k)) >,  n(v) = v / max(||v||, eps)

(each feature against each prototype, the prototype masked by the feature's own mask). Declared
ops: ``masked_cosine``, ``masked_cosine_train`` (C and den^2 in the compute dtype, which its backward
reuses: the path taken when a gradient is needed; C++ only) and ``masked_cosine_backward``, with C++
kernels for CPU and CUDA and Triton twins; the reference (masked_cosine_reference.py) is differentiated by
torch itself.
"""

import torch

from .. import _backend
from .._precision import compute_dtype
from ._checks import check_eps, check_finite_rows, check_from_forward, check_tensors
from ._declare import declare, lazy
from .masked_cosine_reference import masked_cosine_reference

ARCCOS_CLIP = 1e-5  # DPM's test metric clips the cosine to [-1+1e-5, 1-1e-5] before arccos


def check_masked_cosine_args(x, mask, protos, eps, op: str = "masked_cosine", names=("x", "mask", "protos")) -> None:
    """ValueError naming the argument for anything the kernels cannot take; `op` and `names` are the
    caller's (masked_arcface_cross_entropy's features, mask, weight)."""
    x_name, mask_name, protos_name = names
    check_tensors(op, **{x_name: x, mask_name: mask, protos_name: protos})
    together = f"{x_name}, {mask_name} and {protos_name}"
    if x.dim() != 2:
        raise ValueError(f"{op}: {x_name} must be 2-D (B, C), got shape {tuple(x.shape)}")
    if protos.dim() != 2:
        raise ValueError(f"{op}: {protos_name} must be 2-D (K, C), got shape {tuple(protos.shape)}")
    if mask.shape != x.shape:
        raise ValueError(f"{op}: {mask_name} must have the shape of {x_name} {tuple(x.shape)}, got {tuple(mask.shape)}")
    if protos.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: {protos_name} must have C = {x.shape[1]} columns like {x_name}, got {protos.shape[1]}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: {x_name} must be floating point, got {x.dtype}")
    if mask.dtype != x.dtype or protos.dtype != x.dtype:
        raise ValueError(f"{op}: {together} must share one dtype, got {x.dtype}, {mask.dtype}, {protos.dtype}")
    if mask.device != x.device or protos.device != x.device:
        raise ValueError(f"{op}: {together} must be on one device, got {x.device}, {mask.device}, {protos.device}")
    check_eps(op, eps, x.dtype, floors_a_norm=True)


def _check_backward_args(grad, x, mask, protos, out, den_sq, eps) -> None:
    """The backward's forward inputs, then grad and out (B, K) in x's dtype (masked_cosine's) or its compute
    dtype (masked_cosine_train's), den_sq in the compute dtype."""
    check_masked_cosine_args(x, mask, protos, eps)
    shape, op = (x.shape[0], protos.shape[0]), "masked_cosine_backward"
    either = (x.dtype, compute_dtype(x.dtype))
    check_from_forward(op, "grad", grad, shape, either, x.device)
    check_from_forward(op, "out", out, shape, either, x.device)
    if den_sq is not None:
        check_from_forward(op, "den_sq", den_sq, shape, compute_dtype(x.dtype), x.device)


def _fake_forward(x, mask, protos, eps=1e-12):
    return x.new_empty((x.shape[0], protos.shape[0]))


def _fake_train_forward(x, mask, protos, eps=1e-12):
    shape, dtype = (x.shape[0], protos.shape[0]), compute_dtype(x.dtype)
    return x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)


def _fake_backward(grad, x, mask, protos, out, den_sq, eps):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(mask, memory_format=torch.contiguous_format),
        torch.empty_like(protos, memory_format=torch.contiguous_format),
    )


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


def _autograd(backward_op, ctx, grad, *_grad_den_sq):
    """Without a kept den^2 (masked_cosine), the backward recomputes it."""
    x, mask, protos, out, *den_sq = ctx.saved_tensors
    grads = backward_op(grad, x, mask, protos, out, den_sq[0] if den_sq else None, ctx.eps)
    return *grads, None


def _triton_backward(grad, x, mask, protos, out, den_sq, eps):
    # The Triton backward recomputes C and den^2 in one tile pass (only masked_cosine, never the train op,
    # reaches it: its output may be rounded to a half dtype).
    return _TRITON_BACKWARD(grad, x, mask, protos, eps)


_TRITON_BACKWARD = lazy("triton.masked_cosine:masked_cosine_backward")

MASKED_COSINE_BACKWARD = declare(
    "masked_cosine_backward",
    "(Tensor grad, Tensor x, Tensor mask, Tensor protos, Tensor out, Tensor? den_sq, float eps)"
    " -> (Tensor, Tensor, Tensor)",
    _fake_backward,
    triton=_triton_backward,
    check=_check_backward_args,
)
MASKED_COSINE = declare(
    "masked_cosine",
    "(Tensor x, Tensor mask, Tensor protos, float eps=1e-12) -> Tensor",
    _fake_forward,
    triton="triton.masked_cosine:masked_cosine_forward",
    check=check_masked_cosine_args,
    reference=masked_cosine_reference,
    backward=MASKED_COSINE_BACKWARD,
    setup_context=_setup_context,
    autograd=_autograd,
)
# The training variant returns C and den^2 (B, K) in the compute dtype, which its backward reuses instead
# of recomputing them with GEMMs (a C rounded to float16 / bfloat16 put the gradients several roundings
# off): the path taken when a gradient is needed (C++ kernels only).
MASKED_COSINE_TRAIN = declare(
    "masked_cosine_train",
    "(Tensor x, Tensor mask, Tensor protos, float eps=1e-12) -> (Tensor, Tensor)",
    _fake_train_forward,
    backward=MASKED_COSINE_BACKWARD,
    setup_context=_setup_train_context,
    autograd=_autograd,
)


def masked_cosine(
    x: torch.Tensor, mask: torch.Tensor, protos: torch.Tensor, eps: float = 1e-12, backend: str | None = None
) -> torch.Tensor:
    """Masked prototype cosine C (B, K) of features x (B, C), masks (B, C) and prototypes (K, C).

    Differentiable in x, mask and protos. ``backend`` forces "reference" | "cpp" | "cuda" | "triton"
    (default: by device, see dpm_ops.backends()).
    """
    check_masked_cosine_args(x, mask, protos, eps)
    eps = float(eps)  # a Python float on every backend (a fractions.Fraction was a TypeError in the reference)
    name = _backend.resolve(backend, x.device)
    if name != "cpp":  # the C++ CPU kernel applies the same check inside its first pass, for free
        check_finite_rows("masked_cosine", x=x, mask=mask, protos=protos)
    keep_den = (
        name in ("cpp", "cuda")
        and torch.is_grad_enabled()
        and (x.requires_grad or mask.requires_grad or protos.requires_grad)
    )
    if keep_den:
        return MASKED_COSINE_TRAIN.run(name, x, mask, protos, eps)[0].to(x.dtype)
    return MASKED_COSINE.run(name, x, mask, protos, eps)


def masked_arccos_distance(
    q: torch.Tensor, q_mask: torch.Tensor, g: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """DPM's test distance: arccos(clip(<q̂, n(m_q ⊙ ĝ)>, -1+1e-5, 1-1e-5)), (Q, G).

    Only the query's mask is used, applied to the gallery features (asymmetric by design).
    """
    # Checked under this function's own names (masked_cosine's name x / mask / protos), dtypes before
    # values: the values' check takes float norms, torch's RuntimeError for int, bool or complex tensors.
    check_masked_cosine_args(q, q_mask, g, 1e-12, "masked_arccos_distance", ("q", "q_mask", "g"))
    check_finite_rows("masked_arccos_distance", q=q, q_mask=q_mask, g=g)
    cos = masked_cosine(q, q_mask, g, backend=backend)
    if cos.requires_grad:
        return torch.arccos(torch.clamp(cos, -1 + ARCCOS_CLIP, 1 - ARCCOS_CLIP))
    # in place: re-ranking's G x G distance at MSMT17 scale is 25 GB, three of them did not fit an 80 GB GPU
    return cos.clamp_(-1 + ARCCOS_CLIP, 1 - ARCCOS_CLIP).arccos_()
