"""Vectorised numpy Market-1501 evaluation: the test oracle and speed baseline of evaluate_rank.

Definitions (torchreid / fast-reid, spec rerank_eval.md §3):

* each query's gallery is sorted by distance with a *stable* argsort, so equal distances are
  ordered by gallery index;
* gallery items with the query's pid *and* camera are removed; ranks count kept items only;
* queries with no remaining match are skipped; it is an error if none is left;
* CMC(k) = share of valid queries whose first match is at rank <= k, for k = 1..max_rank;
* AP (ap="standard") is non-interpolated: mean over the matches of (matches so far) / rank;
  ap="trapezoid" is the official Market MATLAB compute_AP.m: mean over the matches of
  (p_i + p'_i) / 2 with p_i = i / r_i and p'_i = (i - 1) / (r_i - 1) (1 when r_i = 1);
* INP = (number of matches) / (rank of the last match) (Ye et al.).
"""

import numpy as np

_QUERY_CHUNK = 512  # bounds the (chunk, G) temporaries; the maths is per query


def _chunk_metrics(distmat, q_pids, g_pids, q_camids, g_camids, ap):
    order = np.argsort(distmat, axis=1, kind="stable")
    same_pid = g_pids[order] == q_pids[:, None]
    kept = ~(same_pid & (g_camids[order] == q_camids[:, None]))
    matches = same_pid & kept
    num_matches = matches.sum(axis=1)
    valid = num_matches > 0
    matches, kept, num_matches = matches[valid], kept[valid], num_matches[valid]

    kept_rank = np.cumsum(kept, axis=1)  # rank among kept items, read at kept columns
    matches_so_far = np.cumsum(matches, axis=1)
    safe_rank = np.maximum(kept_rank, 1)  # leading removed items have kept_rank 0
    precision = matches_so_far / safe_rank
    if ap == "trapezoid":
        previous = np.where(kept_rank > 1, (matches_so_far - 1) / np.maximum(kept_rank - 1, 1), 1.0)
        precision = (precision + previous) / 2
    all_ap = np.where(matches, precision, 0.0).sum(axis=1) / num_matches

    rows = np.arange(len(matches))
    first_match = kept_rank[rows, np.argmax(matches, axis=1)]
    last_match = kept_rank[rows, matches.shape[1] - 1 - np.argmax(matches[:, ::-1], axis=1)]
    return all_ap, first_match, num_matches / last_match


def evaluate_rank_numpy(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, ap="standard"):
    """Returns a dict with cmc (max_rank,), mAP, mINP, all_AP and all_INP (per valid query), num_valid."""
    if ap not in ("standard", "trapezoid"):
        raise ValueError(f"ap must be 'standard' or 'trapezoid', got {ap!r}")
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    parts = [
        _chunk_metrics(
            distmat[start : start + _QUERY_CHUNK],
            q_pids[start : start + _QUERY_CHUNK],
            g_pids,
            q_camids[start : start + _QUERY_CHUNK],
            g_camids,
            ap,
        )
        for start in range(0, len(distmat), _QUERY_CHUNK)
    ]
    all_ap, first_match, inp = (np.concatenate(values) for values in zip(*parts))
    if len(all_ap) == 0:
        raise ValueError("no query has a match in the gallery")
    cmc = (first_match[:, None] <= np.arange(1, max_rank + 1)).mean(axis=0)
    return dict(cmc=cmc, mAP=all_ap.mean(), mINP=inp.mean(), all_AP=all_ap, all_INP=inp, num_valid=len(all_ap))
