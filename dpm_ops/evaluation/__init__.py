"""Re-ID evaluation: distances, exact k-NN, Market-1501 CMC/mAP/mINP, k-reciprocal and GNN
re-ranking, alpha query expansion, fast-reid's TPR@FPR.

All functions take numpy arrays or torch tensors (CPU or CUDA); see each docstring for the
exact semantics and tie rules.
"""

from .distance import METRICS, knn, pairwise_distance
from .rank import AP_MODES, PROTOCOLS, RankResult, evaluate_rank
from .gnn_rerank import gnn_rerank
from .query_expansion import alpha_query_expansion
from ._inputs import RERANK_METHODS
from .rerank import ORIENTATIONS, jaccard_distance, re_ranking, rerank_features
from .roc import ROC_FPRS, tpr_at_fpr

__all__ = [
    "AP_MODES",
    "METRICS",
    "ORIENTATIONS",
    "PROTOCOLS",
    "RERANK_METHODS",
    "ROC_FPRS",
    "RankResult",
    "alpha_query_expansion",
    "evaluate_rank",
    "gnn_rerank",
    "jaccard_distance",
    "knn",
    "pairwise_distance",
    "re_ranking",
    "rerank_features",
    "tpr_at_fpr",
]
