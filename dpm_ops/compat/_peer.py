"""What the torchreid and fast-reid drop-ins share: their evaluate_rank's CMC, their re_ranking and
their two distance matrices."""

import numpy as np
import torch

from .. import evaluation
from ..evaluation import _inputs
from ..evaluation.distance import named_pairwise_distance
from ..ops._checks import check_flag, is_integer


def rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, use_metric_cuhk03):
    """(cmc, dpm_ops RankResult): cmc as the peers return it, float32 with min(max_rank, G) entries."""
    use_metric_cuhk03 = flag("use_metric_cuhk03", use_metric_cuhk03)
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


def flag(name: str, value) -> bool:
    """A switch of the peers' API, which tests its truth: bools, None and the integers 0 and 1 are taken as
    they read them; anything else (a string such as "no", which they read as true) is a ValueError."""
    if value is None or (is_integer(value) and value in (0, 1)):
        return bool(value)
    return check_flag(None, name, value)


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranked (Q, G) float32 distances, `dpm_ops.evaluation.re_ranking` with the
    reference's column reading (orientation="reference"); a numpy array whatever the input, as theirs."""
    return as_numpy(evaluation.re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value))


def as_numpy(result):
    """A numpy array, as the peers return (a torch result is moved to the CPU; bfloat16 as float32)."""
    return _inputs.to_numpy(result) if isinstance(result, torch.Tensor) else result


def euclidean_squared_distance(input1, input2):
    """(M, N) squared Euclidean distances, ‖x‖² + ‖y‖² − 2 x·y as theirs, clamped at 0 (theirs can
    be slightly negative from rounding); float32 (float64 for float64 input), on the input's device."""
    return named_pairwise_distance(input1, input2, "sqeuclidean", ("input1", "input2"))


def cosine_distance(input1, input2):
    """(M, N) 1 − x̂·ŷ, x̂ = x / max(‖x‖, 1e-12) (their F.normalize)."""
    return named_pairwise_distance(input1, input2, "cosine", ("input1", "input2"))


def concatenated(feat_1, feat_2) -> torch.Tensor:
    """The rows of two non-empty feature matrices (numpy or torch, same width) as one tensor, on
    feat_1's device, in the wider of their dtypes (torch.cat's promotion, as theirs)."""
    first = _inputs.as_floats("build_dist", "feat_1", feat_1, 2)
    second = _inputs.as_floats("build_dist", "feat_2", feat_2, 2, device=first.device)
    if first.shape[1] != second.shape[1]:
        raise ValueError(f"feat_1 and feat_2 must have the same width, got {first.shape[1]} and {second.shape[1]}")
    return torch.cat([first, second])
