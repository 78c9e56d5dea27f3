"""torchreid's `torchreid.reid.metrics.evaluate_rank` and `compute_distance_matrix` and
`torchreid.reid.utils.re_ranking` (0.2.5), computed by dpm_ops:
`from dpm_ops.compat.torchreid import evaluate_rank, re_ranking, compute_distance_matrix`."""

import numpy as np

from . import _peer
from ._peer import cosine_distance, euclidean_squared_distance, re_ranking

__all__ = ["compute_distance_matrix", "cosine_distance", "euclidean_squared_distance", "evaluate_rank", "re_ranking"]


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, use_metric_cuhk03=False, use_cython=True):
    """(cmc, mAP): cmc float32 (min(max_rank, G),), mAP a numpy float64, as torchreid returns them.

    use_metric_cuhk03=True: CUHK03 single-gallery-shot CMC over 10 seeded draws. use_cython is
    accepted and ignored (there is one implementation).
    """
    cmc, result = _peer.rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, use_metric_cuhk03)
    return cmc, np.float64(result.mAP)


def compute_distance_matrix(input1, input2, metric="euclidean"):
    """(M, N) distances of two 2-D feature matrices, a torch tensor on their device as torchreid's:
    "euclidean" is the *squared* Euclidean distance (torchreid's euclidean_squared_distance, what
    its engine ranks and re-ranks), "cosine" 1 − cos."""
    distances = {"euclidean": euclidean_squared_distance, "cosine": cosine_distance}
    if metric not in tuple(distances):  # a list or other unhashable value: this ValueError, not a TypeError
        raise ValueError(f'Unknown distance metric: {metric}. Please choose either "euclidean" or "cosine"')
    return distances[metric](input1, input2)
