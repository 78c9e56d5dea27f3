"""Plain-PyTorch reference of DPM's masked prototype cosine (spec dpm.md §3).

This is the executable specification every backend is tested against:

    n(v)     = v / max(||v||, eps)
    C[b, k]  = < n(x_b), n(m_b ⊙ n(p_k)) >

written in the vectorised form of the official code (two GEMMs):

    num = (n(X) ⊙ M) n(P)ᵀ,   den = sqrt((M ⊙ M)(n(P) ⊙ n(P))ᵀ),   C = num / max(den, eps)

``max(den, eps)`` is exactly ``F.normalize``'s clamp of ``||m_b ⊙ n(p_k)||``.
"""

import torch
import torch.nn.functional as F


def masked_cosine_reference(x: torch.Tensor, mask: torch.Tensor, protos: torch.Tensor,
                            eps: float = 1e-12) -> torch.Tensor:
    x_hat = F.normalize(x, dim=1, eps=eps)
    p_hat = F.normalize(protos, dim=1, eps=eps)
    num = (x_hat * mask) @ p_hat.t()
    den = ((mask * mask) @ (p_hat * p_hat).t()).sqrt()
    return num / den.clamp_min(eps)
