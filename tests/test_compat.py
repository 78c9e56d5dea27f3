"""dpm_ops.compat.torchreid / .fastreid against the installed torchreid 0.2.5 and fast-reid 1.4.0:
their Python and Cython evaluation and their re-ranking, on the same random cases.

The peers are loaded file by file (benchmarks/reference/peers.py); every test that needs one skips
with the install line when it is missing. Distances come from clustered features and have no exact
ties (where the peers' unstable argsort and our (distance, index) order may differ).
"""

import inspect

import numpy as np
import pytest
import torch

from benchmarks.reference import peers
from benchmarks.reference.synthetic_features import make_reid_features
from dpm_ops import evaluation
from dpm_ops.compat import fastreid, torchreid

# (num_query, num_gallery, num_ids, num_distractors, seed): Market-like with same-camera junk and
# pid 0 distractors; the last two are tiny galleries (fewer items than max_rank = 50).
CASES = [(30, 200, 20, 40, 0), (60, 400, 40, 0, 1), (25, 150, 15, 60, 2), (12, 30, 6, 6, 3), (8, 14, 4, 2, 4)]
TINY = CASES[-2:]
MAX_RANKS = (1, 5, 50)


def euclidean(a, b):
    return np.sqrt(((a.astype(np.float64)[:, None] - b.astype(np.float64)[None]) ** 2).sum(-1))


# Each compat function and the peer file (benchmarks/reference/peers.py) holding its original.
PEER_FUNCTIONS = {
    torchreid: {
        "evaluate_rank": "torchreid_rank",
        "re_ranking": "torchreid_rerank",
        "compute_distance_matrix": "torchreid_distance",
        "euclidean_squared_distance": "torchreid_distance",
        "cosine_distance": "torchreid_distance",
    },
    fastreid: {
        "evaluate_rank": "fastreid_rank",
        "re_ranking": "fastreid_rerank",
        "evaluate_roc": "fastreid_roc",
        "aqe": "fastreid_query_expansion",
        **dict.fromkeys(
            ["build_dist", "compute_jaccard_distance", "compute_euclidean_distance", "compute_cosine_distance"],
            "fastreid_compute_dist",
        ),
    },
}


def parameters(function):
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("compat, name", [(c, n) for c, names in PEER_FUNCTIONS.items() for n in names])
def test_signatures_are_the_peers(compat, name):
    # Same parameters in the same order with the same defaults: positional calls and calls that rely
    # on a default (max_rank, k1, qe_k, metric, ...) compute what the peer's would.
    module = PEER_FUNCTIONS[compat][name]
    peer = peers.fastreid_compute_dist() if module == "fastreid_compute_dist" else peers.load(module)
    assert parameters(getattr(compat, name)) == parameters(getattr(peer, name))


def test_every_compat_function_is_compared_with_its_peer():
    # (torchreid's FeatureExtractor: test_export.test_feature_extractor_is_torchreids)
    assert set(PEER_FUNCTIONS[torchreid]) == set(torchreid.__all__) - {"FeatureExtractor"}
    assert set(PEER_FUNCTIONS[fastreid]) == set(fastreid.__all__)


def labelled_case(num_query, num_gallery, num_ids, num_distractors, seed, dtype=np.float64):
    """(distmat, q_pids, g_pids, q_camids, g_camids), with two queries that have no match: an
    identity absent from the gallery, and one whose only gallery image is on the query's camera."""
    data = make_reid_features(
        num_query=num_query,
        num_gallery=num_gallery,
        num_ids=num_ids,
        num_distractors=num_distractors,
        dim=32,
        latent_dim=8,
        num_cams=3,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    query = np.concatenate([data.query, rng.standard_normal((2, 32)).astype(np.float32)])
    gallery = np.concatenate([data.gallery, rng.standard_normal((1, 32)).astype(np.float32)])
    q_pids = np.r_[data.query_pids, num_ids + 1, num_ids + 2]
    g_pids = np.r_[data.gallery_pids, num_ids + 2]
    q_camids = np.r_[data.query_camids, 0, 0]
    g_camids = np.r_[data.gallery_camids, 0]
    return euclidean(query, gallery).astype(dtype), q_pids, g_pids, q_camids, g_camids


def min_kept(distmat, q_pids, g_pids, q_camids, g_camids):
    """The fewest gallery items any query with a match keeps (same pid and camera removed)."""
    junk = (q_pids[:, None] == g_pids) & (q_camids[:, None] == g_camids)
    match = (q_pids[:, None] == g_pids) & ~junk
    return int((~junk).sum(1)[match.any(1)].min())


def check_cmc(cmc, expected, length):
    assert cmc.dtype == np.float32 and cmc.shape == (length,)
    np.testing.assert_allclose(cmc, expected[:length], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("max_rank", MAX_RANKS)
def test_evaluate_rank_follows_dpm_ops(case, max_rank):
    # The peers' CMC length, min(max_rank, G); past the kept items it stays at 1.
    args = labelled_case(*case)
    result = evaluation.evaluate_rank(*args, max_rank=max_rank)
    length = min(max_rank, case[1] + 1)
    cmc, mAP = torchreid.evaluate_rank(*args, max_rank=max_rank)
    check_cmc(cmc, result.cmc, length)
    assert type(mAP) is np.float64 and mAP == result.mAP
    cmc, all_AP, all_INP = fastreid.evaluate_rank(*args, max_rank=max_rank, use_cython=False)
    check_cmc(cmc, result.cmc, length)
    np.testing.assert_array_equal(all_AP, result.all_AP)
    np.testing.assert_array_equal(all_INP, result.all_INP)


@pytest.mark.parametrize("case", [case for case in CASES if case not in TINY])
@pytest.mark.parametrize("max_rank", MAX_RANKS)
@pytest.mark.parametrize("peer", ["torchreid", "fastreid"])
def test_market1501_matches_peer_python(case, max_rank, peer):
    args = labelled_case(*case)
    assert min_kept(*args) >= max_rank  # where their Python is defined (test_peer_python_fails_on_tiny_galleries)
    expected = peers.load(f"{peer}_rank").evaluate_rank(*args, max_rank=max_rank, use_cython=False)
    compat = {"torchreid": torchreid, "fastreid": fastreid}[peer]
    result = compat.evaluate_rank(*args, max_rank=max_rank)
    check_cmc(result[0], expected[0], len(expected[0]))
    for ours, theirs in zip(result[1:], expected[1:]):  # mAP, or all_AP and all_INP
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("max_rank", MAX_RANKS)
def test_market1501_matches_fastreid_cython(case, max_rank):
    # float32 distances: the Cython code casts to float32 (test_float64_distances_are_not_rounded).
    args = labelled_case(*case, dtype=np.float32)
    cmc, all_AP, all_INP = peers.fastreid_cython().evaluate_cy(*args, max_rank)
    ours = fastreid.evaluate_rank(*args, max_rank=max_rank)
    # Past a query's kept items their CMC reads a stale buffer (test_fastreid_cython_stale_cmc).
    valid_length = min(len(cmc), min_kept(*args))
    check_cmc(ours[0][:valid_length], cmc, valid_length)
    np.testing.assert_allclose(ours[1], all_AP, rtol=0, atol=1e-6)  # theirs: float32 sums
    np.testing.assert_allclose(ours[2], all_INP, rtol=0, atol=1e-6)


def deterministic_cuhk03_case(seed):
    """One gallery image per identity (a single-gallery-shot draw has one choice), every query
    keeping its match on another camera."""
    rng = np.random.default_rng(seed)
    g_pids = rng.permutation(40)
    distmat = rng.random((15, 40))
    q_pids = g_pids[:15]
    return distmat, q_pids, g_pids, np.zeros(15, np.int64), np.ones(40, np.int64)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_rank", MAX_RANKS)
def test_cuhk03_matches_peers(seed, max_rank):
    args = deterministic_cuhk03_case(seed)
    expected = [peers.load(f"{peer}_rank").eval_cuhk03(*args, max_rank) for peer in ("torchreid", "fastreid")]
    expected.append(peers.fastreid_cython().evaluate_cy(*args, max_rank, use_metric_cuhk03=True))
    for compat in (torchreid, fastreid):
        cmc, mAP = compat.evaluate_rank(*args, max_rank=max_rank, use_metric_cuhk03=True)
        assert type(mAP) is type(expected[0][1]) is np.float64  # their Python's np.mean
        for theirs in expected:
            check_cmc(cmc, theirs[0], len(theirs[0]))
            assert mAP == pytest.approx(theirs[1], rel=0, abs=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_cuhk03_map_matches_peers(case):
    # Random draws: the CMC differs draw by draw (ours seeded, theirs numpy's global RNG); the mAP
    # is that of the whole kept gallery.
    args = labelled_case(*case, dtype=np.float32)
    expected = [peers.load(f"{peer}_rank").eval_cuhk03(*args, 50)[1] for peer in ("torchreid", "fastreid")]
    cmc_cy, map_cy = peers.fastreid_cython().evaluate_cy(*args, 50, use_metric_cuhk03=True)
    expected.append(map_cy)
    cmc, mAP = torchreid.evaluate_rank(*args, use_metric_cuhk03=True)
    # Past the number of gallery identities their Cython CMC drops to 0; ours stays at 1.
    num_ids = len(np.unique(args[2]))
    assert cmc.shape == cmc_cy.shape == (min(50, case[1] + 1),) and np.all(np.diff(cmc) >= 0)
    np.testing.assert_array_equal(cmc[num_ids - 1 :], 1)
    np.testing.assert_array_equal(cmc_cy[num_ids:], 0)
    np.testing.assert_allclose(mAP, expected, rtol=0, atol=1e-6)
    assert fastreid.evaluate_rank(*args, use_metric_cuhk03=True)[1] == mAP


def test_fastreid_cython_stale_cmc():
    # Query 0 (pid 1) keeps all 4 items, its match last: their CMC buffer holds [0, 0, 0, 1].
    # Query 1 (pid 2, camera 0) keeps 2, items 1 and 2 (its pid, its camera) removed, its match
    # first: they write [1, 1] and read the stale 0 at rank 3. The CMC stays at 1 past the kept items.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]], np.float32)
    args = distmat, np.array([1, 2]), np.array([2, 2, 2, 1]), np.array([0, 0]), np.array([1, 0, 0, 1])
    cmc_cy = peers.fastreid_cython().evaluate_cy(*args, 4)[0]
    np.testing.assert_array_equal(cmc_cy, [0.5, 0.5, 0.0, 1.0])
    np.testing.assert_array_equal(fastreid.evaluate_rank(*args, max_rank=4)[0], [0.5, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(torchreid.evaluate_rank(*args, max_rank=4)[0], [0.5, 0.5, 0.5, 1.0])


@pytest.mark.parametrize("peer", ["torchreid", "fastreid"])
def test_peer_python_fails_on_tiny_galleries(peer):
    # Fewer kept items than min(max_rank, G) for some query: their per-query CMCs are ragged.
    args = labelled_case(*TINY[-1])
    with pytest.raises(ValueError, match="inhomogeneous"):
        peers.load(f"{peer}_rank").evaluate_rank(*args, use_cython=False)


def test_float64_distances_are_not_rounded():
    # Distances 1 + 1e-9 apart: float32 makes them equal, float64 ranks the match second.
    distmat = np.array([[1.0 + 2e-9, 1.0 + 1e-9, 1.0]])
    args = distmat, np.array([1]), np.array([1, 2, 3]), np.array([0]), np.array([1, 1, 1])
    expected = peers.load("fastreid_rank").evaluate_rank(*args, max_rank=3, use_cython=False)
    ours = fastreid.evaluate_rank(*args, max_rank=3)
    np.testing.assert_array_equal(ours[0], [0, 0, 1])
    for a, b in zip(ours, expected):
        np.testing.assert_array_equal(a, b)


def rerank_case(num_query, num_gallery, seed):
    data = make_reid_features(
        num_query=num_query,
        num_gallery=num_gallery,
        num_ids=num_gallery // 5,
        num_distractors=num_gallery // 5,
        dim=32,
        latent_dim=8,
        num_cams=3,
        seed=seed,
    )
    return (
        euclidean(data.query, data.gallery),
        euclidean(data.query, data.query),
        euclidean(data.gallery, data.gallery),
    )


# k1 >= N (every item a neighbour) in the last two; k2 == 1 skips query expansion.
@pytest.mark.parametrize(
    "num_query, num_gallery, seed, k1, k2, lambda_value",
    [
        (20, 80, 0, 20, 6, 0.3),
        (30, 120, 1, 10, 3, 0.1),
        (15, 60, 2, 20, 1, 0.5),
        (5, 12, 3, 20, 6, 0.3),
        (4, 10, 4, 30, 20, 0.0),
    ],
)
@pytest.mark.parametrize("peer", ["torchreid", "fastreid"])
def test_re_ranking_matches_peer(num_query, num_gallery, seed, k1, k2, lambda_value, peer):
    distances = rerank_case(num_query, num_gallery, seed)
    expected = peers.load(f"{peer}_rerank").re_ranking(*distances, k1=k1, k2=k2, lambda_value=lambda_value)
    compat = {"torchreid": torchreid, "fastreid": fastreid}[peer]
    ours = compat.re_ranking(*distances, k1=k1, k2=k2, lambda_value=lambda_value)
    assert ours.dtype == expected.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtypes", [("float16",) * 3, ("float16", "float64", "float32")])
@pytest.mark.parametrize("peer", ["torchreid", "fastreid"])
def test_re_ranking_squares_in_the_promoted_input_dtype(dtypes, peer):
    # The reference squares np.concatenate's promotion of the three matrices (float16 squared in
    # float16), then casts to float32: squaring in float32 instead moved float16 results by ~1e-4.
    distances = [d.astype(t) for d, t in zip(rerank_case(12, 40, 5), dtypes)]
    expected = peers.load(f"{peer}_rerank").re_ranking(*distances)
    ours = {"torchreid": torchreid, "fastreid": fastreid}[peer].re_ranking(*distances)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_re_ranking_float16_squares_must_fit_float16():
    q_g, q_q, g_g = (d.astype(np.float16) for d in rerank_case(5, 20, 0))
    with pytest.raises(ValueError, match=r"q_g_dist is too large in magnitude: .* below 255\.94 \(float16"):
        torchreid.re_ranking(q_g * np.float16(300), q_q, g_g)
    torchreid.re_ranking(q_g * np.float16(300), q_q, g_g.astype(np.float32))  # promoted to float32: fine


def test_negative_strides_and_read_only_arrays_are_taken():
    # x[::-1] / np.flip views: torch.from_numpy refuses negative strides, so they are copied.
    distmat, q_pids, g_pids, q_camids, g_camids = labelled_case(*TINY[0])
    flipped = np.ascontiguousarray(distmat[:, ::-1])[:, ::-1]  # the same values through a negative stride
    for compat in (torchreid, fastreid):
        np.testing.assert_array_equal(
            compat.evaluate_rank(flipped, q_pids[::-1].copy()[::-1], g_pids, q_camids, g_camids)[0],
            compat.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)[0],
        )
    q_g, q_q, g_g = rerank_case(5, 20, 0)
    np.testing.assert_array_equal(
        torchreid.re_ranking(q_g[::-1].copy()[::-1], q_q, g_g), torchreid.re_ranking(q_g, q_q, g_g)
    )
    if np.finfo(np.longdouble).bits > 64:  # x86-64: 80-bit extended precision
        with pytest.raises(ValueError, match="distmat is float128, which torch cannot hold: pass float64"):
            evaluation.evaluate_rank(distmat.astype(np.longdouble), q_pids, g_pids, q_camids, g_camids)


def test_re_ranking_returns_numpy_for_torch_input():
    distances = rerank_case(5, 20, 0)
    ours = torchreid.re_ranking(*(torch.from_numpy(d) for d in distances))
    assert isinstance(ours, np.ndarray)
    np.testing.assert_array_equal(ours, fastreid.re_ranking(*distances))


@pytest.mark.parametrize("compat", [torchreid, fastreid])
def test_bad_input_names_the_argument(compat):
    distmat, q_pids, g_pids, q_camids, g_camids = labelled_case(*TINY[-1])
    with pytest.raises(ValueError, match="distmat must be 2-D"):
        compat.evaluate_rank(distmat[0], q_pids, g_pids, q_camids, g_camids)
    with pytest.raises(ValueError, match="g_pids must have length"):
        compat.evaluate_rank(distmat, q_pids, g_pids[1:], q_camids, g_camids)
    with pytest.raises(ValueError, match="max_rank must be an integer >= 1"):
        compat.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=0)
    with pytest.raises(ValueError, match="use_metric_cuhk03 must be True or False, got 'no'"):  # read as true
        compat.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, use_metric_cuhk03="no")
    with pytest.raises(ValueError, match="use_metric_cuhk03 must be True or False, got 2"):
        compat.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, use_metric_cuhk03=2)
    # what the peers test the truth of: None and 0 / 1 as they read them (refused before)
    expected = compat.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    for falsy in (None, 0, np.int64(0)):
        np.testing.assert_equal(compat.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, 50, falsy), expected)
    cuhk03 = compat.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, use_metric_cuhk03=True)
    np.testing.assert_equal(compat.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, 50, 1), cuhk03)
    with pytest.raises(ValueError, match="no query has a match"):
        compat.evaluate_rank(distmat, q_pids + 1000, g_pids, q_camids, g_camids)
    q_g, q_q, g_g = rerank_case(5, 20, 0)
    with pytest.raises(ValueError, match="k1 must be an integer >= 1"):
        compat.re_ranking(q_g, q_q, g_g, k1=0)
    with pytest.raises(ValueError, match="lambda_value must be a number in"):
        compat.re_ranking(q_g, q_q, g_g, lambda_value=2)
    with pytest.raises(ValueError, match="g_g_dist must be"):
        compat.re_ranking(q_g, q_q, q_q)


def test_distance_errors_name_the_peers_arguments():
    # their argument names, not the internal x / y of dpm_ops.evaluation.pairwise_distance
    good, flat, narrow = torch.rand(3, 4), torch.rand(4), torch.rand(5, 2)
    for call, message in [
        (lambda: torchreid.compute_distance_matrix(flat, good), r"^input1 must be 2-D"),
        (lambda: torchreid.cosine_distance(good, narrow), r"^input1 and input2 must have the same feature dimension"),
        (lambda: fastreid.compute_euclidean_distance(good, flat), r"^others must be 2-D"),
        (lambda: fastreid.compute_cosine_distance(good.long(), good), r"^features must hold floating-point values"),
        (lambda: fastreid.build_dist(good, narrow, "euclidean"), r"^feat_1 and feat_2 must have the same feature"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("qe_times, qe_k, alpha", [(1, 10, 3.0), (2, 5, 1.0), (1, 1, 3.0), (3, 20, 2.0), (0, 10, 3.0)])
def test_aqe_matches_fastreid(qe_times, qe_k, alpha):
    # alpha query expansion (fast-reid's TEST.AQE) from the exact k-NN: their dense similarity matrix's
    # values, within float32 summation order; features in and out unnormalised, as theirs
    theirs = peers.load("fastreid_query_expansion")
    generator = torch.Generator().manual_seed(qe_times * 100 + qe_k)
    query, gallery = torch.randn(40, 32, generator=generator), torch.randn(200, 32, generator=generator)
    expected = theirs.aqe(query, gallery, qe_times, qe_k, alpha)
    result = fastreid.aqe(query, gallery, qe_times, qe_k, alpha)
    assert len(result) == len(expected) == 2  # (query, gallery): zip alone would check a shorter tuple's part
    for got, want in zip(result, expected):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the features did change (qe_k = 1: each is its own only neighbour, weight 1; qe_times = 0: no expansion)
    assert torch.allclose(result[0], query, atol=1e-5) == (qe_k == 1 or qe_times == 0)
    numpy_result = fastreid.aqe(query.numpy(), gallery.numpy(), qe_times, qe_k, alpha)
    for got, want in zip(numpy_result, result, strict=True):  # numpy in: the same query and gallery
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"qe_k must be an integer in \[1, 240\]"):
        fastreid.aqe(query, gallery, qe_times, 241, alpha)


def test_aqe_of_float64_features_is_float64():
    # theirs keeps float64 features in float64 (numpy underneath); ours returned float32 for them
    generator = torch.Generator().manual_seed(5)
    query, gallery = (torch.randn(n, 16, dtype=torch.float64, generator=generator) for n in (10, 30))
    expected = peers.load("fastreid_query_expansion").aqe(query, gallery, 2, 4, 3.0)
    for got, want in zip(fastreid.aqe(query, gallery, 2, 4, 3.0), expected, strict=True):
        assert got.dtype == want.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_aqe_refuses_to_return_nan_features():
    """A negative similarity to a fractional alpha (or 0 to a negative one) made NaN rows without a word."""
    query = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    gallery = torch.tensor([[0.9, 0.1], [-0.9, 0.2], [0.5, 0.5]])
    zero_row = torch.cat([query, torch.zeros(1, 2)])
    for queries, alpha in ((query, 2.5), (zero_row, -1.0)):
        with pytest.raises(ValueError, match=rf"^aqe: alpha={alpha} gives non-finite weights"):
            fastreid.aqe(queries, gallery, qe_k=3, alpha=alpha)
    expanded, _ = fastreid.aqe(query, gallery, qe_k=3, alpha=3.0)  # an odd integer power keeps the sign
    assert torch.isfinite(expanded).all()


def test_bad_numbers_are_value_errors():
    # A list metric raised TypeError (a dict lookup of an unhashable value); aqe's alpha went unchecked
    # into torch.pow: None / str a TypeError, NaN silently NaN features, True taken as 1.
    query, gallery = torch.randn(6, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match="Unknown distance metric"):
        torchreid.compute_distance_matrix(query, gallery, ["cosine"])
    for alpha in (None, "3", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="aqe: alpha must be a finite number"):
            fastreid.aqe(query, gallery, 1, 3, alpha)
    for got, want in zip(fastreid.aqe(query, gallery, 1, 3, np.float32(2)), fastreid.aqe(query, gallery, 1, 3, 2.0)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_evaluate_roc_of_bfloat16_distances():
    # numpy has no bfloat16: the scores come back as float32 (exact), where .numpy() raised a TypeError
    rng = np.random.default_rng(4)
    distmat = torch.from_numpy(rng.random((8, 20)).astype(np.float32)).bfloat16()
    labels = [rng.integers(0, 3, n) for n in (8, 20, 8, 20)]
    scores, match = fastreid.evaluate_roc(distmat, *labels)
    want_scores, want_match = fastreid.evaluate_roc(distmat.float(), *labels)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(match, want_match)


def test_evaluate_roc_matches_fastreid():
    theirs = peers.load("fastreid_roc")
    rng = np.random.default_rng(3)
    distmat = rng.random((30, 90)).astype(np.float32)
    labels = [rng.integers(0, 6, n) for n in (30, 90)] + [rng.integers(0, 3, n) for n in (30, 90)]
    q_pids, g_pids, q_camids, g_camids = labels
    expected = theirs.evaluate_roc(distmat, q_pids, g_pids, q_camids, g_camids, use_cython=False)
    result = fastreid.evaluate_roc(distmat, q_pids, g_pids, q_camids, g_camids)
    assert len(result) == len(expected) == 2  # (scores, labels)
    for got, want in zip(result, expected):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    kept = ~((g_pids[None] == q_pids[:, None]) & (g_camids[None] == q_camids[:, None]))
    assert len(result[0]) == kept.sum() < distmat.size and 0 < (result[1] == 0).sum() < kept.sum()
    with pytest.raises(ValueError, match="g_camids must have length 90"):
        fastreid.evaluate_roc(distmat, q_pids, g_pids, q_camids, g_camids[:5])
    # no matches, or no non-matches: theirs stacks an empty list with the other side's float32 scores (float64)
    for gallery_pids in (q_pids[:1] + 1 + np.arange(90), np.full(90, q_pids[0])):
        args = (distmat[:1], q_pids[:1], gallery_pids, q_camids[:1], (q_camids[:1] + 1).repeat(90))
        expected = theirs.evaluate_roc(*args, use_cython=False)
        for got, want in zip(fastreid.evaluate_roc(*args), expected):
            assert got.dtype == want.dtype == np.float64
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_torchreid_distances_keep_autograd_as_theirs(metric):
    """Theirs is plain torch: a distance-based loss trains through it (ours returned a tensor without a graph)."""
    theirs = peers.load("torchreid_distance")
    x, y = torch.randn(6, 16, dtype=torch.float64), torch.randn(9, 16, dtype=torch.float64)
    weights = torch.rand(6, 9, dtype=torch.float64)
    gradients = []
    for compute in (torchreid.compute_distance_matrix, theirs.compute_distance_matrix):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        (compute(a, b, metric) * weights).sum().backward()
        gradients.append((a.grad, b.grad))
    for ours, peer in zip(*gradients):
        torch.testing.assert_close(ours, peer)
    with torch.no_grad():  # no graph asked for: the tiled kernels, the same values
        a = x.clone().requires_grad_()
        assert not torchreid.compute_distance_matrix(a, y, metric).requires_grad
    # a row's distance to itself (0) has a finite gradient in the square-rooted euclidean
    a = x.clone().requires_grad_()
    evaluation.pairwise_distance(a, a).sum().backward()
    assert torch.isfinite(a.grad).all()


def test_inputs_of_another_byte_order_layout_or_a_float8_dtype():
    """A big-endian array (from a file) was torch's error, a sparse tensor an error from deep inside torch."""
    rng = np.random.default_rng(0)
    distmat, q_pids, g_pids = rng.random((4, 6)), np.array([1, 2, 3, 1]), np.array([1, 2, 3, 1, 2, 3])
    q_camids, g_camids = np.zeros(4, int), np.ones(6, int)
    expected = torchreid.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=5)
    swapped = torchreid.evaluate_rank(
        distmat.astype(">f8"), q_pids.astype(">i8"), g_pids, q_camids, g_camids, max_rank=5
    )
    np.testing.assert_array_equal(swapped[0], expected[0])
    assert swapped[1] == expected[1]
    with pytest.raises(ValueError, match=r"^distmat must be a dense tensor, got a torch.sparse_coo one"):
        evaluation.evaluate_rank(torch.as_tensor(distmat).to_sparse(), q_pids, g_pids, q_camids, g_camids, max_rank=5)
    with pytest.raises(ValueError, match=r"^g_pids must be a dense tensor"):
        evaluation.evaluate_rank(distmat, q_pids, torch.as_tensor(g_pids).to_sparse(), q_camids, g_camids, max_rank=5)
    with pytest.raises(ValueError, match=r"^input1 is torch.float8_e5m2, which is not computed in: cast it"):
        torchreid.compute_distance_matrix(torch.rand(3, 4).to(torch.float8_e5m2), torch.rand(2, 4))
