"""fast-reid's ROC report's counts as a custom op (C++ / CUDA kernels in csrc/roc/; caller:
dpm_ops/evaluation/roc.py; its torch version, roc_reference.py, runs where the kernels do not)."""

from ._declare import declare
from .kreciprocal import ragged
from .roc_reference import roc_counts_reference


def _fake_roc_counts(distmat, q_pids, g_pids, q_camids, g_camids):
    return ragged(q_pids, q_pids.dtype), ragged(q_pids, q_pids.dtype)


# Over the kept pairs: the matches at each distinct match distance (ascending) and the non-matches per
# bucket of their distance among those (roc_reference.py), plus a flag for a NaN or inf in distmat.
ROC_COUNTS = declare(
    "roc_counts",
    "(Tensor distmat, Tensor q_pids, Tensor g_pids, Tensor q_camids, Tensor g_camids)"
    " -> (Tensor matches, Tensor buckets)",
    _fake_roc_counts,
    reference=roc_counts_reference,
)
