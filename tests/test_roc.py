"""TPR at fixed FPRs (dpm_ops.evaluation.tpr_at_fpr) against fast-reid's own ROC report: its evaluate_roc
and the real sklearn roc_curve, then its evaluator's nearest-FPR pick (peers.fastreid_tpr_at_fpr)."""

import numpy as np
import pytest
import torch

import dpm_ops
from benchmarks.reference import peers
from dpm_ops.engine import scoring
from dpm_ops.engine.extraction import FeatureSet
from dpm_ops.evaluation import ROC_FPRS, tpr_at_fpr
from dpm_ops.ops import roc_reference
from dpm_ops.ops.roc_reference import roc_counts_reference


fastreid_report = peers.fastreid_tpr_at_fpr


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """tpr_at_fpr's counts from the roc_counts kernel of the default backend (C++ here), or from its torch
    version (dpm_ops/ops/roc_reference.py, where no kernel runs)."""
    if request.param == "torch":
        monkeypatch.setenv("DPM_OPS_BACKEND", "reference")
    elif not dpm_ops.backends()["cpp"][0]:
        pytest.skip("the C++ extension is not built")
    return request.param


def random_case(rng, tie_levels=None):
    num_query, num_gallery = int(rng.integers(1, 30)), int(rng.integers(2, 80))
    if tie_levels:  # few distinct distances: equal steps, dropped points, ties between matches and others
        distmat = rng.integers(0, tie_levels, (num_query, num_gallery)).astype(np.float32)
    else:
        distmat = rng.random((num_query, num_gallery)).astype(np.float32)
    ids = int(rng.integers(1, 6))
    labels = [rng.integers(0, ids, num_query), rng.integers(0, ids, num_gallery)]
    labels += [rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)]
    return distmat, labels


def undropped_report(distmat, q_pids, g_pids, q_camids, g_camids, fprs):
    """The same pick on the curve with every point (no drop_intermediate), to show the drop matters."""
    same_id = g_pids[None] == q_pids[:, None]
    match = same_id & (g_camids[None] != q_camids[:, None])
    thresholds = np.unique(distmat)[::-1]
    fps = np.array([0] + [(distmat[match] >= t).sum() for t in thresholds]) / match.sum()
    tps = np.array([0] + [(distmat[~same_id] >= t).sum() for t in thresholds]) / (~same_id).sum()
    return np.array([tps[np.argmin(np.abs(fps - fpr))] for fpr in fprs])


def test_equals_fastreids_report_on_random_and_tie_heavy_distances(path):
    rng = np.random.default_rng(0)
    compared = differs_undropped = 0
    for trial in range(300):
        distmat, labels = random_case(rng, tie_levels=int(rng.integers(1, 12)) if trial % 2 else None)
        q_pids, g_pids, q_camids, g_camids = labels
        same_id = g_pids[None] == q_pids[:, None]
        if not (same_id & (g_camids[None] != q_camids[:, None])).any() or same_id.all():
            with pytest.raises(ValueError, match="no query has a (match|non-match) in the gallery"):
                tpr_at_fpr(distmat, *labels)
            continue
        fprs = tuple(rng.random(4)) + ROC_FPRS + (0.0, 0.5, 1.0)
        got = tpr_at_fpr(distmat, *labels, fpr=fprs)
        assert got.dtype == np.float64 and got.shape == (len(fprs),)
        np.testing.assert_array_equal(got, fastreid_report(distmat, *labels, fprs), err_msg=f"trial {trial}")
        compared += 1
        differs_undropped += not np.array_equal(got, undropped_report(distmat, *labels, fprs))
    assert compared > 200 and differs_undropped > 20, (compared, differs_undropped)


@pytest.mark.parametrize(
    "levels",
    [
        [0.5],  # one distance: every pair tied
        [-3e38, -1.0, -0.0, 0.0, 1e-45, 2e-45, 1.0, 3e38],  # float32's extremes, signed zeros, denormals
        [1.0, np.nextafter(np.float32(1.0), np.float32(2.0)), 1e30],  # one ulp apart, then far above
    ],
)
def test_extreme_distances(path, levels):
    # the monotone bins (_MonotoneBins) stay exact at any range, width or sign of the distances
    rng = np.random.default_rng(7)
    for _ in range(20):
        distmat, labels = random_case(rng, tie_levels=len(levels))
        distmat = np.asarray(levels, dtype=np.float32)[distmat.astype(np.int64)]
        q_pids, g_pids, q_camids, g_camids = labels
        same_id = g_pids[None] == q_pids[:, None]
        if not (same_id & (g_camids[None] != q_camids[:, None])).any() or same_id.all():
            continue
        fprs = ROC_FPRS + (0.3, 0.7)
        np.testing.assert_array_equal(tpr_at_fpr(distmat, *labels, fpr=fprs), fastreid_report(distmat, *labels, fprs))


def test_hand_worked_curve(path):
    # One query (pid 1, camera 0). Its kept pairs by decreasing distance: other 6, match 5, match 4, other 3;
    # the match at 0.5 is on its own camera, left out. sklearn's curve: (0, 0), (0, 1/2) first, then the point
    # at 5 is dropped (the same step (1, 0) into it and out of it), (1, 1/2) at 4, (1, 1) at 3.
    distmat = np.array([[6.0, 5.0, 4.0, 3.0, 0.5]], dtype=np.float32)
    labels = (np.array([1]), np.array([2, 1, 1, 2, 1]), np.array([0]), np.array([1, 1, 1, 1, 0]))
    # FPR 0.5 is as near FPR 0 as FPR 1: the first, (0, 0); the dropped point (0.5, 0.5) would have given 0.5
    np.testing.assert_array_equal(tpr_at_fpr(distmat, *labels, fpr=[0.5, 0.6, 0.4, 0.0]), [0.0, 0.5, 0.0, 0.0])
    assert tpr_at_fpr(distmat, *labels, fpr=1.0).tolist() == [0.5]  # the first point at FPR 1
    for array in (np.array([0.5, 0.6]), torch.tensor([0.5, 0.6])):  # arrays of FPRs (np.logspace): refused before
        np.testing.assert_array_equal(tpr_at_fpr(distmat, *labels, fpr=array), [0.0, 0.5])


def test_inputs_torch_numpy_dtypes_layouts_and_chunks(path, monkeypatch):
    rng = np.random.default_rng(1)
    distmat = rng.random((23, 61)).astype(np.float32)
    labels = [rng.integers(0, 4, 23), rng.integers(0, 4, 61), rng.integers(0, 2, 23), rng.integers(0, 2, 61)]
    want = fastreid_report(distmat, *labels)
    np.testing.assert_array_equal(fastreid_report(distmat, *labels, cython=True), want)  # their Cython: the same
    tensors = [torch.from_numpy(label) for label in labels]
    np.testing.assert_array_equal(tpr_at_fpr(torch.from_numpy(distmat), *tensors), want)
    np.testing.assert_array_equal(tpr_at_fpr(distmat.astype(np.float64), *labels), want)
    transposed = torch.from_numpy(np.ascontiguousarray(distmat.T)).t()  # a non-contiguous view
    np.testing.assert_array_equal(tpr_at_fpr(transposed, *tensors), want)
    for dtype in (torch.float16, torch.bfloat16):  # exactly their float32 values' report
        low = torch.from_numpy(distmat).to(dtype)
        np.testing.assert_array_equal(tpr_at_fpr(low, *labels), fastreid_report(low.float().numpy(), *labels))
    monkeypatch.setattr(roc_reference, "_CHUNK_ELEMENTS", 100)  # the torch version: one query a chunk
    np.testing.assert_array_equal(tpr_at_fpr(distmat, *labels), want)


def counts_case(rng, num_query, num_gallery, values, ids, dtype=torch.float32):
    """(distmat, q_pids, g_pids, q_camids, g_camids) as roc_counts takes them: distances drawn from `values`
    (an array) or uniform (None), in `dtype`."""
    if values is None:
        distmat = torch.from_numpy(rng.random((num_query, num_gallery)))
    else:
        distmat = torch.from_numpy(np.asarray(values)[rng.integers(0, len(values), (num_query, num_gallery))])
    labels = [rng.integers(0, ids, num_query), rng.integers(0, ids, num_gallery)]
    labels += [rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)]
    q_pids, g_pids, q_camids, g_camids = (torch.from_numpy(label) for label in labels)
    return distmat.to(dtype), q_pids, g_pids, q_camids, g_camids


@pytest.mark.skipif(not dpm_ops.backends()["cpp"][0], reason="the C++ extension is not built")
def test_kernel_counts_equal_the_torch_counts():
    """The C++ kernel's counts (its own bins, then binary searches) against the torch version's (other bins):
    equal, whatever the shape, ties, range, dtype or layout; the bins only decide where each is searched."""
    rng = np.random.default_rng(4)
    extremes = [-3e38, -1.0, -0.0, 0.0, 1e-45, 2e-45, 1.0, 3e38]
    cases = [
        counts_case(rng, 0, 7, None, 3),
        counts_case(rng, 4, 0, None, 3),
        counts_case(rng, 1, 1, None, 1),
        counts_case(rng, 60, 1500, None, 40),  # 2^14 bins
        counts_case(rng, 9, 30, [-1e308, 0.0, 1e308], 3, torch.float64),  # a span beyond float64's range
        counts_case(rng, 9, 30, extremes, 3),
        counts_case(rng, 20, 50, None, 4, torch.float16),
        counts_case(rng, 20, 50, None, 4, torch.bfloat16),
    ]
    for trial in range(60):
        levels = rng.integers(0, 12) if trial % 2 else 0
        values = rng.integers(0, levels, 64) / 4 if levels else None
        dtype = (torch.float32, torch.float64)[trial % 3 == 0]
        cases.append(
            counts_case(rng, int(rng.integers(1, 30)), int(rng.integers(1, 90)), values, int(rng.integers(1, 7)), dtype)
        )
    cases.append((cases[-1][0].t().contiguous().t(), *cases[-1][1:]))  # a non-contiguous view
    for number, case in enumerate(cases):
        got, want = torch.ops.dpm_ops.roc_counts(*case), roc_counts_reference(*case)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), number
        num_values = len(got[0])
        assert len(got[1]) == 2 * num_values + 2 and got[1][-1] == 0, number


@pytest.mark.skipif(not dpm_ops.backends()["cpp"][0], reason="the C++ extension is not built")
def test_kernel_names_a_bad_argument():
    distmat, *labels = counts_case(np.random.default_rng(6), 3, 5, None, 2)
    with pytest.raises(ValueError, match="^roc_counts: g_camids must be a 1-D int64 tensor of length 5"):
        torch.ops.dpm_ops.roc_counts(distmat, *labels[:3], labels[3][:4])
    with pytest.raises(ValueError, match="^roc_counts: q_pids must be a 1-D int64 tensor of length 3"):
        torch.ops.dpm_ops.roc_counts(distmat, labels[0].int(), *labels[1:])
    with pytest.raises(ValueError, match="^roc_counts: distmat must be a 2-D floating tensor"):
        torch.ops.dpm_ops.roc_counts(distmat.long(), *labels)


@pytest.mark.parametrize("where", ["match", "non-match", "left out"])
def test_kernel_flags_a_nan_or_inf_anywhere(where):
    # query 0 (pid 1, camera 0): gallery 0 its match, 1 another identity, 2 its own pid on its own camera
    distmat = torch.tensor([[0.5, 0.7, 0.1], [0.2, 0.3, 0.4]])
    labels = torch.tensor([1, 2]), torch.tensor([1, 3, 1]), torch.tensor([0, 1]), torch.tensor([1, 0, 0])
    distmat[0, {"match": 0, "non-match": 1, "left out": 2}[where]] = float("nan" if where == "match" else "inf")
    for counts in (torch.ops.dpm_ops.roc_counts, roc_counts_reference):
        assert counts(distmat, *labels)[1][-1] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not dpm_ops.backends()["cuda"][0], reason="the CUDA kernels are not built")
def test_cuda_kernel_counts_equal_the_cpu_kernels():
    # the CUDA kernel counts 2^24 pairs a launch: the 300 x 60,000 case takes two
    rng = np.random.default_rng(5)
    cases = [counts_case(rng, 40, 300, None, 9), counts_case(rng, 30, 200, [0.0, 0.25, 0.5], 4, torch.float64)]
    cases.append(counts_case(rng, 300, 60_000, np.arange(4096) / 4096, 500))
    for case in cases:
        got = torch.ops.dpm_ops.roc_counts(*(t.cuda() for t in case))
        want = torch.ops.dpm_ops.roc_counts(*case)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs():
    rng = np.random.default_rng(2)
    distmat = rng.random((40, 300)).astype(np.float32)
    labels = [rng.integers(0, 9, 40), rng.integers(0, 9, 300), rng.integers(0, 3, 40), rng.integers(0, 3, 300)]
    got = tpr_at_fpr(torch.from_numpy(distmat).cuda(), *(torch.from_numpy(label).cuda() for label in labels))
    # against the CPU's numbers (tested against fast-reid's above), so that it runs where the peers are absent
    np.testing.assert_array_equal(got, tpr_at_fpr(distmat, *labels))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(fpr=1.5), r"fpr must be a finite number in \[0, 1\], got 1.5"),
        (dict(fpr=[0.1, float("nan")]), r"fpr must be a finite number in \[0, 1\], got nan"),
        (dict(fpr=True), r"fpr must be a finite number in \[0, 1\], got True"),
        (dict(fpr="1e-4"), r"fpr must be a finite number in \[0, 1\], got '1e-4'"),
        (dict(fpr=[]), r"fpr must be a number or a non-empty sequence of numbers in \[0, 1\], got an empty one"),
        (dict(distmat=np.full((3, 4), np.nan)), r"tpr_at_fpr: distmat .*(NaN|non-finite)"),
        (dict(distmat=np.zeros((0, 4))), r"distmat is empty"),
        (dict(distmat=np.zeros((3, 4), dtype=np.int64)), r"distmat must hold floating-point values"),
        (dict(g_camids=np.zeros(3, dtype=np.int64)), r"g_camids must have length 4 to match distmat, got 3"),
        (dict(q_pids=np.zeros(3)), r"q_pids must hold integer labels"),
        (dict(g_camids=np.zeros(4, dtype=np.int64)), r"no query has a match in the gallery"),  # all on its camera
        (dict(g_pids=np.zeros(4, dtype=np.int64)), r"no query has a non-match in the gallery"),  # one identity
    ],
)
def test_bad_input(path, change, message):
    arguments = dict(
        distmat=np.arange(12, dtype=np.float32).reshape(3, 4),
        q_pids=np.zeros(3, dtype=np.int64),
        g_pids=np.array([0, 1, 0, 2]),
        q_camids=np.zeros(3, dtype=np.int64),
        g_camids=np.ones(4, dtype=np.int64),
    )
    with pytest.raises(ValueError, match=message):
        tpr_at_fpr(**{**arguments, **change})


def feature_set(pids, camids):
    count = len(pids)
    return FeatureSet(torch.zeros(count, 2), None, torch.tensor(pids), torch.tensor(camids), ["x"] * count)


def test_engine_report_per_subset_and_table():
    rng = np.random.default_rng(3)
    query, gallery = feature_set([0, 1, 2, 1, 0, 3], [0] * 6), feature_set(list(rng.integers(0, 4, 40)), [1] * 40)
    distmat = torch.from_numpy(rng.random((6, 40)).astype(np.float32))
    subsets = {"clean": torch.tensor([0, 1, 2]), "occluded": torch.tensor([3, 4, 5])}
    metrics = scoring.rank_metrics(distmat, query, gallery, subsets, max_rank=10, roc=True)
    for name, rows in (("all", torch.arange(6)), *subsets.items()):
        labels = (query.pids[rows].numpy(), gallery.pids.numpy(), query.camids[rows].numpy(), gallery.camids.numpy())
        want = 100.0 * fastreid_report(distmat[rows].numpy(), *labels)
        assert metrics[name]["tpr_at_fpr"] == dict(zip(("1e-04", "1e-03", "1e-02"), want.tolist())), name
    assert "tpr_at_fpr" not in scoring.rank_metrics(distmat, query, gallery, subsets, max_rank=10)["all"]
    lines = scoring.format_metrics_table(metrics).splitlines()
    assert lines[0].split()[-3:] == ["TPR@1e-04", "TPR@1e-03", "TPR@1e-02"]
    assert lines[2].split()[-3:] == [f"{value:.1f}" for value in metrics["all"]["tpr_at_fpr"].values()]


def test_engine_leaves_out_a_subset_report_without_non_matches():
    # the "lone" subset's query (pid 0) finds only pid 0 in the kept gallery: its TPR is undefined
    query, gallery = feature_set([0, 1], [0, 0]), feature_set([0, 0, 1, 1], [1, 1, 0, 0])
    distmat = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    subsets = {"lone": torch.tensor([1])}  # pid 1's gallery items are all on its camera: no match
    with pytest.warns(UserWarning, match="'lone': no query has a match"):
        metrics = scoring.rank_metrics(distmat, query, gallery, subsets, roc=True, max_rank=4)
    assert set(metrics) == {"all"} and "tpr_at_fpr" in metrics["all"]
    with pytest.warns(
        UserWarning, match="query subset 'all': TPR@FPR left out: no query has a non-match in the gallery"
    ):
        metrics = scoring.rank_metrics(
            distmat[:1, :2], feature_set([0], [0]), feature_set([0, 0], [1, 1]), roc=True, max_rank=2
        )
    assert "tpr_at_fpr" not in metrics["all"] and metrics["all"]["mAP"] == 100.0
