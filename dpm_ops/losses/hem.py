"""Head Enrichment Module loss of DPM: orthonormality of the heads' CLS->patch logits.

``Â[b,h] = A[b,h] / sqrt(Σ_j A[b,h,j]² + 1e-6)``, ``G_b = Â_b Â_bᵀ`` (heads × heads), and
``L = Σ_b ‖G_b − I‖²_F / heads²``: summed over the batch like the official
``mse_loss(size_average=False)``, so its effective weight grows with the batch size.

``backend=None`` (default) runs the fused op ``dpm_ops.ops.hem_loss`` (one pass per sample forward,
closed-form backward; the plain-torch reference where no kernel backend is available);
``backend="reference"`` the plain-torch reference (``dpm_ops.ops.hem_loss_reference``).
``hem_loss`` is that op (its signature), also taking the deprecated ``fused=``.
"""

from __future__ import annotations

from ..ops.hem_loss import hem_loss as fused_hem_loss
from ..ops.hem_loss_reference import REDUCTIONS
from ..ops._checks import check_number
from ._options import LossModule, accepts_fused

# cls_logits: (B, heads, N) pre-softmax, scaled logits of the last block (the model's ``hem_logits``).
hem_loss = accepts_fused(fused_hem_loss)


class HEMLoss(LossModule):
    """Unweighted HEM loss (options: ``hem_loss``'s); DPM weighs it by 0.1 (0.01 for Occluded-REID) in ``DPMLoss``."""

    loss_function = staticmethod(hem_loss)

    def __init__(self, **options):
        super().__init__(**options)
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"HEMLoss: reduction must be 'sum' (official) or 'mean', got {self.reduction!r}")
        check_number("HEMLoss", "eps", self.eps, positive=True)  # now, not at the first batch
