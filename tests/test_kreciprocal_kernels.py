"""The C++ k-reciprocal stages (csrc/kreciprocal/) and the evaluator kernel (csrc/rank/) against the
torch stages they replace (dpm_ops/ops/kreciprocal_reference.py,
rank_reference.py), end to end through both paths."""

import numpy as np
import pytest
import torch

import dpm_ops
from benchmarks.reference import rerank_numpy
from conftest import device_for, needs_gpu, op_for
from dpm_ops.evaluation import rank, re_ranking, rerank, rerank_features
from dpm_ops.ops import kreciprocal_reference

pytestmark = pytest.mark.skipif(not dpm_ops.backends()["cpp"][0], reason="needs the C++ extension")


def neighbour_lists(n, width, seed):
    """Rows ordered by a random symmetric distance, self first: realistic reciprocity."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    dist = torch.cdist(points, points)
    dist.fill_diagonal_(-1)
    return torch.sort(dist, dim=1, stable=True).indices[:, :width].contiguous()


def record_calls(monkeypatch, module, name):
    """Wraps `module.name`: each call still runs and is appended to the returned list."""
    original, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    return calls


def csr_rows(row_ptr):
    return torch.repeat_interleave(torch.arange(len(row_ptr) - 1), row_ptr.diff())


@pytest.mark.parametrize(
    "n, k1, kh, width", [(60, 20, 10, 21), (200, 7, 4, 8), (5, 20, 10, 5), (40, 1, 0, 6), (90, 9, 4, 12)]
)
def test_expand_matches_torch(n, k1, kh, width):
    neighbours = neighbour_lists(n, width, n + k1)
    rows, cols = kreciprocal_reference.expanded_neighbourhoods(neighbours, k1, kh)
    row_ptr, kernel_cols = torch.ops.dpm_ops.kreciprocal_expand(neighbours, k1, kh)
    assert torch.equal(csr_rows(row_ptr), rows) and torch.equal(kernel_cols, cols)


@pytest.mark.parametrize("k2", [1, 2, 6])
def test_query_expansion_matches_torch(k2):
    n = 150
    neighbours = neighbour_lists(n, 21, k2)
    rows, cols = kreciprocal_reference.expanded_neighbourhoods(neighbours, 20, 10)
    values = torch.rand(len(rows), generator=torch.Generator().manual_seed(k2))
    expected = kreciprocal_reference.query_expansion(rows, cols, values, neighbours[:, :k2], n)
    row_ptr, got_cols, got_values = torch.ops.dpm_ops.kreciprocal_query_expansion(
        torch.ops.dpm_ops.kreciprocal_expand(neighbours, 20, 10)[0], cols, values, neighbours[:, :k2].contiguous()
    )
    assert torch.equal(csr_rows(row_ptr), expected[0]) and torch.equal(got_cols, expected[1])
    torch.testing.assert_close(got_values, expected[2], rtol=0, atol=0)  # same sums, same order


@pytest.mark.parametrize("lambda_value", [0.0, 0.3, 1.0])
def test_jaccard_blend_matches_torch(lambda_value):
    q, g = 30, 120
    neighbours = neighbour_lists(q + g, 21, 3)
    row_ptr, cols = torch.ops.dpm_ops.kreciprocal_expand(neighbours, 20, 10)
    rows = csr_rows(row_ptr)
    values = torch.rand(len(rows), generator=torch.Generator().manual_seed(4))
    values = values / torch.zeros(q + g).index_add_(0, rows, values)[rows]  # rows sum to 1, as V
    out = torch.rand(q, g, generator=torch.Generator().manual_seed(5))
    expected = kreciprocal_reference.jaccard_blend_(out.clone(), rows, cols, values, lambda_value)
    got = out.clone()
    torch.ops.dpm_ops.kreciprocal_jaccard_blend_(got, row_ptr, cols, values, lambda_value)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-7)
    # with row_scale (rerank_features' kernel path): out divided by it first, by the C++ op and its reference
    scale = 1 + torch.rand(q, generator=torch.Generator().manual_seed(6))
    expected = kreciprocal_reference.jaccard_blend_(out / scale[:, None], rows, cols, values, lambda_value)
    for blend in (
        torch.ops.dpm_ops.kreciprocal_jaccard_blend_,
        kreciprocal_reference.kreciprocal_jaccard_blend_reference_,
    ):
        got = out.clone()
        blend(got, row_ptr, cols, values, lambda_value, scale)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-7)


@pytest.mark.parametrize(
    "pair_sqdist",
    [
        lambda *args: torch.ops.dpm_ops.kreciprocal_pair_sqdist(*args),
        kreciprocal_reference.kreciprocal_pair_sqdist_reference,
    ],
    ids=["cpp", "torch"],
)
def test_pair_sqdist_lookups_and_features(pair_sqdist):
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(6))
    values, indices, _, _ = torch.ops.dpm_ops.self_knn(x, 5, "sqeuclidean", False, 0)
    row_ptr = torch.arange(0, 51 * 50, 50)  # every pair: most are not in the candidate lists
    cols = torch.arange(50).repeat(50)
    got = pair_sqdist(x, values, indices, row_ptr, cols).view(50, 50)
    expected = torch.cdist(x.double(), x.double()).square().float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert bool((got.diagonal() == 0).all())
    assert torch.equal(got.gather(1, indices), values)  # candidates are read, not recomputed


def test_ops_pass_opcheck_with_data_dependent_sizes():
    """Fake registrations (dpm_ops/ops/kreciprocal.py, rank.py): ragged outputs as unbacked sizes."""
    q, g = 12, 40
    neighbours = neighbour_lists(q + g, 11, 7)
    row_ptr, cols = torch.ops.dpm_ops.kreciprocal_expand(neighbours, 10, 5)
    values = torch.rand(len(cols), generator=torch.Generator().manual_seed(8))
    x = torch.randn(q + g, 6, generator=torch.Generator().manual_seed(9))
    knn_values, knn_indices, _, _ = torch.ops.dpm_ops.self_knn(x, 5, "sqeuclidean", False, 0)
    out = torch.rand(q, g, generator=torch.Generator().manual_seed(10))
    dist = torch.rand(q, g, generator=torch.Generator().manual_seed(11))
    pids = torch.randint(0, 6, (q + g,), generator=torch.Generator().manual_seed(12))
    cams = torch.randint(0, 3, (q + g,), generator=torch.Generator().manual_seed(13))
    cases = [
        (torch.ops.dpm_ops.kreciprocal_expand, (neighbours, 10, 5)),
        (torch.ops.dpm_ops.kreciprocal_pair_sqdist, (x, knn_values, knn_indices, row_ptr, cols)),
        (torch.ops.dpm_ops.kreciprocal_query_expansion, (row_ptr, cols, values, neighbours[:, :3].contiguous())),
        (torch.ops.dpm_ops.kreciprocal_jaccard_blend_, (out, row_ptr, cols, values, 0.3)),
        (torch.ops.dpm_ops.match_ranks, (dist, pids[:q], pids[q:], cams[:q], cams[q:])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("k1, k2, lambda_value", [(20, 6, 0.3), (7, 1, 0.0), (9, 3, 1.0), (4, 8, 0.3)])
def test_kernel_and_torch_paths_agree(monkeypatch, k1, k2, lambda_value):
    rng = np.random.default_rng(k1)
    query, gallery = rng.standard_normal((25, 16)).astype(np.float32), rng.standard_normal((110, 16)).astype(np.float32)
    q_g, q_q, g_g = (
        rerank_numpy.euclidean_distances(a, b) for a, b in ((query, gallery), (query, query), (gallery, gallery))
    )
    calls = record_calls(monkeypatch, rerank, "_rerank_kernels")
    kernels = rerank_features(query, gallery, k1, k2, lambda_value), re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)
    assert len(calls) == 2  # both pipelines ran the kernel stages ...
    monkeypatch.setenv("DPM_OPS_BACKEND", "reference")  # default resolution -> the torch stages
    torch_path = rerank_features(query, gallery, k1, k2, lambda_value), re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)
    assert len(calls) == 2  # ... and here none: two different paths are compared, not one with itself
    for got, expected in zip(kernels, torch_path):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(
            np.argsort(got, axis=1, kind="stable"), np.argsort(expected, axis=1, kind="stable")
        )


@pytest.mark.parametrize("levels", [None, 4])
def test_match_ranks_kernel_and_torch_paths_agree(monkeypatch, levels):
    # Quantised distances make ties everywhere, decided by gallery index on both paths.
    from dpm_ops.evaluation import evaluate_rank

    rng = np.random.default_rng(11)
    dist = rng.random((70, 400)).astype(np.float32)
    if levels:
        dist = np.round(dist * levels) / levels
    labels = (rng.integers(0, 10, 70), rng.integers(0, 10, 400), rng.integers(0, 3, 70), rng.integers(0, 3, 400))
    offsets, ranks = torch.ops.dpm_ops.match_ranks(
        torch.from_numpy(dist), *(torch.from_numpy(a) for a in (labels[0], labels[1], labels[2], labels[3]))
    )
    assert len(offsets) == 71 and bool((ranks[offsets[1:] - 1] <= 400).all())
    calls = record_calls(monkeypatch, rank, "kernel_match_ranks")
    kernel = evaluate_rank(dist, *labels, max_rank=20, ap="trapezoid")
    assert len(calls) == 1
    monkeypatch.setenv("DPM_OPS_BACKEND", "reference")
    torch_path = evaluate_rank(dist, *labels, max_rank=20, ap="trapezoid")
    assert len(calls) == 1  # the torch path did not reach the kernel
    np.testing.assert_array_equal(kernel.cmc, torch_path.cmc)
    np.testing.assert_array_equal(kernel.all_AP, torch_path.all_AP)
    assert (kernel.mAP, kernel.mINP, kernel.num_valid) == (torch_path.mAP, torch_path.mINP, torch_path.num_valid)


# CUDA kernels (csrc/kreciprocal/kreciprocal_cuda.*) against the CPU kernels on the same inputs: the
# per-row maths is shared (kreciprocal_math.h) and rounded op by op, so the results are equal bit for bit.
def needs_cuda(test):
    available, why = dpm_ops.backends()["cuda"]
    return pytest.mark.cuda(pytest.mark.skipif(not available, reason=why or "cuda")(test))


def on_cuda(*tensors):
    return [t.to(device_for("cuda")) if isinstance(t, torch.Tensor) else t for t in tensors]


def assert_same(got, expected):
    for g, e in zip(got, expected):
        assert g.device == device_for("cuda") and torch.equal(g.cpu(), e)


@pytest.mark.parametrize(
    "n, k1, kh, width",
    [(60, 20, 10, 21), (200, 7, 4, 8), (5, 20, 10, 5), (40, 1, 0, 6), (0, 20, 10, 21), (40000, 20, 10, 21)],
)
@needs_cuda
def test_expand_cuda_matches_cpu(n, k1, kh, width):
    if n <= 5000:
        neighbours = neighbour_lists(n, width, n + k1)
    else:  # more rows than the kernel's scratch threads (grid-stride loop): items on a shuffled ring
        offsets = torch.tensor([0] + [s * (t + 1) for t in range(width) for s in (1, -1)][: width - 1])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        neighbours = torch.empty(n, width, dtype=torch.long)
        neighbours[perm] = perm[(torch.arange(n)[:, None] + offsets) % n]
    expected = torch.ops.dpm_ops.kreciprocal_expand(neighbours, k1, kh)
    assert_same(op_for("kreciprocal_expand", "cuda")(*on_cuda(neighbours), k1, kh), expected)


@pytest.mark.parametrize("k2", [1, 2, 6])
@needs_cuda
def test_query_expansion_cuda_matches_cpu(k2):
    n = 150
    neighbours = neighbour_lists(n, 21, k2)
    row_ptr, cols = torch.ops.dpm_ops.kreciprocal_expand(neighbours, 20, 10)
    values = torch.rand(len(cols), generator=torch.Generator().manual_seed(k2))
    sources = neighbours[:, :k2].contiguous()
    expected = torch.ops.dpm_ops.kreciprocal_query_expansion(row_ptr, cols, values, sources)
    assert_same(op_for("kreciprocal_query_expansion", "cuda")(*on_cuda(row_ptr, cols, values, sources)), expected)


@pytest.mark.parametrize("lambda_value, scaled", [(0.0, False), (0.3, True), (1.0, False), (0.3, False)])
@needs_cuda
def test_jaccard_blend_cuda_matches_cpu(lambda_value, scaled):
    q, g = 700, 900  # more queries than the kernel's blocks (grid-stride loop)
    neighbours = neighbour_lists(q + g, 21, 3)
    row_ptr, cols = torch.ops.dpm_ops.kreciprocal_expand(neighbours, 20, 10)
    rows = csr_rows(row_ptr)
    values = torch.rand(len(rows), generator=torch.Generator().manual_seed(4))
    values = values / torch.zeros(q + g).index_add_(0, rows, values)[rows]
    out = torch.rand(q, g, generator=torch.Generator().manual_seed(5))
    scale = torch.rand(q + g, generator=torch.Generator().manual_seed(6)) + 0.5 if scaled else None
    expected = out.clone()
    torch.ops.dpm_ops.kreciprocal_jaccard_blend_(expected, row_ptr, cols, values, lambda_value, scale)
    got = on_cuda(out.clone())[0]
    op_for("kreciprocal_jaccard_blend_", "cuda")(got, *on_cuda(row_ptr, cols, values), lambda_value, *on_cuda(scale))
    assert_same([got], [expected])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@needs_cuda
def test_pair_sqdist_cuda_matches_cpu(dtype):
    x = torch.randn(50, 37, generator=torch.Generator().manual_seed(6), dtype=dtype)
    values, indices, _, _ = torch.ops.dpm_ops.self_knn(x, 5, "sqeuclidean", False, 0)
    values = values.float()
    sizes = torch.randint(0, 60, (50,), generator=torch.Generator().manual_seed(8))
    sizes[3] = 0  # an empty row: the kernel finds each entry's row by binary search
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    cols = torch.randint(0, 50, (int(row_ptr[-1]),), generator=torch.Generator().manual_seed(7))
    expected = torch.ops.dpm_ops.kreciprocal_pair_sqdist(x, values, indices, row_ptr, cols)
    assert_same([op_for("kreciprocal_pair_sqdist", "cuda")(*on_cuda(x, values, indices, row_ptr, cols))], [expected])


@pytest.mark.parametrize("k1, k2, lambda_value", [(20, 6, 0.3), (7, 1, 0.0), (4, 8, 1.0)])
@needs_cuda
@needs_gpu  # the pipeline on CUDA tensors
def test_rerank_on_cuda_uses_kernels_and_matches_cpu(monkeypatch, k1, k2, lambda_value):
    rng = np.random.default_rng(k1)
    query = torch.from_numpy(rng.standard_normal((40, 16)).astype(np.float32))
    gallery = torch.from_numpy(rng.standard_normal((150, 16)).astype(np.float32))
    q_g, q_q, g_g = torch.cdist(query, gallery), torch.cdist(query, query), torch.cdist(gallery, gallery)
    expected = re_ranking(q_g, q_q, g_g, k1, k2, lambda_value), rerank_features(query, gallery, k1, k2, lambda_value)
    calls = []
    for name in ("kreciprocal_expand", "kreciprocal_jaccard_blend_"):
        op = getattr(torch.ops.dpm_ops, name)
        monkeypatch.setattr(
            torch.ops.dpm_ops, name, lambda *a, _op=op, _name=name: calls.append(_name) or _op(*a), raising=False
        )
    got = (
        re_ranking(q_g.cuda(), q_q.cuda(), g_g.cuda(), k1, k2, lambda_value),
        rerank_features(query.cuda(), gallery.cuda(), k1, k2, lambda_value),
    )
    assert calls.count("kreciprocal_expand") == 2 and calls.count("kreciprocal_jaccard_blend_") == 2
    # Same pipeline and kernels; the torch steps between them (exp, index_add_, the GPU's GEMM for
    # features) round differently on the GPU.
    assert got[0].device.type == "cuda" and got[1].device.type == "cuda"
    torch.testing.assert_close(got[0].cpu(), expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1].cpu(), expected[1], rtol=0, atol=1e-5)
