"""Alpha query expansion (alpha-QE: Radenović, Tolias and Chum, "Fine-tuning CNN Image Retrieval with No
Human Annotation", TPAMI 2019), with the semantics of fast-reid's ``TEST.AQE`` (its
``fastreid/evaluation/query_expansion.py::aqe``, taken from PyRetri).

``times`` rounds; in each, every feature of the pooled query + gallery set becomes the mean of the raw
features of its ``k`` most cosine-similar pooled items (itself among them), each weighted by its cosine
similarity to the power ``alpha``. The next round's similarities are those of the new features, normalised;
the returned features are not normalised (so a Euclidean distance after it sees their scale, as in fast-reid).
fast-reid builds the N x N similarity matrix and takes each row's top k with numpy's argpartition; here the k
neighbours and their similarities come from the exact k-NN of the cosine distance among the pooled items
(dpm_ops.ops.self_knn: ties by index, each item's own distance 0; on the CPU half the similarity GEMM) and
only (N, k) lists are held.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .._precision import compute_dtype
from ..ops._checks import KNN_GPU_MAX_K, check_number
from . import _inputs
from ..ops.knn import self_knn
from .distance import _check_tensors

# fast-reid's TEST.AQE defaults (QE_K 5, ALPHA 3.0, QE_TIME 1; its aqe function's own default k is 10)
AQE_DEFAULTS = {"k": 5, "alpha": 3.0, "times": 1}
# Rounds: each is a k-NN of the pooled set, several times a ranking's work, and pulls every feature toward its
# neighbours' mean, so that a few rounds already merge the features of a cluster (fast-reid and the method's
# authors take 1). A billion rounds ran for days.
MAX_AQE_TIMES = 10
TIMES_WHY = " (rounds, each a k-NN of the query and gallery features)"
# the engine's k: what the GPU k-NN kernels take, so that a run does not fail on the GPU only, after extraction
MAX_AQE_K = KNN_GPU_MAX_K


def check_aqe(aqe) -> dict | None:
    """The engine's ``aqe`` argument as None (off) or {"k", "alpha", "times"}: False / None (off), True (the
    defaults, AQE_DEFAULTS) or a mapping of some of those keys (the rest default)."""
    if aqe is None or aqe is False:
        return None
    if aqe is True:
        aqe = {}
    if not isinstance(aqe, Mapping) or not set(aqe) <= set(AQE_DEFAULTS):
        raise ValueError(f"aqe must be a bool or a dict of {tuple(AQE_DEFAULTS)}, got {aqe!r:.100}")
    settings = {**AQE_DEFAULTS, **aqe}
    return {
        "k": _inputs.check_count("aqe k", settings["k"], 1, MAX_AQE_K, why=" (the GPU k-NN kernels' most)"),
        "alpha": check_number("aqe", "alpha", settings["alpha"]),
        # 0 rounds: aqe off
        "times": _inputs.check_count("aqe times", settings["times"], 1, MAX_AQE_TIMES, why=TIMES_WHY),
    }


def alpha_query_expansion(qf, gf, k: int = 5, alpha: float = 3.0, times: int = 1):
    """(query, gallery) features after ``times`` rounds of alpha query expansion (module docstring) of the
    pooled query features qf (Q, D) and gallery features gf (G, D). k in [1, Q + G]; times in [0, MAX_AQE_TIMES].
    Computed in float64 where either input is float64 and in float32 otherwise (returned so); numpy in, numpy out;
    torch in, torch out, on qf's device. An alpha that makes a weight non-finite (a negative similarity to a
    fractional power, 0 to a negative one) is a ValueError, not NaN features."""
    return expand_features("alpha_query_expansion", qf, gf, k, alpha, times)


def expand_features(op: str, qf, gf, k, alpha, times, names=("qf", "gf", "k", "times")):
    """alpha_query_expansion, its errors naming ``op`` and the arguments ``names`` (query, gallery, k, times):
    fast-reid's ``aqe`` drop-in (dpm_ops.compat.fastreid) names its own."""
    query, gallery = _check_tensors(op, qf, gf, "cosine", names[:2])  # finite rows the k-NN can square
    dtype = compute_dtype(query, gallery)
    features = torch.cat([query.to(dtype), gallery.to(dtype)])
    k = _inputs.check_count(names[2], k, 1, len(features))
    alpha = check_number(op, "alpha", alpha)
    times = _inputs.check_count(names[3], times, 0, MAX_AQE_TIMES, why=TIMES_WHY)
    for _ in range(times):
        distances, neighbours, *_ = self_knn(features, k, metric="cosine")
        weights = (1 - distances).pow(alpha)  # each neighbour's cosine similarity, to the power alpha
        # the weighted mean of the neighbours' raw features, without an (N, k, D) gather
        expanded = F.embedding_bag(neighbours, features, per_sample_weights=weights, mode="sum") / k
        if not bool(torch.isfinite(expanded).all()):  # fast-reid returns the NaN rows
            raise ValueError(
                f"{op}: alpha={alpha} gives non-finite weights (a negative similarity to a fractional power, "
                "or 0 to a negative one): use an integer alpha >= 0, or features whose neighbours are similar"
            )
        features = expanded
    num_query = len(query)
    return _inputs.like_input(features[:num_query], qf), _inputs.like_input(features[num_query:], qf)
