"""Fused ops of dpm_ops (torch custom ops under the ``dpm_ops`` namespace)."""

from .masked_cosine import masked_arccos_distance, masked_cosine
from .masked_cosine_reference import masked_cosine_reference

__all__ = ["masked_cosine", "masked_arccos_distance", "masked_cosine_reference"]
