"""Fused ops of dpm_ops (torch custom ops under the ``dpm_ops`` namespace)."""

from .hem_loss import hem_loss
from .hem_loss_reference import hem_loss_reference
from .masked_cosine import masked_arccos_distance, masked_cosine
from .masked_cosine_reference import masked_cosine_reference
from .maskreid_ranking_loss import maskreid_ranking_loss
from .maskreid_ranking_loss_reference import maskreid_ranking_loss_reference

__all__ = ["masked_cosine", "masked_arccos_distance", "masked_cosine_reference", "hem_loss", "hem_loss_reference",
           "maskreid_ranking_loss", "maskreid_ranking_loss_reference"]
