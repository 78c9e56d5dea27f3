"""Plain-PyTorch reference of DPM's Head Enrichment Module loss (it pushes the heads' CLS attention
rows towards orthonormality; a term of DPM's ID loss, weight 0.1).

On the last block's pre-softmax, scaled CLS->patch attention logits ``A`` (B, heads, N):

    Â[b,h] = A[b,h] / sqrt(Σ_j A[b,h,j]² + eps),   G_b = Â_b Â_bᵀ  (heads × heads),
    L = Σ_b ‖G_b − I‖²_F / heads²

summed over the batch like the official ``mse_loss(size_average=False)`` (``reduction="sum"``), so
its effective weight grows with the batch size; ``reduction="mean"`` divides by B instead.
fp16/bf16 logits are computed in fp32.
"""

import torch

from .._precision import at_least_fp32

REDUCTIONS = ("sum", "mean")


def hem_loss_reference(cls_logits: torch.Tensor, eps: float = 1e-6, reduction: str = "sum") -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'sum' (official) or 'mean', got {reduction!r}")
    a = at_least_fp32(cls_logits)
    a_hat = a / torch.sqrt((a * a).sum(-1, keepdim=True) + eps)
    gram = a_hat @ a_hat.transpose(1, 2)
    heads = a.shape[1]
    identity = torch.eye(heads, device=a.device, dtype=a.dtype)
    per_sample = (gram - identity).pow(2).sum((1, 2)) / heads**2
    return per_sample.sum() if reduction == "sum" else per_sample.mean()
