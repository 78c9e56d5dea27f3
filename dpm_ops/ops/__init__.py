"""Fused ops of dpm_ops (torch custom ops under the ``dpm_ops`` namespace)."""

from .batch_hard_triplet import batch_hard_triplet
from .batch_hard_triplet_reference import batch_hard_triplet_reference
from .hem_loss import hem_loss
from .hem_loss_reference import hem_loss_reference
from .hierarchical_mask_pool import hierarchical_mask_pool
from .hierarchical_mask_pool_reference import hierarchical_mask_pool_reference
from . import gnn_rerank, kreciprocal, rank, roc  # noqa: F401  (the evaluation kernels' ops)
from .knn import int8_gemm_engine, knn, self_knn
from . import knn_certified  # noqa: F401  (the CUDA / Triton certified k-NN: registrations)
from .knn_reference import knn_reference, self_knn_reference
from .masked_arcface import masked_arcface_ce
from .masked_arcface_reference import masked_arcface_reference
from .masked_cosine import masked_arccos_distance, masked_cosine
from .masked_cosine_reference import masked_cosine_reference
from .maskreid_ranking_loss import maskreid_ranking_loss
from .maskreid_ranking_loss_reference import maskreid_ranking_loss_reference

__all__ = [
    "batch_hard_triplet",
    "batch_hard_triplet_reference",
    "hem_loss",
    "hem_loss_reference",
    "hierarchical_mask_pool",
    "hierarchical_mask_pool_reference",
    "int8_gemm_engine",
    "knn",
    "knn_reference",
    "masked_arccos_distance",
    "masked_arcface_ce",
    "masked_arcface_reference",
    "masked_cosine",
    "masked_cosine_reference",
    "maskreid_ranking_loss",
    "maskreid_ranking_loss_reference",
    "self_knn",
    "self_knn_reference",
]
