"""torchreid 0.2.5 and fast-reid 1.4.0 against dpm_ops.compat on the same inputs, timed in one run.

* evaluate_rank at Market-1501 scale (3,368 x 15,913 float32 distances of the synthetic features,
  benchmarks/reference/synthetic_features.py): torchreid's Python (its 0.2.5 sdist ships no Cython),
  fast-reid's Python, fast-reid's Cython (rank_cy.pyx built here) and `dpm_ops.compat.fastreid`;
* re_ranking from the three distance matrices at a quarter of Market scale (842 x 3,978): the peers'
  re_ranking (the same numpy code in both) and `dpm_ops.compat.torchreid`;
* fast-reid's k-reciprocal Jaccard distance (compute_jaccard_distance, k1 30, k2 6, the UDA
  setting) of the pooled query + gallery features at a quarter of Market scale (4,820 items): its
  numpy code with faiss-cpu's exact index (search_option=3) and `dpm_ops.compat.fastreid`;
* fast-reid's alpha query expansion (aqe, its TEST.AQE defaults: 1 round, k 5, alpha 3) of the query
  and gallery features at a quarter of Market scale: its code (an N x N similarity, a numpy row loop) and
  `dpm_ops.compat.fastreid` (the exact k-NN);
* fast-reid's ROC report (its evaluator's TEST.ROC: evaluate_roc, sklearn's roc_curve, the TPR at FPR
  1e-4 / 1e-3 / 1e-2) at Market-1501 scale, with its Python or its Cython (roc_cy.pyx built here)
  evaluate_roc, and `dpm_ops.evaluation.tpr_at_fpr`.

Everything runs on the CPU from numpy arrays, as the peers take them. The ratios (peer / dpm_ops,
fastest rounds; the case "dpm_ops") are printed by the `bench_ratio` cases; no target is set. The peers are loaded file
by file (benchmarks/reference/peers.py) and skipped when not installed. The smoke scale (1/25 of
Market) keeps `pytest benchmarks/ --benchmark-disable` short; the larger scales are `slow`.
"""

import functools

import numpy as np
import pytest
import torch

from benchmarks.conftest import speedup
from benchmarks.reference import peers
from benchmarks.reference.synthetic_features import MARKET1501, make_reid_features, scaled
from dpm_ops.compat import fastreid, torchreid
from dpm_ops.evaluation import pairwise_distance, tpr_at_fpr

SCALES = {"smoke": 0.04, "quarter market1501": 0.25, "market1501": 1.0}
EVALUATE_SCALES = ("smoke", "market1501")
RERANK_SCALES = ("smoke", "quarter market1501")
JACCARD_SCALES = ("smoke", "quarter market1501")
AQE_SCALES = ("smoke", "quarter market1501")
ROC_SCALES = ("smoke", "market1501")
DPM_OPS = "dpm_ops"


@functools.lru_cache(maxsize=1)
def reid_data(scale: str):
    return make_reid_features(**scaled(MARKET1501, SCALES[scale]), seed=0)


def evaluate_inputs(scale):
    data = reid_data(scale)
    distmat = pairwise_distance(data.query, data.gallery)
    return distmat, data.query_pids, data.gallery_pids, data.query_camids, data.gallery_camids


def rerank_inputs(scale):
    data = reid_data(scale)
    return (
        pairwise_distance(data.query, data.gallery),
        pairwise_distance(data.query, data.query),
        pairwise_distance(data.gallery, data.gallery),
    )


def jaccard_inputs(scale):
    data = reid_data(scale)
    return torch.from_numpy(np.concatenate([data.query, data.gallery]))


def aqe_inputs(scale):
    data = reid_data(scale)
    return torch.from_numpy(data.query), torch.from_numpy(data.gallery)


# Each builds the call to time from the inputs.
EVALUATE = {
    "torchreid python": lambda args: lambda: peers.load("torchreid_rank").evaluate_rank(*args, use_cython=False),
    "fastreid python": lambda args: lambda: peers.load("fastreid_rank").evaluate_rank(*args, use_cython=False),
    "fastreid cython": lambda args: lambda: peers.fastreid_cython().evaluate_cy(*args, 50),
    DPM_OPS: lambda args: lambda: fastreid.evaluate_rank(*args),
}
RERANK = {
    "torchreid": lambda args: lambda: peers.load("torchreid_rerank").re_ranking(*args),
    "fastreid": lambda args: lambda: peers.load("fastreid_rerank").re_ranking(*args),
    DPM_OPS: lambda args: lambda: torchreid.re_ranking(*args),
}
JACCARD = {
    "fastreid faiss-cpu": lambda features: (
        lambda: peers.fastreid_compute_dist().compute_jaccard_distance(features, k1=30, k2=6, search_option=3)
    ),
    DPM_OPS: lambda features: lambda: fastreid.compute_jaccard_distance(features, k1=30, k2=6),
}
AQE = {
    "fastreid": lambda args: lambda: peers.load("fastreid_query_expansion").aqe(*args, 1, 5, 3.0),
    DPM_OPS: lambda args: lambda: fastreid.aqe(*args, 1, 5, 3.0),
}
ROC = {  # the inputs of evaluate_rank
    "fastreid python + sklearn": lambda args: lambda: peers.fastreid_tpr_at_fpr(*args),
    "fastreid cython + sklearn": lambda args: lambda: peers.fastreid_tpr_at_fpr(*args, cython=True),
    DPM_OPS: lambda args: lambda: tpr_at_fpr(*args),
}


def group_name(op, scale):
    data = reid_data(scale)
    return f"{op} vs peers {scale} {len(data.query)}x{len(data.gallery)} cpu"


def params(cases, scales):
    return [
        pytest.param(case, scale, marks=() if scale == "smoke" else pytest.mark.slow)
        for scale in scales
        for case in cases
    ]


def _time(timed, op, case, scale, call):
    # The peers' Python takes seconds to a minute at the large scales: one round there.
    slow_peer = scale != "smoke" and case != DPM_OPS
    timed(call, group=group_name(op, scale), name=case, device="cpu", rounds=1 if slow_peer else 3, iterations=1)


@pytest.mark.parametrize("case, scale", params(EVALUATE, EVALUATE_SCALES))
def bench_evaluate_rank(timed, case, scale):
    _time(timed, "evaluate_rank", case, scale, EVALUATE[case](evaluate_inputs(scale)))


@pytest.mark.parametrize("case, scale", params(RERANK, RERANK_SCALES))
def bench_re_ranking(timed, case, scale):
    _time(timed, "re_ranking", case, scale, RERANK[case](rerank_inputs(scale)))


@pytest.mark.parametrize("case, scale", params(JACCARD, JACCARD_SCALES))
def bench_jaccard_distance(timed, case, scale):
    _time(timed, "jaccard_distance", case, scale, JACCARD[case](jaccard_inputs(scale)))


@pytest.mark.parametrize("case, scale", params(AQE, AQE_SCALES))
def bench_aqe(timed, case, scale):
    _time(timed, "aqe", case, scale, AQE[case](aqe_inputs(scale)))


@pytest.mark.parametrize("case, scale", params(ROC, ROC_SCALES))
def bench_tpr_at_fpr(timed, case, scale):
    _time(timed, "tpr_at_fpr", case, scale, ROC[case](evaluate_inputs(scale)))


RATIOS = [
    (op, peer, scale)
    for op, cases, scales in (
        ("evaluate_rank", EVALUATE, EVALUATE_SCALES),
        ("re_ranking", RERANK, RERANK_SCALES),
        ("jaccard_distance", JACCARD, JACCARD_SCALES),
        ("aqe", AQE, AQE_SCALES),
        ("tpr_at_fpr", ROC, ROC_SCALES),
    )
    for scale in scales
    for peer in cases
    if peer != DPM_OPS
]


@pytest.mark.parametrize(
    "op, peer, scale", [pytest.param(*ratio, marks=() if ratio[2] == "smoke" else pytest.mark.slow) for ratio in RATIOS]
)
def bench_ratio(op, peer, scale):
    ratio = speedup(group_name(op, scale), DPM_OPS, baseline=peer)
    print(f"\n{group_name(op, scale)}: dpm_ops {ratio:.1f}x {peer}")
