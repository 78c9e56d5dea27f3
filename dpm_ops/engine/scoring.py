"""Scoring for the evaluation engine: the test distance of each model (its recipe's, or one asked
for), optional alpha query expansion and re-ranking, and CMC / mAP / mINP (and optionally fast-reid's
TPR@FPR) on all, clean and occluded queries."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from dpm_ops.data import ReIDSplits
from dpm_ops.evaluation import evaluate_rank, gnn_rerank, pairwise_distance, re_ranking, rerank_features
from dpm_ops.evaluation.query_expansion import check_aqe, expand_features
from dpm_ops.evaluation._inputs import check_rerank
from dpm_ops.evaluation.roc import ROC_FPRS, tpr_at_fpr
from dpm_ops.ops import masked_arccos_distance

from .extraction import FeatureSet
from .recipes import get_recipe

DISTANCES = ("auto", "euclidean", "cosine", "masked_arccos")


def resolve_distance(distance: str, model_name: str) -> str:
    """The metric "auto" stands for (the recipe's: DPM's masked arccos, Euclidean for the others)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    recipe = get_recipe(model_name)
    if distance == "auto":
        return recipe.test_distance
    if distance == "masked_arccos" and not recipe.test_masks:
        raise ValueError(f"distance='masked_arccos' needs DPM's channel masks; {model_name} has none")
    return distance


def check_reranking(rerank, k1, k2, lambda_value, distance: str):
    """evaluation._inputs.check_rerank's (method or None, k1, k2, lambda_value), and a ValueError for GNN
    re-ranking with DPM's masked arccos, which it has no form for."""
    method, k1, k2, lambda_value = check_rerank(rerank, k1, k2, lambda_value)
    if method == "gnn" and distance == "masked_arccos":
        raise ValueError(
            "rerank 'gnn' ranks by the cosine of the features and has no form for DPM's masked_arccos distance: "
            "use distance 'cosine' with it, or rerank 'kreciprocal'"
        )
    return method, k1, k2, lambda_value


def compute_distances(
    query: FeatureSet,
    gallery: FeatureSet,
    distance: str,
    *,
    aqe=False,
    rerank=False,
    k1: Optional[int] = None,
    k2: Optional[int] = None,
    lambda_value: float = 0.3,
    device="cpu",
) -> torch.Tensor:
    """(Q, G) float32 distances on ``device``; with ``rerank`` (True or "kreciprocal", or "gnn"), re-ranked
    (evaluation._inputs.check_rerank: k1 / k2 None are the method's defaults).

    ``aqe`` (True, or a dict of k / alpha / times: evaluation.query_expansion.check_aqe): the features go
    through alpha query expansion first, as fast-reid's TEST.AQE does before its distance and re-ranking;
    DPM's masks stay each item's own.

    GNN re-ranking (``gnn_rerank``) ranks by the cosine of the features whatever ``distance`` says of
    Euclidean or cosine; DPM's masked arccos has no GNN form (a ValueError, check_reranking).

    Re-ranking: Euclidean / cosine features go through ``rerank_features`` (never an N x N
    matrix; for unit-length features the cosine distance 1 - cos = ||q - g||² / 2 and the
    re-ranked result is the same). DPM's masked arccos goes through ``re_ranking`` with the q-g
    matrix, q-q with each query's own mask and g-g with each gallery item's own mask. That
    distance is asymmetric, and it is re-ranked with ``orientation="rows"``: every item's
    neighbourhood is ranked under its own mask, as the test metric ranks the gallery under the
    query's. (The reference's reading, ``orientation="reference"``, would rank item i by the
    other items' masks, column i.) The angle is the geodesic distance between unit vectors, so
    it is passed as ``input="euclidean"`` and squared inside like a Euclidean distance (the
    angle ~ the chord for near neighbours).
    """
    method, k1, k2, lambda_value = check_reranking(rerank, k1, k2, lambda_value, distance)
    expansion = check_aqe(aqe)
    device = torch.device(device)
    qf, gf = query.features.to(device), gallery.features.to(device)
    if expansion is not None:
        names = ("query features", "gallery features", "aqe k", "aqe times")
        qf, gf = expand_features("aqe", qf, gf, **expansion, names=names)
    if method == "gnn":
        return gnn_rerank(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
    if distance == "masked_arccos":
        if query.masks is None or gallery.masks is None:
            raise ValueError("distance='masked_arccos' needs the masks of queries and gallery")
        qm, gm = query.masks.to(device), gallery.masks.to(device)
        q_g = masked_arccos_distance(qf, qm, gf)
        if method is None:
            return q_g
        q_q = masked_arccos_distance(qf, qm, qf)
        g_g = masked_arccos_distance(gf, gm, gf)
        return re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value, input="euclidean", orientation="rows")
    if method is not None:
        if distance == "cosine":
            qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
        return rerank_features(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
    return pairwise_distance(qf, gf, metric=distance)


def _subset_metrics(
    distmat, query: FeatureSet, gallery: FeatureSet, name: str, rows: Optional[torch.Tensor], max_rank, options, roc
) -> Optional[dict]:
    q_pids, q_camids = query.pids, query.camids
    if rows is not None:
        distmat, q_pids, q_camids = distmat[rows.to(distmat.device)], q_pids[rows], q_camids[rows]
    device = distmat.device
    labels = (q_pids.to(device), gallery.pids.to(device), q_camids.to(device), gallery.camids.to(device))
    result = evaluate_rank(distmat, *labels, max_rank=max_rank, **options)
    cmc = [100.0 * float(v) for v in result.cmc]
    # A gallery smaller than max_rank cuts the CMC to its size, past which it would stay at its last value.
    rank = {k: cmc[min(k, len(cmc)) - 1] if len(cmc) == len(gallery.pids) else cmc[k - 1] for k in (1, 5, 10)}
    return {
        "rank1": rank[1],
        "rank5": rank[5],
        "rank10": rank[10],
        "mAP": 100.0 * result.mAP,
        "mINP": 100.0 * result.mINP,
        "num_query": int(len(q_pids)),
        "num_valid": int(result.num_valid),
        "cmc": cmc,
        **(_roc_entry(distmat, labels, name) if roc else {}),
    }


def roc_report(distmat, q_pids, g_pids, q_camids, g_camids) -> dict:
    """fast-reid's TEST.ROC report, in percent: {"1e-04": TPR, "1e-03": ..., "1e-02": ...} (the numbers of
    its "TPR@FPR={:.0e}" keys)."""
    tprs = tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, ROC_FPRS)
    return {f"{fpr:.0e}": 100.0 * float(tpr) for fpr, tpr in zip(ROC_FPRS, tprs)}


def _roc_entry(distmat, labels, name: str) -> dict:
    """{"tpr_at_fpr": roc_report}, or nothing (with a warning) where every kept gallery item matches."""
    try:
        return {"tpr_at_fpr": roc_report(distmat, *labels)}
    except ValueError as error:
        if "non-match in the gallery" not in str(error):
            raise
        warnings.warn(f"query subset {name!r}: TPR@FPR left out: {error}", stacklevel=4)
        return {}


def query_subsets(splits: ReIDSplits, query_records) -> dict:
    """{"clean": rows, "occluded": rows} of the queries (int64 index tensors), or {} when the
    dataset has no occlusion labels."""
    flags = [splits.is_occluded(record) for record in query_records]
    if not flags or flags[0] is None:
        return {}
    occluded = torch.tensor(flags, dtype=torch.bool)
    return {"clean": torch.nonzero(~occluded).flatten(), "occluded": torch.nonzero(occluded).flatten()}


def rank_metrics(
    distmat,
    query: FeatureSet,
    gallery: FeatureSet,
    subsets: Optional[dict] = None,
    max_rank: int = 50,
    protocol: str = "market1501",
    num_repeats: int = 10,
    seed: int = 0,
    roc: bool = False,
) -> dict:
    """{"all": {...}, "clean": {...}, "occluded": {...}} (percent) from a (Q, G) distance matrix;
    protocol / num_repeats / seed as in ``evaluate_rank``; ``roc``: each with ``tpr_at_fpr`` (roc_report).

    A subset with no query, or with no query that has a match, is left out (with a warning for
    the latter)."""
    options = dict(protocol=protocol, num_repeats=num_repeats, seed=seed)
    metrics = {"all": _subset_metrics(distmat, query, gallery, "all", None, max_rank, options, roc)}
    for name, rows in (subsets or {}).items():
        if len(rows) == 0:
            continue
        try:
            metrics[name] = _subset_metrics(distmat, query, gallery, name, rows, max_rank, options, roc)
        except ValueError as error:
            if "no query has a match" not in str(error):
                raise
            warnings.warn(f"query subset {name!r}: no query has a match in the gallery; left out", stacklevel=2)
    return metrics


def format_metrics_table(metrics: dict, label: str = "queries") -> str:
    """A plain-text table: one row per query subset (``all``, ``clean``, ``occluded``, ...),
    columns Rank-1 / Rank-5 / Rank-10 / mAP / mINP (percent), the number of queries scored and, where
    the metrics have them, the TPRs at fast-reid's FPRs (percent); a last line counts the queries left
    out for want of a match (the scores are over the others). ``label`` names the rows' column: another one
    (``"test set"``: a row per set's ``all`` queries) counts each row's left-out queries."""
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be the dict evaluate_model returns, got {type(metrics).__name__}")
    rows = [(name, values) for name, values in metrics.items() if isinstance(values, dict) and "mAP" in values]
    if not rows:
        raise ValueError("metrics holds no subset (a dict with rank1 / rank5 / rank10 / mAP / mINP / num_query)")
    width = max(10, len(label) + 2, *(len(name) + 2 for name, _ in rows))
    fprs = list(dict.fromkeys(fpr for _, values in rows for fpr in values.get("tpr_at_fpr", {})))
    header = f"{label:<{width}}{'Rank-1':>8}{'Rank-5':>8}{'Rank-10':>9}{'mAP':>8}{'mINP':>8}{'#queries':>10}"
    header += "".join(f"{'TPR@' + fpr:>11}" for fpr in fprs)
    lines = [header, "-" * len(header)]
    for name, values in rows:
        try:
            tprs = values.get("tpr_at_fpr", {})
            lines.append(
                f"{name:<{width}}{values['rank1']:>8.1f}{values['rank5']:>8.1f}{values['rank10']:>9.1f}"
                f"{values['mAP']:>8.1f}{values['mINP']:>8.1f}{values.get('num_valid', values['num_query']):>10d}"
                + "".join(f"{tprs[fpr]:>11.1f}" if fpr in tprs else f"{'-':>11}" for fpr in fprs)
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"metrics[{name!r}] is malformed: {error!r}") from error
    for name, values in rows[:1] if label == "queries" else rows:  # subsets of one query set: its all row
        left_out = values["num_query"] - values.get("num_valid", values["num_query"])
        if left_out:
            lines.append(f"({left_out} of {values['num_query']} {name} queries have no match in the gallery: left out)")
    return "\n".join(lines)
