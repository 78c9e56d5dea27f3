"""fast-reid's (1.4.0) evaluation functions, computed by dpm_ops (`from dpm_ops.compat.fastreid
import ...`): `fastreid.evaluation.rank.evaluate_rank`, `.rerank.re_ranking`, `.roc.evaluate_roc`,
`.query_expansion.aqe`, and `fastreid.utils.compute_dist`'s `build_dist`, `compute_jaccard_distance`,
`compute_euclidean_distance` and `compute_cosine_distance`.

Their k-reciprocal Jaccard distance needs faiss and, through `build_dist`, a CUDA GPU; this one runs
on any device without faiss, exactly (dpm_ops.evaluation.jaccard_distance)."""

import numpy as np
import torch

from .. import evaluation
from ..evaluation import _inputs
from ..evaluation.distance import named_pairwise_distance
from ..evaluation.query_expansion import expand_features
from ..evaluation.rank import query_gallery_labels
from . import _peer
from ._peer import re_ranking

__all__ = [
    "aqe",
    "build_dist",
    "compute_cosine_distance",
    "compute_euclidean_distance",
    "compute_jaccard_distance",
    "evaluate_rank",
    "evaluate_roc",
    "re_ranking",
]


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, use_metric_cuhk03=False, use_cython=True):
    """(cmc, all_AP, all_INP): cmc float32 (min(max_rank, G),), AP and inverse negative penalty of
    every query with a match (float64, query order), as fast-reid returns them; its ReidEvaluator
    takes their means as mAP and mINP.

    use_metric_cuhk03=True: (cmc, mAP), fast-reid's return there, with CUHK03's single-gallery-shot
    CMC over 10 seeded draws. use_cython is accepted and ignored (there is one implementation).
    """
    cmc, result = _peer.rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, use_metric_cuhk03)
    if use_metric_cuhk03:
        return cmc, np.float64(result.mAP)
    return cmc, result.all_AP, result.all_INP


def evaluate_roc(distmat, q_pids, g_pids, q_camids, g_camids, use_cython=True):
    """(scores, labels) for a ROC curve, as their TEST.ROC feeds sklearn's roc_curve(labels, scores):
    the distances of every query's gallery items, its own id on its own camera left out; first all
    queries' matches (label 0), then all non-matches (label 1), each query's in increasing distance
    (ties by gallery index). scores in distmat's dtype (float32 for bfloat16, which numpy lacks; float64 when
    there are no matches or no non-matches, where theirs stacks an empty list), labels float64, as their Python
    code (their Cython returns both in float32); use_cython is ignored."""
    dist = _inputs.as_floats("evaluate_roc", "distmat", distmat, 2)
    q_pids, q_camids, g_pids, g_camids = query_gallery_labels(dist, q_pids, q_camids, g_pids, g_camids)
    sorted_dist, order = torch.sort(dist, dim=1, stable=True)
    match = g_pids[order] == q_pids[:, None]
    keep = ~(match & (g_camids[order] == q_camids[:, None]))
    positives, negatives = sorted_dist[keep & match], sorted_dist[keep & ~match]  # row-major: query by query
    scores = _peer.as_numpy(torch.cat([positives, negatives]))
    if not (len(positives) and len(negatives)):  # theirs stacks an empty list (float64) with the other side
        scores = scores.astype(np.float64)
    labels = np.concatenate([np.zeros(len(positives)), np.ones(len(negatives))])
    return scores, labels


def compute_euclidean_distance(features, others):
    """(M, N) *squared* Euclidean distances as a numpy array, as theirs (clamped at 0 here)."""
    return _peer.as_numpy(named_pairwise_distance(features, others, "sqeuclidean", ("features", "others")))


def compute_cosine_distance(features, others):
    """(M, N) cosine distances 1 − cos as a numpy array, as theirs."""
    return _peer.as_numpy(named_pairwise_distance(features, others, "cosine", ("features", "others")))


def compute_jaccard_distance(features, k1=20, k2=6, search_option=0, fp16=False):
    """(N, N) k-reciprocal Jaccard distances of the rows of ``features`` as a numpy float32 array
    (float16 with ``fp16``, computed in float32 and rounded once, where theirs rounds every weight).
    ``search_option`` (their faiss GPU / CPU index) is accepted and ignored: the search here is
    exact on the features' device, CPU or GPU."""
    result = _peer.as_numpy(evaluation.jaccard_distance(features, k1, k2))
    return result.astype(np.float16) if _peer.flag("fp16", fp16) else result


def build_dist(feat_1, feat_2, metric="euclidean", **kwargs):
    """Their distance matrix of feat_1 (M, D) against feat_2 (N, D), a numpy array: "euclidean"
    (squared), "cosine", or "jaccard" (keyword arguments k1 and k2; the (M, N) block of the Jaccard
    distance over both sets, computed without the rest)."""
    if metric not in ("cosine", "euclidean", "jaccard"):
        raise ValueError(f"Expected metrics are cosine, euclidean and jaccard, but got {metric}")
    if metric in ("euclidean", "cosine"):
        kind = "sqeuclidean" if metric == "euclidean" else "cosine"  # their "euclidean" is squared
        return _peer.as_numpy(named_pairwise_distance(feat_1, feat_2, kind, ("feat_1", "feat_2")))
    missing = [name for name in ("k1", "k2") if name not in kwargs]
    if missing:
        raise ValueError(f"build_dist(metric='jaccard') needs the keyword arguments k1 and k2, missing {missing}")
    features = _peer.concatenated(feat_1, feat_2)
    return _peer.as_numpy(evaluation.jaccard_distance(features, kwargs["k1"], kwargs["k2"], num_query=len(feat_1)))


def aqe(query_feat, gallery_feat, qe_times=1, qe_k=10, alpha=3.0):
    """Alpha query expansion (their TEST.AQE): ``qe_times`` times, every feature of query + gallery
    becomes the mean of its ``qe_k`` most cosine-similar features (itself included), each weighted by
    its similarity to the power ``alpha``; returns (query, gallery) torch tensors, float64 for float64
    features and float32 otherwise (theirs returns float16 / bfloat16 features in their own dtype;
    dpm_ops.evaluation.alpha_query_expansion).
    The neighbours come from the exact k-NN (ties by index) instead of an N x N similarity matrix."""
    names = ("query_feat", "gallery_feat", "qe_k", "qe_times")
    expanded = expand_features("aqe", query_feat, gallery_feat, qe_k, alpha, qe_times, names)
    return tuple(torch.as_tensor(features) for features in expanded)  # torch out, whatever came in
