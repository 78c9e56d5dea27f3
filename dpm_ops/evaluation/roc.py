"""TPR at fixed FPRs: fast-reid's ROC report (``TEST.ROC.ENABLED``), exactly, without sorting the pairs.

fast-reid's evaluator scores every kept (query, gallery) pair (Market's rule: the query's own identity on
its own camera left out) by its distance, labels the matches 0 and the non-matches 1, and runs sklearn's
``roc_curve(labels, scores)``: at each distinct distance t, from the largest down, FPR is the share of
matches with distance >= t and TPR that of non-matches. The curve gets sklearn's ``drop_intermediate``:
a point is dropped when the steps to it and from it are the same (equal second differences of both
counts), the first and last points stay, and (0, 0) is put in front. For each target FPR the report is
the TPR of the first point whose FPR is nearest (``np.argmin(np.abs(fprs - fpr))``).

Only a point where the count of matches grows can be the first of its FPR, and each distinct match
distance u is one: its step is (matches at u, non-matches at u) and the next point's step is the next
smaller match distance's, unless non-matches lie strictly between the two (a step with no match: it
differs). So the whole report follows from per-distinct-match-distance counts: the non-matches equal
to each one and those strictly between each two, the op ``roc_counts`` (csrc/roc/: one pass over the
pairs, a C++ or CUDA kernel; its torch version dpm_ops/ops/roc_reference.py where they do not run); no
sort of the (Q, G) pairs. The FPRs and TPRs are the same float64 quotients as sklearn's, so the nearest
point and its ties are theirs.
"""

import numpy as np
import torch

from .. import _backend
from ..ops._checks import check_real
from ..ops.roc import ROC_COUNTS
from . import _inputs
from .rank import query_gallery_labels

ROC_FPRS = (1e-4, 1e-3, 1e-2)  # fast-reid's evaluator reports TPR@FPR=1e-04, 1e-03 and 1e-02


def tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fpr=ROC_FPRS) -> np.ndarray:
    """The TPR (float64, shape (len(fpr),)) at each FPR of ``fpr`` (a number, or a sequence or 1-D array of
    numbers in [0, 1]) on the ROC curve of the (Q, G) distances, as fast-reid's evaluator reports it (module
    docstring): the matches are sklearn's negatives, so TPR@FPR=1e-4 is the share of non-matches at or
    beyond the distance that all but about 0.01 % of the matches lie within. numpy or torch inputs, CPU
    or CUDA, any float dtype. No match or no non-match among the kept pairs (sklearn's NaN rates) is a
    ValueError."""
    targets = [check_real(None, "fpr", value, 0.0, 1.0) for value in _as_list(fpr)]
    dist = _inputs.as_floats("tpr_at_fpr", "distmat", distmat, 2)
    labels = query_gallery_labels(dist, q_pids, q_camids, g_pids, g_camids)
    matches, equal, between = _pair_counts(dist, *labels)
    fps, tps = _curve(matches, equal, between)
    fprs, tprs = fps / fps[-1], tps / float(equal.sum() + between.sum())
    return np.array([tprs[np.argmin(np.abs(fprs - target))] for target in targets], dtype=np.float64)


def _as_list(fpr) -> list:
    if isinstance(fpr, (np.ndarray, torch.Tensor)) and fpr.ndim == 1:  # an array of FPRs, as np.logspace gives
        fpr = fpr.tolist()
    if isinstance(fpr, (list, tuple)) and len(fpr) > 0:
        return list(fpr)
    if isinstance(fpr, (list, tuple)):
        raise ValueError("fpr must be a number or a non-empty sequence of numbers in [0, 1], got an empty one")
    return [fpr]


def _pair_counts(dist, q_pids, q_camids, g_pids, g_camids):
    """Over the kept pairs, per distinct match distance in increasing order: the matches at it and the
    non-matches equal to it ((U,) each), and the non-matches strictly between it and the previous one
    ((U + 1,): [0] below the smallest, [U] above the largest); int64 numpy arrays."""
    backend = _backend.resolve(None, dist.device)
    backend = backend if backend in ("cpp", "cuda") else "reference"
    matches, buckets = ROC_COUNTS.run(backend, dist, q_pids, g_pids, q_camids, g_camids)
    matches, buckets = matches.cpu().numpy(), buckets.cpu().numpy()  # buckets[-1], NaN / inf: as_floats raised
    if len(matches) == 0:
        raise ValueError(
            "no query has a match in the gallery (same pid on another camera): the FPR is undefined; "
            "check q_pids / g_pids / q_camids / g_camids"
        )
    if buckets[:-1].sum() == 0:
        raise ValueError("no query has a non-match in the gallery (another pid): the TPR is undefined")
    return matches, buckets[1:-1:2], buckets[0:-1:2]


def _curve(matches, equal, between):
    """(false positives, true positives) of the points of the dropped curve that can be the first of
    their FPR, (0, 0) in front, as float64 counts in sklearn's order (decreasing distance). Point j, at
    the j-th largest match distance, steps by (matches, equal non-matches) there; the next point steps
    by the next match distance's unless non-matches lie between (its step has no match)."""
    matches, equal = matches[::-1], equal[::-1]
    above, below = between[::-1][:-1], between[::-1][1:]
    kept = below > 0
    kept[:-1] |= (matches[1:] != matches[:-1]) | (equal[1:] != equal[:-1])
    kept[-1] = True  # the last point of the curve, or followed by a step with no match
    kept[0] |= above[0] == 0  # the first point of the curve
    fps = np.concatenate([[0], np.cumsum(matches)[kept]]).astype(np.float64)
    tps = np.concatenate([[0], np.cumsum(above + equal)[kept]]).astype(np.float64)
    return fps, tps
