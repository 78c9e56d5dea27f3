"""GNN re-ranking (dpm_ops.evaluation.gnn_rerank): the sparse pipeline against the dense reference
computation (gnn_rerank_dense, the reference code's maths on N x N matrices), the dense computation
against a hand-worked example, the C++ / CUDA stage kernels against their torch stages, the engine and
command-line entry points, and bad input."""

import math

import numpy as np
import pytest
import torch

from conftest import backend_params, device_for
from dpm_ops import _backend
from dpm_ops._backend import forced_backend
from dpm_ops.evaluation import evaluate_rank, gnn_rerank
from dpm_ops.evaluation._inputs import check_rerank
from dpm_ops.ops.gnn_rerank import GNN_PROPAGATE, GNN_SIMILARITY_
from dpm_ops.ops.gnn_rerank_reference import gnn_rerank_dense

TOLERANCE = 2e-6  # float32 summation order: the GEMMs of the dense computation against the sparse sums


def clustered(num_query, num_gallery, dim, identities, seed=0, spread=0.6):
    """Re-ID-like features: noisy copies of identity centres (no exact ties)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(identities, dim, generator=gen)
    labels = torch.randint(0, identities, (num_query + num_gallery,), generator=gen)
    x = centres[labels] + spread * torch.randn(num_query + num_gallery, dim, generator=gen)
    return x[:num_query], x[num_query:], labels


def dense_distances(qf, gf, k1, k2, lambda_value):
    x = torch.cat([qf, gf]).float()
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return -gnn_rerank_dense(x, len(qf), min(k1, len(x)), k2, lambda_value)


def assert_same_ranking(result, expected, tolerance=TOLERANCE):
    torch.testing.assert_close(result, expected, rtol=0, atol=tolerance)
    # ranks differ only between entries closer than the tolerance
    order = torch.argsort(expected, dim=1, stable=True)
    sorted_result = torch.gather(result, 1, order)
    assert (sorted_result.diff(dim=1) >= -2 * tolerance).all()


@pytest.fixture(params=["cpp", "reference"])
def stages(request, monkeypatch):
    """The C++ stage kernels, or their torch versions (what runs without the extension)."""
    if request.param == "reference":
        monkeypatch.setenv("DPM_OPS_BACKEND", "reference")
    return request.param


@pytest.mark.parametrize(
    "num_query, num_gallery, dim, k1, k2, lambda_value",
    [
        (30, 120, 16, 26, 7, 0.3),  # the reference's Market-1501 setting
        (50, 300, 32, 20, 6, 0.0),  # propagated similarity only
        (20, 80, 8, 11, 11, 1.0),  # the plain cosine (lambda 1), k2 = k1
        (10, 40, 8, 5, 1, 0.5),  # k2 = 1: no propagation, shared-neighbour counts
        (7, 9, 4, 26, 7, 0.3),  # k1 past the pooled set: capped at N
        (12, 30, 6, 4, 9, 0.3),  # k2 past k1: k1 sources, as the reference's slice
        (1, 5, 3, 2, 2, 0.3),  # one query
    ],
)
def test_matches_dense_reference(stages, num_query, num_gallery, dim, k1, k2, lambda_value):
    qf, gf, _ = clustered(num_query, num_gallery, dim, max(2, (num_query + num_gallery) // 8))
    result = gnn_rerank(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
    assert result.shape == (num_query, num_gallery) and result.dtype == torch.float32
    assert_same_ranking(result, dense_distances(qf, gf, k1, k2, lambda_value))


def test_dense_reference_on_a_worked_example():
    # Three unit vectors on a circle, k1 = 2, k2 = 2, one query (item 0): worked by hand.
    angles = torch.tensor([0.0, 0.5, 1.5])
    x = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    s = x @ x.T
    # nearest two: 0 -> (0, 1), 1 -> (1, 0), 2 -> (2, 1)
    a = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 1, 1]])
    w = torch.zeros(3, 3)
    for i, j in [(0, 0), (0, 1), (1, 1), (1, 0), (2, 2), (2, 1)]:
        w[i, j] = s[i, j] ** 2
    for _ in range(2):
        a = w @ (a + a.T)
        a = a / a.norm(dim=1, keepdim=True)
    expected = 0.7 * (a[:1] @ a[1:].T) + 0.3 * s[:1, 1:]
    torch.testing.assert_close(gnn_rerank_dense(x, 1, 2, 2, 0.3), expected, rtol=0, atol=1e-6)


def test_stage_kernels_equal_their_torch_stages_bitwise():
    qf, gf, _ = clustered(60, 340, 16, 30, seed=3)
    x = torch.nn.functional.normalize(torch.cat([qf, gf]), dim=1)
    similarity, neighbours = torch.sort(x @ x.T, dim=1, descending=True, stable=True)
    sources, weights = neighbours[:, :6].contiguous(), (similarity[:, :6] ** 2).contiguous()
    n, k1 = len(x), 20
    first = (torch.arange(0, n * k1 + 1, k1), neighbours[:, :k1].sort(dim=1).values.flatten(), torch.ones(n * k1))
    results = {}
    for backend in ("cpp", "reference"):
        csr = first
        for _ in range(2):
            csr = GNN_PROPAGATE.run(backend, *csr, sources, weights)
        out = (x[:60] @ x[60:].T).contiguous()
        GNN_SIMILARITY_.run(backend, out, *csr, 0.3)
        results[backend] = (*csr, out)
    for kernel, torch_stage in zip(results["cpp"], results["reference"]):
        assert torch.equal(kernel, torch_stage)
    row_sizes = results["cpp"][0].diff().float()
    assert row_sizes.min() > k1  # propagation spreads every row beyond its k1 neighbours


def test_retrieval_improves_on_clustered_features():
    # The point of re-ranking: on re-ID-like features with camera-like perturbations it ranks at least as
    # well as the plain cosine (here strictly better in mAP).
    qf, gf, labels = clustered(60, 400, 24, 40, seed=5, spread=0.9)
    pids = labels.numpy()
    q_cams, g_cams = np.zeros(60, dtype=np.int64), np.ones(400, dtype=np.int64)
    plain = gnn_rerank(qf, gf, lambda_value=1.0)  # lambda 1: the cosine alone
    reranked = gnn_rerank(qf, gf)
    base = evaluate_rank(plain.numpy(), pids[:60], pids[60:], q_cams, g_cams).mAP
    gnn = evaluate_rank(reranked.numpy(), pids[:60], pids[60:], q_cams, g_cams).mAP
    assert gnn > base


def test_duplicates_and_dtypes():
    qf, gf, _ = clustered(10, 50, 8, 6, seed=7)
    gf[5:10] = gf[0]  # exact duplicates: equal similarities, ordered by index
    qf[1] = gf[3]
    expected = gnn_rerank(qf, gf)
    assert torch.isfinite(expected).all()
    assert_same_ranking(expected, dense_distances(qf, gf, 26, 7, 0.3), tolerance=1e-5)
    torch.testing.assert_close(gnn_rerank(qf.double(), gf.double()), expected, rtol=0, atol=1e-6)
    transposed = gnn_rerank(qf.T.contiguous().T, gf.T.contiguous().T)  # non-contiguous rows
    assert torch.equal(transposed, expected)
    as_numpy = gnn_rerank(qf.numpy(), gf.numpy())
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, expected.numpy())
    scaled = gnn_rerank(qf * 7.5, gf * 0.25)  # the features are L2-normalised first
    torch.testing.assert_close(scaled, expected, rtol=0, atol=1e-6)


def test_an_items_copies_tie_with_it_in_index_order():
    """Exact copies in groups wider than k1: an item's copies (cosine distance about -1e-7 from rounding, the item's
    own set to 0) ranked before the item itself, so identical queries got different rows (0.077 from the dense
    computation here); now they tie in index order, as in the dense computation."""
    a, b, c = [1.0, 2.0, 3.0], [3.0, -1.0, 0.5], [0.2, 1.0, -2.0]
    x = torch.tensor([a, a, a, b, c, a, b, c])
    expected = dense_distances(x[:2], x[2:], 3, 2, 0.3)
    for strategy in ("direct", "certified"):
        result = gnn_rerank(x[:2], x[2:], 3, 2, 0.3, strategy=strategy)
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
        assert torch.equal(result[0], result[1])


def test_copies_of_other_items_tie_in_index_order():
    """Features drawn from a few vectors (every item has copies), k1 cutting through groups of copies: each
    item's copies at one similarity from every row, in index order, as in the dense computation wherever its
    GEMM gives copies one similarity (in the others, it is the dense computation that ranks by rounding).
    7 of these 150 cases differed before (the copies of another item came in the search's rounding order)."""
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(150):
        num_query, num_gallery, dim = int(rng.integers(1, 6)), int(rng.integers(2, 30)), int(rng.integers(2, 8))
        base = rng.normal(size=(int(rng.integers(2, 6)), dim))
        x = torch.from_numpy(base[rng.integers(0, len(base), num_query + num_gallery)].astype(np.float32))
        k1, k2 = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        unit = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
        similarity, same = unit @ unit.T, (x[:, None] == x[None]).all(dim=2)
        if any(len(similarity[i, same[j]].unique()) > 1 for i in range(len(x)) for j in range(len(x))):
            continue
        compared += 1
        for strategy in ("direct", "certified"):
            result = gnn_rerank(x[:num_query], x[num_query:], k1, k2, 0.3, strategy=strategy)
            expected = dense_distances(x[:num_query], x[num_query:], k1, k2, 0.3)
            torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
    assert compared >= 120


def test_certified_neighbour_search_gives_the_same_result():
    qf, gf, _ = clustered(40, 260, 32, 25, seed=11)
    direct = gnn_rerank(qf, gf, strategy="direct")
    torch.testing.assert_close(gnn_rerank(qf, gf, strategy="certified"), direct, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
def test_gpu_backends_match_cpu(backend):
    # "cuda": the neighbour search and the stage kernels on CUDA tensors (under the CUDA emulator,
    # DPM_OPS_EMULATED_CUDA=1, its CUDA code on CPU tensors); "triton": its neighbour search, the stages in torch.
    qf, gf, _ = clustered(20, 90, 12, 10, seed=9)
    expected = gnn_rerank(qf, gf)
    device = device_for(backend)
    with forced_backend(backend):
        for strategy in ("direct", "certified"):
            result = gnn_rerank(qf.to(device), gf.to(device), strategy=strategy)
            assert result.device.type == device.type
            torch.testing.assert_close(result.cpu(), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q, g: gnn_rerank(q, g, k1=0), "k1 must be an integer >= 1"),
        (lambda q, g: gnn_rerank(q, g, k2=2.5), "k2 must be an integer"),
        (lambda q, g: gnn_rerank(q, g, lambda_value=1.5), r"lambda_value must be a number in \[0, 1\]"),
        (lambda q, g: gnn_rerank(q, g, strategy="fast"), "strategy must be one of"),
        (lambda q, g: gnn_rerank(q, g[:, :3]), "same feature dimension"),
        (lambda q, g: gnn_rerank(q, torch.zeros(0, 4)), "gf is empty"),
        (lambda q, g: gnn_rerank(q[0], g), "qf must be 2-D"),
        (lambda q, g: gnn_rerank(q.long(), g), "qf must hold floating-point values"),
        (lambda q, g: gnn_rerank(q, g.index_fill(0, torch.tensor([2]), math.nan)), "gf"),
        (lambda q, g: gnn_rerank(q, g.index_fill(0, torch.tensor([2]), 0.0)), "gf row 2 is all zeros"),
        (lambda q, g: gnn_rerank(q.index_fill(0, torch.tensor([1]), 0.0), g), "qf row 1 is all zeros"),
        (lambda q, g: gnn_rerank(q * 1e-25, g), "qf row 0 is too small to L2-normalise in float32"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(call, message):
    qf, gf, _ = clustered(4, 12, 4, 3)
    with pytest.raises(ValueError, match=message):
        call(qf, gf)


def test_engine_rerank_argument():
    assert check_rerank(False) == (None, 20, 6, 0.3)
    assert check_rerank(True) == ("kreciprocal", 20, 6, 0.3)
    assert check_rerank("gnn") == ("gnn", 26, 7, 0.3)
    assert check_rerank("gnn", 10, None, 0.0) == ("gnn", 10, 7, 0.0)
    for bad in ("GNN", 1, None, "jaccard"):
        with pytest.raises(ValueError, match="rerank must be a bool or one of"):
            check_rerank(bad)


def test_stage_ops_check_their_arguments():
    backend = _backend.resolve(None, torch.device("cpu"))
    row_ptr, cols, values = torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(2)
    sources, weights = torch.tensor([[0], [1]]), torch.ones(2, 1)
    with pytest.raises(ValueError, match="gnn_rerank: sources must hold indices in"):
        GNN_PROPAGATE.run(backend, row_ptr, cols, values, sources + 1, weights)
    with pytest.raises(ValueError, match="gnn_rerank: weights must be a floating tensor shaped like sources"):
        GNN_PROPAGATE.run(backend, row_ptr, cols, values, sources, weights[:1])
    with pytest.raises(ValueError, match="gnn_rerank: cols must hold indices in"):
        GNN_PROPAGATE.run(backend, row_ptr, cols + 1, values, sources, weights)
    with pytest.raises(ValueError, match="gnn_rerank: out must be a contiguous 2-D float32 tensor"):
        GNN_SIMILARITY_.run(backend, torch.zeros(1, 1, dtype=torch.float64), row_ptr, cols, values, 0.3)


@pytest.mark.parametrize(
    "row_ptr, cols, num_query",
    [
        ([0, 2, 2, 3], [0, 2, 1], 1),  # an empty row
        ([0, 1], [0], 1),  # one item, no gallery
        ([0, 0, 0], [], 1),  # no entries at all
    ],
)
def test_stage_kernels_on_edge_shapes(row_ptr, cols, num_query):
    row_ptr, cols = torch.tensor(row_ptr), torch.tensor(cols, dtype=torch.long)
    n = len(row_ptr) - 1
    values = torch.linspace(0.5, 1.5, len(cols))
    sources = torch.arange(n).repeat(2, 1).T.contiguous()  # every item its own two sources
    weights = torch.full((n, 2), 0.5)
    results = {}
    for backend in ("cpp", "reference"):
        csr = GNN_PROPAGATE.run(backend, row_ptr, cols, values, sources, weights)
        out = torch.full((num_query, n - num_query), 0.25)
        GNN_SIMILARITY_.run(backend, out, *csr, 0.3)
        results[backend] = (*csr, out)
    for kernel, torch_stage in zip(results["cpp"], results["reference"]):
        assert torch.equal(kernel, torch_stage)
    assert torch.isfinite(results["cpp"][2]).all() and torch.isfinite(results["cpp"][3]).all()
