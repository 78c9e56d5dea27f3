"""k-reciprocal re-ranking against the dense numpy port of the reference (benchmarks/reference)."""

import functools

import numpy as np
import pytest
import torch

from benchmarks.reference import rerank_numpy
from benchmarks.reference.synthetic_features import MARKET1501, make_reid_features, scaled
from dpm_ops.evaluation import _inputs, _select, jaccard_distance, re_ranking, rerank, rerank_features
from dpm_ops.ops import kreciprocal_reference
from conftest import backend_params, device_for
from dpm_ops import _backend
from dpm_ops._backend import forced_backend


@pytest.fixture(params=["default tiles", "tiny tiles"])
def tiles(request, monkeypatch):
    """Run each case once as shipped and once with tiles and chunks so small that every
    streaming path (threshold offers, transposed tiles, chunk seams) is exercised: on the torch path,
    since the C++ kernels, where built, replace those tiles."""
    if request.param == "tiny tiles":
        monkeypatch.setenv("DPM_OPS_BACKEND", "reference")
        monkeypatch.setattr(rerank, "_FEATURE_TILE", 40)
        monkeypatch.setattr(rerank, "_ROW_BLOCK_ELEMENTS", 4000)
        monkeypatch.setattr(rerank, "_PAIR_CHUNK", 256)
        monkeypatch.setattr(kreciprocal_reference, "_FEATURE_PAIR_CHUNK", 64)
        monkeypatch.setattr(_select, "STREAM_TILE", 36)
        monkeypatch.setattr(kreciprocal_reference, "_ELEMENT_BUDGET", 20000)
        monkeypatch.setattr(kreciprocal_reference, "_MEMBERSHIP_BUDGET", 8000)
    return request.param


def random_features(num_query, num_gallery, dim, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((num_query, dim)).astype(np.float32),
        rng.standard_normal((num_gallery, dim)).astype(np.float32),
    )


@functools.lru_cache(maxsize=None)
def reference_from_distances(num_query, num_gallery, dim, seed, k1, k2, lambda_value):
    q_g, q_q, g_g = exact_distances(*random_features(num_query, num_gallery, dim, seed))
    return rerank_numpy.re_ranking(
        q_g.astype(np.float32), q_q.astype(np.float32), g_g.astype(np.float32), k1, k2, lambda_value
    )


@functools.lru_cache(maxsize=None)
def reference_from_features(num_query, num_gallery, dim, seed, k1, k2, lambda_value):
    return rerank_numpy.re_ranking_from_features(
        *random_features(num_query, num_gallery, dim, seed), k1, k2, lambda_value
    )


def exact_distances(query, gallery):
    """Euclidean distances in float64 from differences: exactly 0 between equal features."""

    def cdist(a, b):
        return np.sqrt(((a.astype(np.float64)[:, None] - b.astype(np.float64)[None]) ** 2).sum(-1))

    return cdist(query, gallery), cdist(query, query), cdist(gallery, gallery)


def assert_same_ranking(result, expected, atol):
    assert result.shape == expected.shape and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=0, atol=atol)
    np.testing.assert_array_equal(
        np.argsort(result, axis=1, kind="stable"), np.argsort(expected, axis=1, kind="stable")
    )


@pytest.mark.parametrize(
    "num_query, num_gallery, dim, seed", [(12, 60, 8, 0), (25, 110, 5, 1), (3, 5, 4, 2), (30, 4, 6, 3)]
)
@pytest.mark.parametrize(
    "k1, k2, lambda_value", [(20, 6, 0.3), (7, 1, 0.0), (5, 3, 1.0), (9, 6, 0.3), (2, 2, 0.3), (1, 1, 0.3)]
)
def test_re_ranking_matches_reference(tiles, num_query, num_gallery, dim, seed, k1, k2, lambda_value):
    # k1 = 5, 7, 9, 1 round k1 / 2 half to even (2, 4, 4, 0); (3, 5) and (30, 4) have G < k1 + 1.
    q_g, q_q, g_g = (d.astype(np.float32) for d in exact_distances(*random_features(num_query, num_gallery, dim, seed)))
    expected = reference_from_distances(num_query, num_gallery, dim, seed, k1, k2, lambda_value)
    assert_same_ranking(re_ranking(q_g, q_q, g_g, k1, k2, lambda_value), expected, atol=1e-6)


@pytest.mark.parametrize(
    "num_query, num_gallery, dim, seed", [(12, 60, 8, 0), (25, 110, 5, 1), (3, 5, 4, 2), (20, 90, 16, 4)]
)
@pytest.mark.parametrize("k1, k2, lambda_value", [(20, 6, 0.3), (7, 1, 0.0), (9, 3, 1.0), (4, 8, 0.3)])
def test_rerank_features_matches_reference(tiles, num_query, num_gallery, dim, seed, k1, k2, lambda_value):
    query, gallery = random_features(num_query, num_gallery, dim, seed)
    expected = reference_from_features(num_query, num_gallery, dim, seed, k1, k2, lambda_value)
    assert_same_ranking(rerank_features(query, gallery, k1, k2, lambda_value), expected, atol=1e-5)


@functools.lru_cache(maxsize=None)
def reid_like_case():
    data = make_reid_features(**scaled(MARKET1501, 0.015), dim=64, seed=3)
    return data, rerank_numpy.re_ranking_from_features(data.query, data.gallery)


def test_rerank_features_on_reid_like_features(tiles):
    data, expected = reid_like_case()
    assert_same_ranking(rerank_features(data.query, data.gallery), expected, atol=1e-5)


def test_duplicated_features_tie_by_index(tiles):
    query, gallery = random_features(10, 40, 6, 5)
    gallery[7] = gallery[3]  # gallery duplicates
    gallery[20:23] = query[2]  # a query duplicated three times in the gallery
    q_g, q_q, g_g = exact_distances(query, gallery)
    assert (q_g == 0).sum() == 3 and (g_g == 0).sum() == 40 + 2 + 6
    for k1, k2 in ((20, 6), (3, 2), (1, 1)):
        expected = rerank_numpy.re_ranking(q_g, q_q, g_g, k1, k2, 0.3)
        assert_same_ranking(re_ranking(q_g, q_q, g_g, k1, k2, 0.3), expected, atol=1e-6)
    # From features, the GEMM gives equal features a distance of a few ulps rather than 0: exact copies are set to
    # 0 from each other too (_copies.py), so they tie in index order as cdist's zeros do, also in neighbourhoods
    # too narrow to hold all copies (a copy ranked after the item itself changed them by up to 0.47).
    gallery[30:36] = query[5]  # a group of 7 copies: wider than k1 + 1 below
    q_g, q_q, g_g = exact_distances(query, gallery)
    for k1, k2 in ((20, 6), (3, 2), (1, 1), (1, 2), (2, 1)):
        expected = rerank_numpy.re_ranking(*(d.astype(np.float32) for d in (q_g, q_q, g_g)), k1, k2, 0.3)
        strategies = ("direct", "certified") if _backend.resolve(None, torch.device("cpu")) == "cpp" else ("direct",)
        for strategy in strategies:
            result = rerank_features(query, gallery, k1, k2, 0.3, strategy=strategy)
            np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_nonzero_self_distance_from_gemm_rounding(tiles):
    # Far from the origin, |x|^2 + |y|^2 - 2 x.y loses the small distances: the GEMM puts the
    # self-distance above 0 and near-duplicates at about the same level.
    rng = np.random.default_rng(6)
    offset = np.full(32, 5.0, dtype=np.float32)
    query = offset + rng.standard_normal((15, 32)).astype(np.float32)
    gallery = np.concatenate([offset + rng.standard_normal((50, 32)), query[:5] + 1e-4]).astype(np.float32)
    q_g = rerank_numpy.euclidean_distances(query, gallery)
    q_q = rerank_numpy.euclidean_distances(query, query)
    g_g = rerank_numpy.euclidean_distances(gallery, gallery)
    assert np.diagonal(g_g).max() > 0 and np.diagonal(q_q).max() > 0
    # Dense input: the given matrices, self-distances included, decide the ranks.
    expected = rerank_numpy.re_ranking(q_g, q_q, g_g)
    assert_same_ranking(re_ranking(q_g, q_q, g_g), expected, atol=1e-6)
    # Features: d(i, i) = 0 exactly, as in the reference fed with cdist-like distances.
    expected = rerank_numpy.re_ranking_from_features(query, gallery)
    np.testing.assert_allclose(rerank_features(query, gallery), expected, rtol=0, atol=1e-5)


def test_copies_outnumbering_the_candidates_tie_in_index_order(tiles):
    # A query with 12 copies in the gallery, a few ulps apart through the GEMM: at 0 from each other as
    # from themselves (as cdist gives), more ties than a row's candidates hold, taken in index order.
    rng = np.random.default_rng(0)
    base = (5 + rng.standard_normal(32)).astype(np.float32)
    query = (5 + rng.standard_normal((4, 32))).astype(np.float32)
    gallery = np.concatenate([np.tile(base, (12, 1)), 5 + rng.standard_normal((20, 32))]).astype(np.float32)
    query[0] = base
    assert rerank_numpy.euclidean_distances(gallery[:2], gallery[:2]).min() > 0
    for k1, k2 in ((4, 2), (6, 3)):
        expected = rerank_numpy.re_ranking_from_features(query, gallery, k1, k2, 0.3)
        np.testing.assert_allclose(rerank_features(query, gallery, k1, k2, 0.3), expected, rtol=0, atol=1e-5)


def test_queries_copied_into_the_gallery_tie_on_both_strategies(tiles):
    # The certified search recomputes a query's distance to another query in its stage 2 and takes its
    # distance to that query's gallery copy from the query x gallery GEMM, a rounding residue apart: the
    # copies ranked in rounding order (0.007 from the direct path here, 0.016 at 600 x 3,000), now by index.
    rng = np.random.default_rng(0)
    query = rng.standard_normal((20, 32), dtype=np.float32)
    gallery = rng.standard_normal((80, 32), dtype=np.float32)
    gallery[:10] = query[:10]
    expected = rerank_numpy.re_ranking_from_features(query, gallery)
    strategies = ("direct", "certified") if _backend.resolve(None, torch.device("cpu")) == "cpp" else ("direct",)
    for strategy in strategies:
        result = rerank_features(query, gallery, strategy=strategy)
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)


def test_squared_input_switch():
    q_g, q_q, g_g = (d.astype(np.float32) for d in exact_distances(*random_features(10, 30, 4, 7)))
    squared = [d * d for d in (q_g, q_q, g_g)]
    expected = rerank_numpy.re_ranking(*squared, input="squared")
    assert_same_ranking(re_ranking(*squared, input="squared"), expected, atol=1e-6)
    np.testing.assert_allclose(re_ranking(*squared, input="squared"), re_ranking(q_g, q_q, g_g), atol=1e-6)
    # torchreid passes squared distances as if Euclidean: the reference then uses d^4.
    expected = rerank_numpy.re_ranking(*squared)
    assert_same_ranking(re_ranking(*squared, input="euclidean"), expected, atol=1e-6)


def asymmetric_case(num_query, num_gallery, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(size=(num_query, num_gallery)).astype(np.float32),
        rng.uniform(size=(num_query, num_query)).astype(np.float32),
        rng.uniform(size=(num_gallery, num_gallery)).astype(np.float32),
    )


@pytest.mark.parametrize(
    "num_query, num_gallery, seed, k1, k2",
    [(2, 3, 0, 2, 1), (2, 3, 1, 2, 1), (9, 40, 2, 20, 6), (15, 50, 3, 5, 3), (30, 4, 4, 7, 2)],
)
def test_asymmetric_input_matches_reference(tiles, num_query, num_gallery, seed, k1, k2):
    # The reference reads item i's distances from column i (column max, then transpose).
    q_g, q_q, g_g = asymmetric_case(num_query, num_gallery, seed)
    expected = rerank_numpy.re_ranking(q_g, q_q, g_g, k1, k2, 0.3)
    assert_same_ranking(re_ranking(q_g, q_q, g_g, k1, k2, 0.3), expected, atol=1e-6)
    # orientation="rows" reads row i: the reference fed with the transposed q_q / g_g.
    rows = re_ranking(q_g, q_q, g_g, k1, k2, 0.3, orientation="rows")
    assert_same_ranking(rows, rerank_numpy.re_ranking(q_g, q_q.T, g_g.T, k1, k2, 0.3), atol=1e-6)
    np.testing.assert_array_equal(
        re_ranking(q_g, q_q.T, g_g.T, k1, k2, 0.3, orientation="rows"), re_ranking(q_g, q_q, g_g, k1, k2, 0.3)
    )


def test_orientations_differ_only_for_asymmetric_input():
    q_g, q_q, g_g = asymmetric_case(2, 3, 0)
    assert np.abs(re_ranking(q_g, q_q, g_g, 2, 1) - re_ranking(q_g, q_q, g_g, 2, 1, orientation="rows")).max() > 0.1
    q_g, q_q, g_g = (d.astype(np.float32) for d in exact_distances(*random_features(10, 30, 4, 7)))
    np.testing.assert_array_equal(re_ranking(q_g, q_q, g_g), re_ranking(q_g, q_q, g_g, orientation="rows"))


def test_float64_and_torch_inputs():
    query, gallery = random_features(8, 25, 5, 8)
    q_g, q_q, g_g = exact_distances(query, gallery)
    expected = rerank_numpy.re_ranking(q_g, q_q, g_g)
    result = re_ranking(torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g))
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float32
    assert_same_ranking(result.numpy(), expected, atol=1e-6)
    gallery = gallery.astype(np.float16)
    expected = rerank_numpy.re_ranking_from_features(query, gallery.astype(np.float32))
    result = rerank_features(torch.from_numpy(query).double(), torch.from_numpy(gallery))
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float32
    assert_same_ranking(result.numpy(), expected, atol=1e-5)


def test_lists_in_numpy_out():
    # Lists are taken as arrays are and answered in numpy (they came back as torch tensors).
    query, gallery = random_features(4, 9, 5, 11)
    q_g, q_q, g_g = exact_distances(query, gallery)
    result = re_ranking(q_g.tolist(), q_q.tolist(), g_g.tolist(), k1=3, k2=2)
    assert isinstance(result, np.ndarray)
    np.testing.assert_array_equal(result, re_ranking(q_g, q_q, g_g, k1=3, k2=2))
    result = rerank_features(query.tolist(), gallery.tolist(), k1=3, k2=2)
    assert isinstance(result, np.ndarray)
    expected = rerank_features(query.astype(np.float64), gallery.astype(np.float64), k1=3, k2=2)  # as numpy reads it
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
def test_gpu_pipelines_match_cpu(backend):
    # Both pipelines end to end on a GPU backend: "cuda", its neighbour search and sparse-stage kernels
    # on CUDA tensors (under the CUDA emulator, DPM_OPS_EMULATED_CUDA=1: its CUDA code on CPU tensors);
    # "triton", its neighbour searches (the sparse stages in torch; on CPU tensors under the interpreter).
    query, gallery = random_features(30, 120, 16, 9)
    expected = rerank_features(query, gallery)
    matrices = [d.astype(np.float32) for d in exact_distances(query, gallery)]
    expected_from_matrices = re_ranking(*matrices)
    device = device_for(backend)
    with forced_backend(backend):
        for strategy in ("direct", "certified"):
            result = rerank_features(
                torch.from_numpy(query).to(device), torch.from_numpy(gallery).to(device), strategy=strategy
            )
            assert result.device.type == device.type
            np.testing.assert_allclose(result.cpu().numpy(), expected, rtol=0, atol=1e-5)
        result = re_ranking(*(torch.from_numpy(m).to(device) for m in matrices))
        assert result.device.type == device.type
        if device.type == "cuda":  # the torch steps between the kernels (exp, index_add_) round differently there
            np.testing.assert_allclose(result.cpu().numpy(), expected_from_matrices, rtol=0, atol=1e-6)
        else:  # the emulated CUDA code, the interpreted Triton: the same torch steps on the CPU
            np.testing.assert_array_equal(result.cpu().numpy(), expected_from_matrices)


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
def test_gpu_backends_take_any_k1(backend):
    # k1 + 1 + the tie margins past the direct GPU kernels' lists (256): the torch tile scan runs instead.
    query, gallery = random_features(20, 280, 8, 11)
    expected = rerank_features(query, gallery, k1=250, k2=251, strategy="direct")
    device = device_for(backend)
    with forced_backend(backend):
        result = rerank_features(
            torch.from_numpy(query).to(device), torch.from_numpy(gallery).to(device), k1=250, k2=251, strategy="direct"
        )
    np.testing.assert_allclose(result.cpu().numpy(), expected, rtol=0, atol=1e-5)


def test_bad_input():
    query, gallery = random_features(4, 6, 3, 10)
    q_g, q_q, g_g = (d.astype(np.float32) for d in exact_distances(query, gallery))
    # Each case matches its check's own message: a bare argument name ("qf", "q_g_dist") also matched
    # another check's error about the same argument.
    cases = [
        (lambda: rerank_features(query[:0], gallery), "qf is empty"),
        (lambda: rerank_features(query, gallery[:0]), "gf is empty"),
        (lambda: rerank_features(query, gallery[:, :2]), "must have the same feature dimension"),
        (lambda: rerank_features(query[0], gallery), "qf must be 2-D"),
        (lambda: rerank_features(np.where(query > 0, np.nan, query), gallery), "qf contains non-finite"),
        (lambda: rerank_features(query, np.full_like(gallery, np.inf)), "gf contains non-finite"),
        (lambda: re_ranking(q_g[:0], q_q[:0, :0], g_g), "q_g_dist is empty"),
        (lambda: re_ranking(q_g, q_q[:3], g_g), r"q_q_dist must be \(4, 4\)"),
        (lambda: re_ranking(q_g, q_q, g_g[:, :5]), r"g_g_dist must be \(6, 6\)"),
        (lambda: re_ranking(np.where(q_g > 1, np.nan, q_g), q_q, g_g), "q_g_dist contains non-finite"),
        (lambda: re_ranking(q_g, q_q, np.full_like(g_g, np.inf)), "g_g_dist contains non-finite"),
        (lambda: re_ranking(q_g.astype(np.int64), q_q, g_g), "q_g_dist must hold floating-point"),
        (lambda: re_ranking(q_g, q_q, g_g, input="cosine"), "input must be one of"),
        # squares among float32's subnormals: the re-ranked distances were rounding noise (0.9 off), silently
        (lambda: re_ranking(q_g * 1e-22, q_q * 1e-22, g_g * 1e-22), "too small in magnitude: the largest distance"),
        (lambda: re_ranking(q_g * 1e-40, q_q * 0, g_g * 0, input="squared"), "at least 1.18e-38"),
        (lambda: re_ranking(*(d.astype(np.float16) * 1e-3 for d in (q_g, q_q, g_g))), "float16 squares are subnormal"),
        (lambda: re_ranking(q_g, q_q, g_g, orientation="columns"), "orientation must be one of"),
        # the function called, not the k-NN op it hands the search to ("knn: strategy ...")
        (lambda: rerank_features(query, gallery, strategy="fast"), "^rerank_features: strategy must be one of"),
    ]
    for k1, k2, lambda_value, name in [
        (0, 6, 0.3, "k1 must be an integer >= 1"),
        (2.5, 6, 0.3, "k1 must be an integer >= 1"),
        (20, 0, 0.3, "k2 must be an integer >= 1"),
        (True, 6, 0.3, "k1 must be an integer >= 1"),
        # Before: past int64 a RuntimeError from the kernels' argument cast
        (10**25, 6, 0.3, rf"k1 must be an integer >= 1 and <= {_inputs.MAX_K}, got 10{'0' * 24}$"),
        (2**63 - 1, 6, 0.3, rf"k1 must be an integer >= 1 and <= {_inputs.MAX_K}"),
        (20, 10**25, 0.3, rf"k2 must be an integer >= 1 and <= {_inputs.MAX_K}"),
        (20, 6, -0.1, r"lambda_value must be a number in \[0, 1\]"),
        (20, 6, 1.5, r"lambda_value must be a number in \[0, 1\]"),
        (20, 6, float("nan"), r"lambda_value must be a number in \[0, 1\]"),
    ]:
        cases.append((lambda k1=k1, k2=k2, lam=lambda_value: rerank_features(query, gallery, k1, k2, lam), name))
        cases.append((lambda k1=k1, k2=k2, lam=lambda_value: re_ranking(q_g, q_q, g_g, k1, k2, lam), name))
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_jaccard_result_past_memory_fails_before_the_search():
    # 2^20 items: a 4 TiB (N, N) result. It failed as torch's allocation error after the whole search (18 s
    # at MSMT17's 93,820 items); now a MemoryError naming the way out, at once.
    n = 1 << 20
    try:
        torch.empty(n, n)
    except RuntimeError:
        pass
    else:
        pytest.skip("this machine lends 4 TiB of virtual memory (overcommit)")
    with pytest.raises(MemoryError, match=rf"\({n}, {n}\) float32 result needs 4096.0 GiB.*num_query=Q"):
        jaccard_distance(torch.randn(n, 2))


def test_k_at_its_cap_is_k_past_twice_the_items(tiles):
    """MAX_K costs no result: from 2 N on (k1 + 1 and round(k1 / 2) + 1 past every list) k changes nothing."""
    generator = np.random.default_rng(4)
    query, gallery = generator.random((3, 5)), generator.random((6, 5))
    for call in (
        rerank_features,
        lambda q, g, k1, k2: re_ranking(*exact_distances(q, g), k1, k2),
        lambda q, g, k1, k2: jaccard_distance(np.concatenate([q, g]), k1, k2),
    ):
        np.testing.assert_array_equal(call(query, gallery, _inputs.MAX_K, _inputs.MAX_K), call(query, gallery, 18, 9))


def test_copy_groups_are_exact():
    """Rows equal value by value (-0.0 and 0.0 alike) share a group, named by their smallest index; rows equal in
    the hashed values only, or in none, do not; no copies: None (the re-ranking then pays nothing more)."""
    from dpm_ops.evaluation._copies import copy_groups

    x = torch.randn(400, 96, generator=torch.Generator().manual_seed(0))
    assert copy_groups(x) is None and copy_groups(x[:1]) is None
    x[[120, 300]] = x[7].clone()
    x[9], x[10] = -0.0, 0.0
    x[11] = x[12]
    x[11, 1] += 1  # not a hashed value: the same key, another row
    for features in (x, x.double(), x.t().contiguous().t()):
        groups = copy_groups(features)
        expected = torch.arange(400)
        expected[[120, 300]] = 7
        expected[10] = 9
        assert torch.equal(groups, expected)
