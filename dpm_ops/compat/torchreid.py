"""torchreid's `torchreid.reid.metrics.evaluate_rank` and `torchreid.reid.utils.re_ranking` (0.2.5),
computed by dpm_ops: `from dpm_ops.compat.torchreid import evaluate_rank, re_ranking`."""

import numpy as np

from . import _peer
from ._peer import re_ranking

__all__ = ["evaluate_rank", "re_ranking"]


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, use_metric_cuhk03=False, use_cython=True):
    """(cmc, mAP): cmc float32 (min(max_rank, G),), mAP a numpy float64, as torchreid returns them.

    use_metric_cuhk03=True: CUHK03 single-gallery-shot CMC over 10 seeded draws. use_cython is
    accepted and ignored (there is one implementation).
    """
    cmc, result = _peer.rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, use_metric_cuhk03)
    return cmc, np.float64(result.mAP)
