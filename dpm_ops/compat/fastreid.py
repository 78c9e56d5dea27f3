"""fast-reid's `fastreid.evaluation.rank.evaluate_rank` and `fastreid.evaluation.rerank.re_ranking`
(1.4.0), computed by dpm_ops: `from dpm_ops.compat.fastreid import evaluate_rank, re_ranking`."""

import numpy as np

from . import _peer
from ._peer import re_ranking

__all__ = ["evaluate_rank", "re_ranking"]


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
