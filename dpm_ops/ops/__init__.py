"""Fused ops of dpm_ops (torch custom ops under the ``dpm_ops`` namespace)."""

from .batch_hard_triplet import batch_hard_triplet
from .hierarchical_mask_pool import hierarchical_mask_pool
from .hierarchical_mask_pool_reference import hierarchical_mask_pool_reference
from .masked_arcface import masked_arcface_ce
from .masked_cosine import masked_arccos_distance, masked_cosine
from .masked_cosine_reference import masked_cosine_reference

__all__ = [
    "batch_hard_triplet", "hierarchical_mask_pool", "hierarchical_mask_pool_reference", "masked_arccos_distance",
    "masked_arcface_ce", "masked_cosine", "masked_cosine_reference",
]
