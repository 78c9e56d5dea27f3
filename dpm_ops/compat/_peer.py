"""What the torchreid and fast-reid drop-ins share: their evaluate_rank's CMC and their re_ranking."""

import numpy as np

from .. import evaluation


def rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, use_metric_cuhk03):
    """(cmc, dpm_ops RankResult): cmc as the peers return it, float32 with min(max_rank, G) entries."""
    result = evaluation.evaluate_rank(
        distmat,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank=max_rank,
        protocol="cuhk03" if use_metric_cuhk03 else "market1501",
    )
    # evaluate_rank cuts max_rank down to the gallery size, with a warning, as the peers do.
    return result.cmc.astype(np.float32), result


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranked (Q, G) float32 distances, `dpm_ops.evaluation.re_ranking` with the
    reference's column reading (orientation="reference"); a numpy array whatever the input, as theirs."""
    final_dist = evaluation.re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)
    return final_dist.cpu().numpy() if hasattr(final_dist, "cpu") else final_dist
