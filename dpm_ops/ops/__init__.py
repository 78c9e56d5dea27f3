"""Fused ops of dpm_ops (torch custom ops under the ``dpm_ops`` namespace)."""

from .knn import knn, self_knn
from .knn_reference import knn_reference, self_knn_reference
from .masked_cosine import masked_arccos_distance, masked_cosine
from .masked_cosine_reference import masked_cosine_reference

__all__ = ["knn", "knn_reference", "masked_cosine", "masked_arccos_distance", "masked_cosine_reference", "self_knn",
           "self_knn_reference"]
