"""Plain-PyTorch reference of DPM's masked prototype cosine: each feature against each class
prototype, the prototype masked by the feature's own mask (DPM's classifier and test metric).

This is the executable specification every backend is tested against:

    n(v)     = v / max(||v||, eps)
    C[b, k]  = < n(x_b), n(m_b ⊙ n(p_k)) >

written in the vectorised form of the official code (two GEMMs):

    num = (n(X) ⊙ M) n(P)ᵀ,   den = sqrt((M ⊙ M)(n(P) ⊙ n(P))ᵀ),   C = num / max(den, eps)

``max(den, eps)`` is exactly ``F.normalize``'s clamp of ``||m_b ⊙ n(p_k)||``; where ``den = 0`` (an
all-zero ``m_b ⊙ n(p_k)``) the clamp is constant, so no gradient flows into the square root, whose
derivative at 0 is infinite (0 · ∞ would make every prototype's gradient NaN). fp16 / bf16 inputs are
computed in fp32, as every kernel does (in fp16, eps = 1e-12 itself rounds to 0 and a zero row to 0 / 0).
"""

import torch
import torch.nn.functional as F

from .._precision import at_least_fp32, sqrt_flat_at_zero


def masked_cosine_reference(
    x: torch.Tensor, mask: torch.Tensor, protos: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    dtype = x.dtype
    x, mask, protos = at_least_fp32(x), at_least_fp32(mask), at_least_fp32(protos)
    x_hat = F.normalize(x, dim=1, eps=eps)
    p_hat = F.normalize(protos, dim=1, eps=eps)
    num = (x_hat * mask) @ p_hat.t()
    den = sqrt_flat_at_zero((mask * mask) @ (p_hat * p_hat).t())
    return (num / den.clamp_min(eps)).to(dtype)
