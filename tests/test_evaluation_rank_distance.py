"""evaluate_rank against the vectorised numpy reference and hand-worked cases; distances and knn."""

import warnings

import numpy as np
import pytest
import torch

import dpm_ops

from benchmarks.reference.eval_numpy import evaluate_rank_numpy
from conftest import backend_params, device_for
from dpm_ops._backend import forced_backend
from dpm_ops.evaluation import _select, distance, evaluate_rank, knn, pairwise_distance, rank

CUDA = torch.cuda.is_available()


def random_problem(num_query, num_gallery, seed, levels=None, num_ids=8, num_cams=3):
    """Random labels; distances quantised to `levels` values make many exact ties."""
    rng = np.random.default_rng(seed)
    dist = rng.random((num_query, num_gallery))
    if levels:
        dist = np.round(dist * levels) / levels
    return (
        dist,
        rng.integers(0, num_ids, num_query),
        rng.integers(0, num_ids, num_gallery),
        rng.integers(0, num_cams, num_query),
        rng.integers(0, num_cams, num_gallery),
    )


def assert_matches_reference(result, expected):
    np.testing.assert_array_equal(result.cmc, expected["cmc"])
    assert result.num_valid == expected["num_valid"]
    np.testing.assert_allclose(result.all_AP, expected["all_AP"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(result.all_INP, expected["all_INP"], rtol=1e-12, atol=0)
    assert result.mAP == pytest.approx(expected["mAP"], rel=1e-12, abs=0)
    assert result.mINP == pytest.approx(expected["mINP"], rel=1e-12, abs=0)


@pytest.fixture(params=["default path", "torch path in chunks"])
def chunks(request, monkeypatch):
    """The default path (the C++ kernel where it is built), then the torch path (rank_reference.py) over
    chunks of a few queries: with the extension built, a small chunk size alone never reached that path."""
    if request.param == "torch path in chunks":
        monkeypatch.setenv("DPM_OPS_BACKEND", "reference")
        monkeypatch.setattr(rank, "_CHUNK_ELEMENTS", 700)
    return request.param


@pytest.mark.parametrize(
    "num_query, num_gallery, seed, levels", [(1, 5, 0, None), (30, 200, 1, None), (60, 500, 2, 20), (40, 300, 3, 3)]
)
@pytest.mark.parametrize("ap", ["standard", "trapezoid"])
def test_matches_reference(chunks, num_query, num_gallery, seed, levels, ap):
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(num_query, num_gallery, seed, levels)
    q_pids[0], q_cams[0], g_pids[0], g_cams[0] = 1, 0, 1, 1  # at least one valid query
    for max_rank in (1, 10, 50):
        expected = evaluate_rank_numpy(dist, q_pids, g_pids, q_cams, g_cams, max_rank, ap)
        expected["cmc"] = expected["cmc"][:num_gallery]  # a max_rank past the gallery is cut to it
        assert_matches_reference(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank, ap), expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes_and_torch_inputs(dtype):
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(50, 300, 4, levels=50)
    dist = dist.astype(dtype)
    expected = evaluate_rank_numpy(dist, q_pids, g_pids, q_cams, g_cams)
    assert_matches_reference(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams), expected)
    tensors = [torch.from_numpy(a) for a in (dist, q_pids, g_pids, q_cams, g_cams)]
    assert_matches_reference(evaluate_rank(*tensors), expected)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int16, np.uint8])
def test_narrow_integer_labels(label_dtype):
    # int32 pids (torch.IntTensor datasets) or uint8 camera ids give the int64 result, numpy and torch alike.
    dist, *labels = random_problem(30, 120, 12)
    expected = evaluate_rank_numpy(dist, *labels)
    narrow = [a.astype(label_dtype) for a in labels]
    assert_matches_reference(evaluate_rank(dist, *narrow), expected)
    assert_matches_reference(evaluate_rank(torch.from_numpy(dist), *map(torch.from_numpy, narrow)), expected)


@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_cuda_matches_reference(backend):
    # evaluate_rank and knn end to end on backend "cuda" (under the CUDA emulator: on CPU tensors).
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(80, 700, 5, levels=30)
    expected = evaluate_rank_numpy(dist, q_pids, g_pids, q_cams, g_cams)
    tensors = [torch.from_numpy(a).to(device_for(backend)) for a in (dist, q_pids, g_pids, q_cams, g_cams)]
    x, y = torch.randn(40, 16, dtype=torch.float64), torch.randn(300, 16, dtype=torch.float64)
    with forced_backend(backend):
        assert_matches_reference(evaluate_rank(*tensors), expected)
        distances, indices = knn(x.to(device_for(backend)), y.to(device_for(backend)), 7)
    expected_distances, expected_indices = knn(x, y, 7)
    torch.testing.assert_close(distances.cpu(), expected_distances)
    torch.testing.assert_close(indices.cpu(), expected_indices)
    # past the CUDA kernel's lists (k <= 256) the tiled torch path runs on the GPU instead of failing
    with forced_backend(backend):
        distances, indices = knn(x.to(device_for(backend)), y.to(device_for(backend)), 257)
    expected_distances, expected_indices = knn(x, y, 257)
    torch.testing.assert_close(distances.cpu(), expected_distances)
    torch.testing.assert_close(indices.cpu(), expected_indices)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("moved", range(5))
def test_match_ranks_kernel_wants_one_device(moved):
    # A mixed-device call reaches the CUDA kernel (the higher dispatch key): the shared input check
    # names the argument instead of reading host memory as device memory.
    names = ("distmat", "q_pids", "g_pids", "q_camids", "g_camids")
    args = [torch.from_numpy(a).cuda() for a in random_problem(4, 9, 6)]
    args[moved] = args[moved].cpu()
    named = names[1] if moved == 0 else names[moved]  # a CPU distmat: the first label is off its device
    with pytest.raises(ValueError, match=f"{named} must be on distmat's device"):
        torch.ops.dpm_ops.match_ranks(*args)


def test_hand_worked_distractor_and_same_camera_removal():
    # Query pid 1, camera 0. Sorted gallery: distractor (pid 0) 0.05, same pid + camera 0.1
    # (removed), pid 2 0.2, match 0.3, match 0.9: matches at ranks 3 and 4 out of 4 kept.
    dist = np.array([[0.1, 0.2, 0.3, 0.05, 0.9]])
    args = ([1], [1, 2, 1, 0, 1], [0], [0, 1, 1, 1, 2])
    result = evaluate_rank(dist, *args, max_rank=5)
    np.testing.assert_array_equal(result.cmc, [0, 0, 1, 1, 1])
    assert result.all_AP[0] == pytest.approx((1 / 3 + 2 / 4) / 2, rel=1e-15)
    assert result.mINP == pytest.approx(2 / 4, rel=1e-15)
    assert (result.num_valid, result.num_skipped) == (1, 0)
    # Official trapezoid: (1/3 + 0/2) / 2 and (2/4 + 1/3) / 2, averaged.
    trapezoid = evaluate_rank(dist, *args, max_rank=5, ap="trapezoid")
    assert trapezoid.mAP == pytest.approx(((1 / 3) / 2 + (2 / 4 + 1 / 3) / 2) / 2, rel=1e-15)
    np.testing.assert_array_equal(trapezoid.cmc, result.cmc)


def test_hand_worked_ties_follow_gallery_index(chunks):
    # Gallery 0..4 all at distance 0.5 except item 3 (0.2). Query pid 1 camera 0: items 1 and 3
    # match, item 0 (same pid, same camera) is removed. Kept order: 3, 1, 2, 4 -> ranks 1, 2.
    dist = np.array([[0.5, 0.5, 0.5, 0.2, 0.5]])
    result = evaluate_rank(dist, [1], [1, 1, 2, 1, 3], [0], [0, 1, 1, 2, 1], max_rank=3)
    assert result.all_AP[0] == 1.0 and result.mINP == 1.0
    # Same distances, the tied match now behind two tied negatives: order 3, 0, 1, 2 -> ranks 1, 4.
    result = evaluate_rank(dist, [1], [2, 5, 1, 1, 3], [0], [1, 1, 1, 2, 1], max_rank=3)
    np.testing.assert_array_equal(result.cmc, [1, 1, 1])
    assert result.all_AP[0] == pytest.approx((1 / 1 + 2 / 4) / 2, rel=1e-15)
    assert result.mINP == pytest.approx(2 / 4, rel=1e-15)
    # -0.0 and +0.0 tie too: the match at index 1 stays behind index 0.
    result = evaluate_rank(np.array([[0.0, -0.0]], dtype=np.float32), [1], [2, 1], [0], [1, 1])
    assert result.all_AP[0] == 0.5 and result.cmc[0] == 0.0 and result.cmc[1] == 1.0
    # float64 distances too close for float32 to tell apart still rank by value: the negative first.
    result = evaluate_rank(np.array([[0.5 + 1e-12, 0.5]]), [1], [1, 2], [0], [1, 1])
    assert result.all_AP[0] == 0.5 and result.cmc[0] == 0.0


def test_negative_distances(chunks):
    # Distances may be negative (a negated similarity): ranked by value, as the numpy reference does
    # (float32: the torch path ranks it by integer keys of the bits, float64 by torch.unique).
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(30, 200, 14, levels=10)
    dist = (0.5 - dist).astype(np.float32)
    expected = evaluate_rank_numpy(dist, q_pids, g_pids, q_cams, g_cams)
    assert_matches_reference(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams), expected)


def test_query_pids_missing_from_gallery(chunks):
    # Query pids below, between and above the gallery's have no match: skipped on every path and protocol.
    rng = np.random.default_rng(15)
    dist, q_cams, g_cams = rng.random((40, 150)), rng.integers(0, 3, 40), rng.integers(0, 3, 150)
    q_pids, g_pids = rng.integers(0, 12, 40), rng.choice([2, 3, 5, 6, 8], 150)
    expected = evaluate_rank_numpy(dist, q_pids, g_pids, q_cams, g_cams, 10)
    assert_matches_reference(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 10), expected)
    cuhk03 = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 10, protocol="cuhk03", num_repeats=3)
    expected_cmc = torchreid_cuhk03_cmc(dist, q_pids, g_pids, q_cams, g_cams, 10, 3, 0)
    np.testing.assert_allclose(cuhk03.cmc, expected_cmc, rtol=0, atol=1e-12)
    assert cuhk03.num_valid == expected["num_valid"]


def test_hand_worked_query_without_match_is_skipped():
    dist = np.array([[0.3, 0.1, 0.2], [0.3, 0.1, 0.2]])
    # Query 0 (pid 1, cam 0) only has its own camera's image; query 1 (pid 2) matches item 2.
    result = evaluate_rank(dist, [1, 2], [1, 3, 2], [0, 0], [0, 1, 1], max_rank=3)
    assert (result.num_valid, result.num_skipped) == (1, 1)
    np.testing.assert_array_equal(result.cmc, [0, 1, 1])
    np.testing.assert_array_equal(result.all_AP, [0.5])
    np.testing.assert_array_equal(result.all_INP, [0.5])  # valid queries only, as all_AP
    assert result.mAP == 0.5 and result.mINP == 0.5
    with pytest.raises(ValueError, match="no query has a match"):
        evaluate_rank(dist, [1, 4], [1, 3, 2], [0, 0], [0, 1, 1])


def test_max_rank_beyond_gallery_is_cut_to_it():
    """As torchreid: a warning and a CMC of the gallery's length, so the work stays bounded by the
    gallery (max_rank = 10**9 once allocated gigabytes)."""
    with pytest.warns(UserWarning, match="exceeds the gallery size 2"):
        result = evaluate_rank(np.array([[0.2, 0.1]]), [1], [1, 2], [0], [1, 1], max_rank=4)
    np.testing.assert_array_equal(result.cmc, [0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # max_rank equal to the gallery size is not cut: no warning
        result = evaluate_rank(np.array([[0.2, 0.1]]), [1], [1, 2], [0], [1, 1], max_rank=2)
    np.testing.assert_array_equal(result.cmc, [0, 1])
    dist = np.random.default_rng(0).random((6, 20))
    with pytest.warns(UserWarning, match="exceeds the gallery size 20"):
        result = evaluate_rank(
            dist, np.arange(6) % 3, np.arange(20) % 3, np.zeros(6, int), np.ones(20, int), max_rank=10**9
        )
    assert len(result.cmc) == 20 and result.cmc[-1] == 1


def torchreid_cuhk03_cmc(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, num_repeats, seed):
    """torchreid's eval_cuhk03 CMC loop (ranked list, one item per kept identity, cumsum capped at
    1, averaged over repeats), with its np.random.choice replaced by evaluate_rank's documented
    draws: a torch.Generator(seed), one float64 u per (query, identity) and repetition,
    identities in ascending pid order, item floor(u * n) of the n kept ones in index order."""
    pids = np.unique(g_pids)
    generator = torch.Generator().manual_seed(seed)
    draws = [
        torch.rand(len(q_pids), len(pids), dtype=torch.float64, generator=generator).numpy() for _ in range(num_repeats)
    ]
    indices = np.argsort(distmat, axis=1, kind="stable")
    all_cmc = []
    for q in range(len(q_pids)):
        order = indices[q]
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        raw_cmc = (g_pids[order] == q_pids[q])[keep]
        if not raw_cmc.any():
            continue
        kept_items = order[keep]
        cmc = np.zeros(max_rank)
        for draw in draws:
            mask = np.zeros(len(raw_cmc), dtype=bool)
            for p_index, pid in enumerate(pids):
                members = np.sort(kept_items[g_pids[kept_items] == pid])
                if len(members):
                    mask[kept_items == members[int(draw[q, p_index] * len(members))]] = True
            drawn_cmc = np.minimum(raw_cmc[mask].cumsum(), 1)[:max_rank]
            cmc += np.concatenate([drawn_cmc, np.ones(max_rank - len(drawn_cmc))]) / num_repeats
        all_cmc.append(cmc)
    return np.mean(all_cmc, axis=0)


@pytest.mark.parametrize(
    "num_query, num_gallery, seed, levels", [(5, 12, 4, None), (30, 200, 1, None), (40, 300, 3, 3)]
)
def test_cuhk03_matches_torchreid_loop(chunks, num_query, num_gallery, seed, levels):
    problem = random_problem(num_query, num_gallery, seed, levels)
    market = evaluate_rank(*problem, max_rank=10)
    for draw_seed, repeats in ((0, 10), (7, 3)):
        result = evaluate_rank(*problem, max_rank=10, protocol="cuhk03", num_repeats=repeats, seed=draw_seed)
        np.testing.assert_allclose(
            result.cmc, torchreid_cuhk03_cmc(*problem, 10, repeats, draw_seed), rtol=0, atol=1e-12
        )
        # AP and mINP are those of the full kept gallery, as in torchreid's eval_cuhk03.
        np.testing.assert_array_equal(result.all_AP, market.all_AP)
        assert (result.mINP, result.num_valid) == (market.mINP, market.num_valid)


def test_cuhk03_is_seeded():
    problem = random_problem(30, 200, 1)
    first, again = (evaluate_rank(*problem, protocol="cuhk03").cmc for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, evaluate_rank(*problem, protocol="cuhk03", seed=1).cmc)
    evaluate_rank(*problem, protocol="cuhk03", seed=2**63 - 1)  # the largest seed torch.Generator takes


def test_cuhk03_draws_are_uniform():
    # Query pid 1 on camera 0; gallery: pid 1 at indices 0 (camera 0: removed), 1, 2; pid 2 at
    # 3, 4; pid 3 at 5. The match is item 1 (d 0.2) or 2 (d 0.6), pid 2's item 3 (0.1) or
    # 4 (0.5), pid 3's item 0.4: exact rank-1 rate P(match 1) P(item 4) = 1/4, and rank <= 2 is
    # missed only for match 2 after items 3 and 5 (1/4) or 4 and 5 (1/4).
    dist = np.array([[0.0, 0.2, 0.6, 0.1, 0.5, 0.4]])
    labels = ([1], [1, 1, 1, 2, 2, 3], [0], [0, 1, 1, 1, 1, 1])
    result = evaluate_rank(dist, *labels, max_rank=3, protocol="cuhk03", num_repeats=rank.MAX_REPEATS)
    np.testing.assert_allclose(result.cmc, [0.25, 0.5, 1.0], atol=0.015)
    # One gallery item per identity: no randomness, the Market CMC.
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(20, 8, 9)
    g_pids = np.arange(8)
    market = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=8)
    cuhk03 = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=8, protocol="cuhk03")
    np.testing.assert_array_equal(cuhk03.cmc, market.cmc)


def test_bad_input():
    # Each case matches its own message: a bare argument name ("k", "distmat") also matched torch's or
    # another check's error.
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(4, 6, 6)
    cases = [
        (lambda: evaluate_rank(dist[0], q_pids, g_pids, q_cams, g_cams), "distmat must be 2-D"),
        (lambda: evaluate_rank(dist[:0], q_pids[:0], g_pids, q_cams[:0], g_cams), "distmat is empty"),
        (lambda: evaluate_rank(dist[:, :0], q_pids, g_pids[:0], q_cams, g_cams[:0]), "distmat is empty"),
        (
            lambda: evaluate_rank(np.where(dist > 0.5, np.nan, dist), q_pids, g_pids, q_cams, g_cams),
            "distmat contains non-finite",
        ),
        (
            lambda: evaluate_rank(np.where(dist > 0.5, -np.inf, dist), q_pids, g_pids, q_cams, g_cams),
            "distmat contains non-finite",
        ),
        (
            lambda: evaluate_rank((dist * 10).astype(np.int64), q_pids, g_pids, q_cams, g_cams),
            "distmat must hold floating-point",
        ),
        (lambda: evaluate_rank(dist, q_pids[:3], g_pids, q_cams, g_cams), "q_pids must have length 4"),
        (lambda: evaluate_rank(dist, q_pids, g_pids[1:], q_cams, g_cams), "g_pids must have length 6"),
        (lambda: evaluate_rank(dist, q_pids, g_pids, q_cams[:, None], g_cams), "q_camids must be 1-D"),
        (lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams[:2]), "g_camids must have length 6"),
        (lambda: evaluate_rank(dist, q_pids.astype(float), g_pids, q_cams, g_cams), "q_pids must hold integer"),
        (lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=0), "max_rank must be an integer >= 1"),
        (lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, ap="interpolated"), "ap must be one of"),
        (lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, protocol="cuhk"), "protocol must be one of"),
        (
            lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, protocol="cuhk03", num_repeats=0),
            r"num_repeats must be an integer in \[1, 10000\]",
        ),
        (  # before: no bound, minutes of draws on a 4 x 6 matrix
            lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, protocol="cuhk03", num_repeats=10**6),
            r"num_repeats must be an integer in \[1, 10000\] \(the draws run one after another\), got 1000000$",
        ),
        (
            lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, protocol="cuhk03", seed=-1),
            r"seed must be an integer in \[0, 9223372036854775807\], got",
        ),
        (
            lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, protocol="cuhk03", seed=1.5),
            r"seed must be an integer in \[0, 9223372036854775807\], got",
        ),
        (
            lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, protocol="cuhk03", seed=2**64),
            r"seed must be an integer in \[0, 9223372036854775807\]",
        ),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def brute_force_distance(x, y, metric):
    x, y = x.astype(np.float64), y.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        return 1 - x @ y.T
    squared = ((x[:, None] - y[None]) ** 2).sum(-1)
    return np.sqrt(squared) if metric == "euclidean" else squared


@pytest.mark.parametrize("metric", distance.METRICS)
def test_pairwise_distance(metric, monkeypatch):
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((37, 9)).astype(np.float32), rng.standard_normal((23, 9)).astype(np.float32)
    monkeypatch.setattr(distance, "TILE_ROWS", 8)
    result = pairwise_distance(x, y, metric)
    assert isinstance(result, np.ndarray) and result.dtype == np.float32 and result.shape == (37, 23)
    np.testing.assert_allclose(result, brute_force_distance(x, y, metric), rtol=1e-5, atol=1e-5)
    result = pairwise_distance(torch.from_numpy(x).double(), torch.from_numpy(y).half(), metric)
    assert result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), brute_force_distance(x, y.astype(np.float16), metric), atol=1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_self_distances_are_not_negative(metric):
    # Far from the origin the GEMM form rounds some self-distances below 0: clamped to 0, no NaN from the root.
    x = (5 + np.random.default_rng(17).standard_normal((40, 64))).astype(np.float32)
    result = pairwise_distance(x, x, metric)
    assert (result >= 0).all() and np.diagonal(result).max() < 0.1


def test_smallest_in_rows_keeps_each_rows_smallest(monkeypatch):
    # Streamed in tiles, later tiles through the threshold path: exactly each row's smallest values.
    monkeypatch.setattr(_select, "STREAM_TILE", 36)
    values = torch.rand(50, 1000, generator=torch.Generator().manual_seed(16))
    kept, indices = _select.smallest_in_rows(values, 9)
    torch.testing.assert_close(kept.sort(dim=1).values, values.topk(9, largest=False).values, rtol=0, atol=0)
    torch.testing.assert_close(values.gather(1, indices), kept, rtol=0, atol=0)


def test_flipped_arrays():
    # torch.from_numpy refuses negative strides (x[::-1], np.flip): such an array is read through a copy.
    x = np.random.default_rng(18).standard_normal((6, 3))
    np.testing.assert_array_equal(pairwise_distance(x[::-1], x), pairwise_distance(x[::-1].copy(), x))


def test_lists_in_numpy_out():
    # A list is read as numpy reads it (np.asarray: float64) and answered in numpy, as an array would
    # be: pairwise_distance and knn of lists returned torch tensors ("numpy in, numpy out" held only
    # for np.ndarray).
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((7, 3))
    result = pairwise_distance(x.tolist(), y.tolist())
    assert isinstance(result, np.ndarray) and result.dtype == np.float64
    np.testing.assert_array_equal(result, pairwise_distance(x, y))
    for got, want in zip(knn(x.tolist(), y.tolist(), 3), knn(x, y, 3), strict=True):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("metric", distance.METRICS)
@pytest.mark.parametrize("tiles", ["default tiles", "tiny tiles"])
def test_knn_is_a_stable_sort_of_the_distances(metric, tiles, monkeypatch):
    if tiles == "tiny tiles":  # the tiled torch path, which the C++ kernel replaces where it is built
        monkeypatch.setenv("DPM_OPS_BACKEND", "reference")
        monkeypatch.setattr(distance, "TILE_ROWS", 7)
        monkeypatch.setattr(distance, "TILE_COLUMNS", 20)
    # Rows of four +-1 in six dimensions: every distance and cosine is exact in float32 whatever
    # the tiling, and equal values are everywhere, straddling the k-th place. Scaled by 1/8 (exactly),
    # every distance is below 1, where the square root raises them.
    rng = np.random.default_rng(8)

    def rows(count):
        signs = rng.choice([-1.0, 1.0], (count, 6))
        signs[np.arange(count)[:, None], np.argsort(rng.random((count, 6)), axis=1)[:, :2]] = 0
        return signs.astype(np.float32)

    for scale in (1.0, 0.125):
        x, y = rows(30) * scale, rows(90) * scale
        full = pairwise_distance(x, y, metric)
        order = np.argsort(full, axis=1, kind="stable")
        for k in (1, 5, 13, 90):
            values, indices = knn(x, y, k, metric)
            np.testing.assert_array_equal(indices, order[:, :k])
            np.testing.assert_array_equal(values, np.take_along_axis(full, order[:, :k], axis=1))


@pytest.mark.skipif(not dpm_ops.backends()["cpp"][0], reason="the certified search runs on the C++ kernels")
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_knn_strategies_agree_on_exact_values(metric):
    # Small-integer rows: every (squared) distance is exact in fp32, so both strategies give the same bits,
    # ties included (cosine normalises the rows, so it is not exact: tests/test_knn_certified.py covers it).
    rng = np.random.default_rng(9)
    x, y = (rng.integers(-3, 4, (count, 16)).astype(np.float32) for count in (40, 300))
    direct = knn(x, y, 12, metric, strategy="direct")
    certified = knn(x, y, 12, metric, strategy="certified")
    for a, b in zip(direct, certified):
        np.testing.assert_array_equal(a, b)


def test_resolve_smallest_after_a_rounding_transform():
    # Candidates: the two smallest raw values (1.0 at index 1, 2.0 at index 3). floor() merges
    # 2.0 with the left-out 2.5 at index 2, which then comes first by index.
    raw = torch.tensor([[5.0, 1.0, 2.5, 2.0, 4.0, 3.0]])
    values, indices = _select.resolve_smallest(
        torch.tensor([[2.0, 1.0]]),
        torch.tensor([[3, 1]]),
        2,
        6,
        lambda v, rows: torch.floor(v),
        lambda rows: torch.floor(raw[rows]),
    )
    np.testing.assert_array_equal(indices, [[1, 2]])
    np.testing.assert_array_equal(values, [[1.0, 2.0]])
    # With one candidate to spare and nothing merged, the candidates decide alone.
    values, indices = _select.resolve_smallest(
        torch.tensor([[2.0, 1.0, 2.5]]), torch.tensor([[3, 1, 2]]), 2, 6, lambda v, rows: v, lambda rows: 1 / 0
    )
    np.testing.assert_array_equal(indices, [[1, 3]])


def test_knn_bad_input():
    # Specific messages: match="k" passed on any error with a k in it (without its own k > rows check,
    # knn fell through to the fused op's differently worded refusal, and match="x" passes on nearly anything).
    x, y = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    for call, name in [
        (lambda: knn(x, y, 0), "k must be an integer >= 1"),
        (lambda: knn(x, y, 6), r"k must be <= the number of rows of y \(5\)"),
        (lambda: knn(x, y, 10**25), r"k must be <= the number of rows of y \(5\)"),  # a huge k too, as k1 / k2
        (lambda: knn(x, y, 2, "l1"), "metric must be one of"),
        (lambda: knn(x, y[:, :3], 2), "^x and y must have the same feature dimension, got 4 and 3$"),
        (lambda: pairwise_distance(x, y[:, :3]), "^x and y must have the same feature dimension, got 4 and 3$"),
        (lambda: knn(x[:0], y, 2), "x is empty"),
        (lambda: knn(x, y[:0], 1), "y is empty"),
        (lambda: knn(x, y, 2, strategy="fast"), "strategy must be one of"),
        (lambda: pairwise_distance(x, y * np.nan), "y contains non-finite"),
        (lambda: pairwise_distance(x, y, "hamming"), "metric must be one of"),
    ]:
        with pytest.raises(ValueError, match=name):
            call()


def test_uint64_labels_past_int64_are_refused_not_wrapped():
    """2^64 - 1 became -1 on the way to int64: the query matched the gallery's junk label, mAP 1.0."""
    from dpm_ops.evaluation import tpr_at_fpr

    distmat = np.array([[0.1, 0.2, 0.3]], np.float32)
    q_pids, g_pids = np.array([2**64 - 1], np.uint64), np.array([-1, 5, 5])
    q_camids, g_camids = np.array([0]), np.array([1, 1, 1])
    for call in (
        lambda: evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=3),
        lambda: tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fpr=0.5),
    ):
        with pytest.raises(ValueError, match=r"^q_pids must fit in int64: it holds a uint64 label of 2\^63 or more$"):
            call()
    taken = evaluate_rank(distmat, np.array([5], np.uint64), g_pids, q_camids, g_camids, max_rank=3)
    assert taken.mAP == evaluate_rank(distmat, np.array([5]), g_pids, q_camids, g_camids, max_rank=3).mAP


def test_a_certified_search_the_backend_cannot_run_names_the_function_called():
    from dpm_ops._backend import forced_backend
    from dpm_ops.evaluation import gnn_rerank, jaccard_distance, rerank_features

    x = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    with forced_backend("reference"):
        for name, call in (
            ("rerank_features", lambda: rerank_features(x, x, strategy="certified")),
            ("gnn_rerank", lambda: gnn_rerank(x, x, strategy="certified")),
            ("jaccard_distance", lambda: jaccard_distance(x, k1=2, k2=1, strategy="certified")),
        ):
            with pytest.raises(ValueError, match=rf"^{name}: strategy='certified' runs on the C\+\+ CPU kernels"):
                call()
