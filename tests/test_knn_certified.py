"""The certified two-stage knn / self_knn (docs/certified_knn.md) against the direct path.

Tolerance (issue 13): stage 2 sums each candidate's dot product in a fixed lane order, the direct
path in its GEMM's order, so distances agree within the fp32 rounding of the distance
computation, tau = 2 gamma_D (|x|^2 + |y|^2) on the squared (or cosine) distance; the neighbours
and their order must be the same in every row where the direct path is unambiguous, i.e. where
its first k + 1 distances are more than 2 tau apart. Each test counts those rows and requires
most rows to be covered. Inputs with distances exact in fp32 (small integers) must match bit
for bit, ties included.
"""

import os
import subprocess
import sys

import pytest
import torch

from benchmarks.reference.synthetic_features import make_reid_features
from conftest import backend_params, record_kernels, sign_rows
from dpm_ops.ops import knn, self_knn
from dpm_ops.ops.knn import int8_gemm_engine
from dpm_ops.ops.knn_reference import COSINE_EPS, pairwise_distance_reference

pytestmark = list(backend_params("cpp")[0].marks)

U32 = 2.0**-24


def squared(d, metric):
    return d * d if metric == "euclidean" else d


def row_tolerance(x, y, metric, dtype):
    """tau per row of x: 2 gamma_D (max |x|^2 + |y|^2) in the compute dtype's unit."""
    u = 2.0**-53 if dtype == torch.float64 else U32
    dim = x.shape[1]
    gamma = dim * u / (1 - dim * u)
    if metric == "cosine":
        scale = torch.full((len(x),), 2.0, dtype=torch.float64)
    else:
        scale = x.double().pow(2).sum(1) + y.double().pow(2).sum(1).max()
    return 2 * gamma * scale + 8 * u  # + a few ulp of the formula's own rounding near 0 / 1


def _certified(op, call, backend):
    """`call()`, checked to have run the certified kernel `op` of `backend`: a strategy="certified" that
    silently ran the direct path would match it exactly, and every certified-vs-direct test pass."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        ran = record_kernels(monkeypatch)
        result = call()
    assert ran == [(op, backend)], ran
    return result


def certified_knn(*args, backend="cpp"):
    return _certified("knn_certified", lambda: knn(*args, backend=backend, strategy="certified"), backend)


def certified_self_knn(*args, backend="cpp"):
    return _certified("self_knn_certified", lambda: self_knn(*args, backend=backend, strategy="certified"), backend)


def check_same_knn(x, y, k, metric, strategy_result=None, min_covered=0.5, backend="cpp"):
    """Certified vs direct on `backend` within the tolerance; returns (rows covered, rows)."""
    dc, ic = strategy_result or certified_knn(x, y, k, metric, backend=backend)
    dd, idd = knn(x, y, k, metric, backend=backend, strategy="direct")
    dtype = dd.dtype
    tau = row_tolerance(x.cpu(), y.cpu(), metric, dtype).to(dd.device)
    assert dc.dtype == dd.dtype and ic.dtype == torch.long
    gap = (squared(dc.double(), metric) - squared(dd.double(), metric)).abs()
    assert bool((gap <= tau[:, None]).all()), f"distances differ by up to {float(gap.max()):.3g}"
    # Rows where the direct path's first k + 1 distances are more than 2 tau apart.
    wider, _ = knn(x, y, min(k + 1, len(y)), metric, backend=backend, strategy="direct")
    steps = squared(wider.double(), metric).diff(dim=1)
    unambiguous = (steps > 2 * tau[:, None]).all(dim=1)
    assert torch.equal(ic[unambiguous], idd[unambiguous])
    covered = int(unambiguous.sum())
    print(
        f"certified == direct: indices equal in all {covered} unambiguous rows of {len(x)}; distances within tau "
        "in every row"
    )
    assert covered >= min_covered * len(x), f"only {covered} of {len(x)} rows unambiguous"
    return covered, len(x)


def gaussian(count, dim, seed, dtype=torch.float32):
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reid_like(num_query, num_gallery, seed=0):
    f = make_reid_features(
        num_query=num_query,
        num_gallery=num_gallery,
        num_ids=num_gallery // 20,
        num_distractors=num_gallery // 5,
        dim=256,
        seed=seed,
    )
    return torch.from_numpy(f.query), torch.from_numpy(f.gallery)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_random_rows_match_direct(metric):
    x, y = gaussian(150, 64, 0), gaussian(2300, 64, 1)  # two column tiles
    covered, rows = check_same_knn(x, y, 10, metric)
    assert covered > 0.9 * rows


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reid_like_features_match_direct(metric):
    query, gallery = reid_like(120, 1500)
    x = query * 3.0 if metric == "euclidean" else query  # not unit rows: norms enter the formula
    result = torch.ops.dpm_ops.knn_certified(x, gallery, 21, metric)
    assert bool((result[2] >= 21).all()), "every row certified, none fell back"
    check_same_knn(x, gallery, 21, metric, result[:2])


def test_tie_heavy_exact_input_is_bitwise_identical():
    x, y = sign_rows(90, 16), sign_rows(700, 16, seed=1)
    for metric in ("euclidean", "sqeuclidean", "cosine"):
        certified = certified_knn(x, y, 37, metric, backend="cpp")
        direct = knn(x, y, 37, metric, backend="cpp", strategy="direct")
        assert torch.equal(certified[0], direct[0]) and torch.equal(certified[1], direct[1]), metric


def test_duplicate_heavy_rows_fall_back_and_match():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 32, generator=gen)
    y = torch.cat([base[torch.arange(40).repeat(30)], torch.randn(200, 32, generator=gen)])  # 30 copies each
    x = torch.cat([base[:10], torch.randn(10, 32, generator=gen)])
    k = 5
    _, _, counts = torch.ops.dpm_ops.knn_certified(x, y, k, "sqeuclidean")
    check_same_knn(x, y, k, "sqeuclidean", min_covered=0.0)
    # Copies of a row tie at its distance: 30 candidates each, certified (cap 256).
    assert bool((counts[:10] >= 30).all())
    # Far more copies than the cap: those rows fall back to the direct path, with the same result.
    others = 5 + torch.randn(100, 32, generator=gen)  # a cluster far from the copies
    many = torch.cat([base[:1].repeat(600, 1), others])
    x = torch.cat([base[:1], others[:2] + 0.1])
    _, _, counts = torch.ops.dpm_ops.knn_certified(x, many, k, "sqeuclidean")
    assert counts[0] == -1 and bool((counts[1:] > 0).all())
    check_same_knn(x, many, k, "sqeuclidean", min_covered=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_whose_log_overflows_before_their_nearest_arrive_are_rescanned(dtype):
    # 18,000 near-equidistant items first (within 1e-3 of each other, far inside the bound's width): while
    # a row's limit is theirs, every one is kept, and the rows overflow the 65,536-entry log (> 2 cap each);
    # their nearest items come last. The rows are then searched again from their final limit, where
    # only the near items are candidates: certified (a count >= k), not left to the direct path (-1).
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(4, 64, generator=gen), dim=1)
    far = torch.randn(64, generator=gen)
    far = 3 * far / far.norm() + 1e-3 * torch.randn(18_000, 64, generator=gen)
    near = (x[:, None, :] + 0.05 * torch.randn(4, 8, 64, generator=gen)).reshape(-1, 64)
    x, y = x.to(dtype), torch.cat([far, near]).to(dtype)
    for metric in ("euclidean", "sqeuclidean", "cosine"):
        values, indices, counts = torch.ops.dpm_ops.knn_certified(x, y, 5, metric)
        assert bool(((counts >= 5) & (counts <= 8)).all()), (metric, counts)
        assert bool((indices >= 18_000).all())  # the near items
        check_same_knn(x, y, 5, metric, strategy_result=(values, indices), min_covered=1.0)


@pytest.mark.parametrize("rows, cols, k", [(1, 1, 1), (4, 5, 5), (0, 3, 2), (7, 3, 3), (3, 130, 130)])
def test_tiny_and_k_at_least_n(rows, cols, k):
    x, y = gaussian(rows, 8, 4), gaussian(cols, 8, 5)
    certified = certified_knn(x, y, k, "euclidean", backend="cpp")
    assert certified[0].shape == (rows, k) and certified[1].shape == (rows, k)
    if rows:
        check_same_knn(x, y, k, "euclidean", certified, min_covered=0.0)


def test_single_column_rows():
    # at::_int_mm returns uninitialised memory for an inner size of 1 (torch 2.13); stage 1 pads it.
    x = torch.tensor([[1.0], [0.0], [0.0], [-2.0], [0.5]])
    lower, upper = torch.ops.dpm_ops.knn_certified_bounds(x, x, "euclidean")
    truth = (x - x.T).abs()
    assert bool((lower <= truth).all()) and bool((truth <= upper).all())
    for _ in range(5):  # the garbage differed from call to call
        _, _, row_max, _ = certified_self_knn(x, 1, "euclidean", backend="cpp")
        assert torch.equal(row_max, truth.amax(dim=1))
        check_same_knn(x, x, 2, "euclidean", min_covered=0.0)


def test_float64_and_non_contiguous_inputs():
    base = gaussian(300, 96, 6, torch.float64)
    x, y = base[:60, ::2], base.T.contiguous().T[60:, 1::2]  # strided views
    assert not x.is_contiguous() and not y.is_contiguous()
    d, i = certified_knn(x, y, 9, "euclidean", backend="cpp")
    assert d.dtype == torch.float64
    check_same_knn(x, y, 9, "euclidean", (d, i))
    x32 = gaussian(200, 64, 7)[:, ::2]
    check_same_knn(x32, gaussian(900, 32, 8).T.contiguous().T, 6, "cosine")


def test_distances_are_differentiable():
    x, y = gaussian(20, 16, 9).requires_grad_(), gaussian(200, 16, 10).requires_grad_()
    d, _ = certified_knn(x, y, 4, "euclidean", backend="cpp")
    d.sum().backward()
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    knn(x2, y2, 4, "euclidean", backend="cpp", strategy="direct")[0].sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(y.grad, y2.grad)


def check_same_self_knn(cert, direct, x, k, normalize, metric="sqeuclidean", min_covered=0.5):
    """self_knn certified (its first four outputs) vs direct within the tolerance (on squared distances
    for "euclidean"); at least `min_covered` of the rows unambiguous."""
    n = len(x)
    tau = row_tolerance(x.cpu(), x.cpu(), metric, torch.float32).to(direct[0].device)
    cert, direct = [[squared(t, metric) for t in out[:4]] + list(out[4:]) for out in (cert, direct)]
    torch.testing.assert_close(cert[2], direct[2], atol=float(tau.max()), rtol=0)  # row maxima
    torch.testing.assert_close(cert[3], direct[3], atol=float(tau.max()), rtol=0)  # the cross block
    assert bool(((cert[0] - direct[0]).abs() <= tau[:, None]).all())
    key = direct[0] / direct[2][:, None] if normalize else direct[0]
    unambiguous = (
        (key.diff(dim=1) > 4 * tau[:, None] / direct[2][:, None]).all(dim=1)
        if normalize
        else (key.diff(dim=1) > 2 * tau[:, None]).all(dim=1)
    )
    assert torch.equal(cert[1][unambiguous], direct[1][unambiguous])
    print(f"self_knn certified == direct: indices equal in all {int(unambiguous.sum())} unambiguous rows of {n}")
    assert int(unambiguous.sum()) > min_covered * n, f"{int(unambiguous.sum())} of {n} rows unambiguous"


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
def test_self_knn_matches_direct(normalize, metric):
    # cross_rows = q: the query x gallery tiles enter stage 1 as exact values (each metric's exact lines)
    query, gallery = reid_like(300, 2000, seed=2)
    x = torch.cat([query, gallery])
    q, k = len(query), 25
    cert = torch.ops.dpm_ops.self_knn_certified(x, k, metric, normalize, q)
    direct = self_knn(x, k, metric, normalize, q, backend="cpp", strategy="direct")
    assert bool((cert[4] >= k).all())
    # cosine distances of these features are small beside tau: fewer rows are unambiguous (~50% normalised)
    check_same_self_knn(cert, direct, x, k, normalize, metric, min_covered=0.4 if metric == "cosine" else 0.5)


def test_self_knn_with_k_past_the_insertion_buffer():
    # m = k + 4 > 64: a diagonal tile's m-th smallest upper bound comes from a selection on a copy
    query, gallery = reid_like(100, 1200, seed=4)
    x = torch.cat([query, gallery])
    cert = torch.ops.dpm_ops.self_knn_certified(x, 80, "sqeuclidean", True, len(query))
    direct = self_knn(x, 80, "sqeuclidean", True, len(query), backend="cpp", strategy="direct")
    assert bool((cert[4] >= 80).all())
    # 80 neighbours a row: few rows have all 80 gaps wider than the tolerance, so the distances decide
    check_same_self_knn(cert, direct, x, 80, True, min_covered=0.0)


def rows_too_short_to_normalise(wide_rows, dtype=torch.float32):
    """(rows, k) cases of cosine rows shorter than F.normalize's eps: the two-row case hypothesis found,
    `wide_rows` random rows with every 7th far below the eps, and a row of norm eps / 2, which normalises to
    norm 1/2: its formula self-distance 1 - 1/4 is above its distance to every other row (all within 60
    degrees of it), so taken as a lower bound it would hide the row maximum."""
    wide = gaussian(wide_rows, 8, seed=9, dtype=dtype)
    wide[::7] *= 1e-20
    near = torch.zeros(40, 8, dtype=dtype)
    near[:, 0] = 3
    near[1:, 1:] = 0.5 * gaussian(39, 7, seed=4, dtype=dtype)
    near[0, 0] = COSINE_EPS / 2
    assert bool((torch.nn.functional.normalize(near[1:], dim=1)[:, 0] > 0.5).all())
    return [(torch.tensor([[-1e15], [-4.343e-26]], dtype=dtype), 1), (wide, 5), (near, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
def test_self_knn_cosine_rows_too_short_to_normalise(dtype, normalize):
    """Cosine rows shorter than F.normalize's eps stay short, so the formula gives their distance to
    themselves as ~1, not 0. Stage 1 takes d(i, i) = 0 as the direct path does; with the formula's
    value the row's top (largest lower bound) came out ~1 and left the true row maximum out (hypothesis
    found the two-row case). Mixed with ordinary rows, in one diagonal tile and across tiles."""
    for rows, k in rows_too_short_to_normalise(1500, dtype):
        cert = torch.ops.dpm_ops.self_knn_certified(rows, k, "cosine", normalize, 0)
        direct = self_knn(rows, k, "cosine", normalize, 0, backend="cpp", strategy="direct")
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(cert[2], direct[2], atol=tolerance, rtol=0)  # the row maxima
        torch.testing.assert_close(cert[0], direct[0], atol=tolerance, rtol=0)


@pytest.mark.parametrize("shuffled", [False, True])
def test_self_knn_result_does_not_depend_on_threads(shuffled):
    """The threads share their limits between phases of tiles and each diagonal tile seeds its rows'
    limits: the search's work depends on the thread count and the rows' order, its result must not."""
    query, gallery = reid_like(300, 2600, seed=5)
    if shuffled:  # rows no longer grouped by identity: the diagonal tiles seed loose limits
        order = torch.randperm(len(gallery), generator=torch.Generator().manual_seed(5))
        gallery = gallery[order]
    x, q, k = torch.cat([query, gallery]), len(query), 21
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(torch.ops.dpm_ops.self_knn_certified(x, k, "sqeuclidean", True, q))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert bool((results[0][4] >= k).all())  # every row certified, none fell back
    direct = self_knn(x, k, "sqeuclidean", True, q, backend="cpp", strategy="direct")
    check_same_self_knn(results[0][:4], direct, x, k, True)


def test_self_knn_exact_input_is_bitwise_identical():
    x = sign_rows(1300, 16, seed=11)  # two tiles, split at cross_rows
    for normalize in (False, True):
        cert = certified_self_knn(x, 30, "euclidean", normalize, 500, backend="cpp")
        direct = self_knn(x, 30, "euclidean", normalize, 500, backend="cpp", strategy="direct")
        for a, b in zip(cert, direct):
            assert torch.equal(a, b)


def _adversarial_rows():
    gen = torch.Generator().manual_seed(12)
    offset = torch.randn(1, 48, generator=gen) * 1e3
    return {
        "large norms": (torch.randn(30, 48, generator=gen) * 1e15, torch.randn(200, 48, generator=gen) * 1e15),
        # x ~ y with a large common part: the squared distance cancels almost all of |x|^2 + |y|^2
        "cancellation": (
            offset + torch.randn(30, 48, generator=gen) * 1e-2,
            offset + torch.randn(200, 48, generator=gen) * 1e-2,
        ),
        "mixed magnitudes": (
            torch.randn(30, 48, generator=gen) * torch.logspace(-20, 10, 48),
            torch.randn(200, 48, generator=gen) * torch.logspace(-20, 10, 48),
        ),
        "tiny": (torch.randn(30, 48, generator=gen) * 1e-30, torch.randn(200, 48, generator=gen) * 1e-30),
    }


@pytest.mark.parametrize("case", list(_adversarial_rows()))
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_bound_contains_direct_and_float64_truth(case, metric):
    x, y = _adversarial_rows()[case]
    lower, upper = torch.ops.dpm_ops.knn_certified_bounds(x, y, metric)
    assert bool((lower <= upper).all())
    # The direct path's fp32 values, two summation orders (ATen's GEMM, the C++ kernel's tiles) ...
    for direct in (torch.ops.dpm_ops.knn(x, y, len(y), metric),):
        values = torch.empty_like(lower).scatter_(1, direct[1], direct[0])
        assert bool(((lower <= values) & (values <= upper)).all())
    reference = pairwise_distance_reference(x, y, metric)
    assert bool(((lower <= reference) & (reference <= upper)).all())
    # ... and the float64 truth, rounded to the compute dtype the direct path would produce from
    # an exact dot product: the same monotone formula, so it lies inside too.
    if metric == "cosine":
        xn = torch.nn.functional.normalize(x.double(), dim=1, eps=COSINE_EPS)  # the spec's v / max(|v|, eps)
        yn = torch.nn.functional.normalize(y.double(), dim=1, eps=COSINE_EPS)
        truth = 1 - xn @ yn.T
    else:
        sq_x, sq_y = x.pow(2).sum(1), y.pow(2).sum(1)  # the direct path's own fp32 norms
        truth = ((sq_x[:, None] + sq_y[None, :]).double() - 2 * (x.double() @ y.double().T)).clamp_min(0)
        truth = truth.sqrt() if metric == "euclidean" else truth
    slack = 4 * U32 * truth.abs() + 1e-300
    assert bool(((lower.double() <= truth + slack) & (truth - slack <= upper.double())).all())
    # The certified search on these inputs: the direct path's result (the Euclidean distances of the tiny
    # rows, whose squared norms underflow, are rounding noise on both paths: the public ops refuse them).
    if case == "tiny" and metric != "cosine":
        with pytest.raises(ValueError, match="knn: x and y are too small in magnitude for Euclidean distances"):
            knn(x, y, 7, metric, strategy="certified")
        return
    check_same_knn(x, y, 7, metric, min_covered=0.0)


def test_spiky_rows_quantise_poorly_and_stay_exact():
    # One large component per row sets the int8 scale, so the other components round to few levels:
    # the measured residual makes the bound wide, the search keeps more candidates (or falls back),
    # and the result is still the direct path's.
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 64, generator=gen), torch.randn(300, 64, generator=gen)
    x[torch.arange(40), torch.randint(0, 64, (40,), generator=gen)] = 400.0
    y[torch.arange(300), torch.randint(0, 64, (300,), generator=gen)] = 400.0
    for metric in ("euclidean", "cosine"):
        lower, upper = torch.ops.dpm_ops.knn_certified_bounds(x, y, metric)
        direct = torch.ops.dpm_ops.knn(x, y, len(y), metric)
        values = torch.empty_like(lower).scatter_(1, direct[1], direct[0])
        assert bool(((lower <= values) & (values <= upper)).all())
        check_same_knn(x, y, 6, metric, min_covered=0.0)


def test_inputs_where_stage1_would_not_pay_take_the_direct_path():
    # Isotropic random rows: every distance lies within the bound's width of the others, so a row keeps
    # hundreds of candidates (against 16,000 columns, near half the rows are over the cap of 256 and
    # would fall back after paying for stage 1). The probe of 32 rows sends such a call to the direct
    # path whole; clustered (re-ID-like) rows stay certified.
    x = torch.nn.functional.normalize(gaussian(300, 768, 8), dim=1)
    y = torch.nn.functional.normalize(gaussian(16000, 768, 9), dim=1)
    values, indices, counts = torch.ops.dpm_ops.knn_certified(x, y, 21, "euclidean")
    assert bool((counts == -1).all())
    direct = torch.ops.dpm_ops.knn(x, y, 21, "euclidean")
    assert torch.equal(indices, direct[1]) and torch.equal(values, direct[0])
    assert bool((torch.ops.dpm_ops.self_knn_certified(y, 21, "euclidean", False, 0)[4] == -1).all())
    query, gallery = reid_like(300, 4000, seed=2)
    assert bool((torch.ops.dpm_ops.knn_certified(query, gallery, 21, "euclidean")[2] >= 21).all())


def test_rows_too_long_for_exact_int32_sums_take_the_direct_path():
    # 133,001 features: 133,001 * 127^2 >= 2^31, so the int8 GEMM's sums could overflow.
    x, y = gaussian(2, 133_001, 1), gaussian(3, 133_001, 2)
    values, indices, counts = torch.ops.dpm_ops.knn_certified(x, y, 2, "euclidean")
    assert counts.tolist() == [-1, -1]
    direct = torch.ops.dpm_ops.knn(x, y, 2, "euclidean")
    assert torch.equal(indices, direct[1]) and torch.equal(values, direct[0])
    with pytest.raises(ValueError, match="too long"):
        torch.ops.dpm_ops.knn_certified_bounds(x, y, "euclidean")


def test_strategy_argument():
    x = gaussian(5, 4, 13)
    with pytest.raises(ValueError, match="strategy must be one of"):
        knn(x, x, 1, strategy="fast")
    with pytest.raises(ValueError, match="strategy must be one of"):
        self_knn(x, 1, strategy=None)
    with pytest.raises(ValueError, match="strategy='certified' runs on the C.. CPU kernels and on CUDA / Triton"):
        knn(x, x, 1, backend="reference", strategy="certified")
    with pytest.raises(ValueError, match="strategy='certified' runs on the C.. CPU kernels and on CUDA / Triton"):
        self_knn(x, 1, backend="reference", strategy="certified")


def test_rerank_features_certified_matches_direct(monkeypatch):
    from dpm_ops.evaluation import rerank_features

    query, gallery = reid_like(150, 1200, seed=4)
    ran = record_kernels(monkeypatch)
    certified = rerank_features(query, gallery, strategy="certified")
    assert ("self_knn_certified", "cpp") in ran  # its neighbour search was the certified one
    direct = rerank_features(query, gallery, strategy="direct")
    torch.testing.assert_close(certified, direct, rtol=0, atol=1e-5)  # rerank_features' own float tolerance
    with pytest.raises(ValueError, match="strategy must be one of"):
        rerank_features(query, gallery, strategy="approximate")


def test_auto_strategy_resolution():
    from dpm_ops.ops.knn import _CERTIFIED_MIN_WORK, _use_certified, int8_gemm_is_fast

    big = (1 << 15, 1 << 15, 1 << 10)
    assert big[0] * big[1] * big[2] >= _CERTIFIED_MIN_WORK
    # GPUs keep the direct path until the certified pipeline is timed on one; CPUs pick it where int8 is fast.
    assert not _use_certified("auto", "cuda", *big) and not _use_certified("auto", "triton", *big)
    assert _use_certified("auto", "cpp", *big) == int8_gemm_is_fast()
    assert not _use_certified("auto", "cpp", 100, 100, 16) and not _use_certified("direct", "cpp", *big)
    assert all(_use_certified("certified", name, 1, 1, 1) for name in ("cpp", "cuda", "triton"))
    with pytest.raises(ValueError, match="strategy='certified'"):
        _use_certified("certified", "reference", 1, 1, 1)


def test_auto_leaves_the_int8_gemm_where_it_is_a_scalar_loop():
    """torch's int8 GEMM runs on oneDNN's VNNI kernels only with torch.backends.mkldnn enabled (and AVX-512
    VNNI): elsewhere a scalar loop, and "auto" ran 7-16x slower than the direct path."""
    from dpm_ops.ops.knn import int8_gemm_is_fast

    with torch.backends.mkldnn.flags(enabled=False):
        assert int8_gemm_is_fast() == (int8_gemm_engine() == "amx")


_INEXACT_ONEDNN = (
    "import torch; from dpm_ops.ops import knn, int8_gemm_engine; g = torch.Generator().manual_seed(1); "
    "a, b = (torch.randint(-127, 128, (64, 128), generator=g, dtype=torch.int8) for _ in range(2)); "
    "exact = torch.equal(torch._int_mm(a, b.t()), (a.double() @ b.double().t()).int()); "
    "x, y = torch.rand(40, 64, generator=g), torch.rand(600, 64, generator=g); "
    "same = all(torch.equal(p, q) for p, q in zip(knn(x, y, 5, strategy='certified'), knn(x, y, 5, strategy='direct'))); "
    "print(exact, int8_gemm_engine(), same)"
)


def test_an_inexact_int8_gemm_is_not_used():
    """oneDNN held below VNNI (ONEDNN_MAX_CPU_ISA=AVX2, a common tuning setting) gives int8 sums that are not
    exact: stage 1's bounds did not hold and every row of uniform features got wrong neighbours. Its int8 GEMM is
    probed once: inexact, the certified search runs the direct path and int8_gemm_engine() says None."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", DPM_OPS_AMX="0")
    result = subprocess.run([sys.executable, "-c", _INEXACT_ONEDNN], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    exact, engine, same = result.stdout.split()
    assert engine == ("onednn" if exact == "True" else "None") and same == "True", result.stdout


def test_a_row_too_small_for_an_int8_scale_falls_back_alone():
    """A float32 row whose largest value lies below 127 / FLT_MAX (3.7e-37) had an infinite inverse scale: its
    zeros quantised to NaN and the whole call ran the direct path. Now its level is merely coarse."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 64, generator=g), torch.randn(500, 64, generator=g)
    y[3] = torch.randn(64, generator=g) * 1e-37
    y[4, :32] = 0.0
    y[4, 32:] = 1e-38
    values, indices, counts = torch.ops.dpm_ops.knn_certified(x, y, 5, "sqeuclidean")
    if int8_gemm_engine() is not None:
        assert bool((counts >= 0).all())  # stage 1 ran for every row
    direct = torch.ops.dpm_ops.knn(x, y, 5, "sqeuclidean")
    assert torch.equal(indices, direct[1])
    torch.testing.assert_close(values, direct[0], rtol=1e-6, atol=1e-5)


_BOUNDS_SUM = (
    "import torch, dpm_ops; g = torch.Generator().manual_seed(3); "
    "x, y = torch.randn(64, 96, generator=g), torch.randn(500, 96, generator=g); "
    "lo, up = torch.ops.dpm_ops.knn_certified_bounds(x, y, 'sqeuclidean'); "
    "print(repr(lo.double().sum().item()), repr(up.double().sum().item()))"
)


def _int8_gemm_cases():
    """Stage-1 results on shapes around the AMX kernel's blocks (32 rows / columns of output, 64 k, the
    1,024-row tiles of self_knn, cross_rows off the 16-row grid)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for rows, cols, dim in [(1, 1, 1), (33, 47, 3), (31, 65, 130), (257, 33, 64), (40, 1100, 65), (100, 1030, 768)]:
        x, y = torch.randn(rows, dim, generator=g), torch.randn(cols, dim, generator=g)
        out += torch.ops.dpm_ops.knn_certified_bounds(x, y, "sqeuclidean")
    x = torch.randn(1500, 40, generator=g)
    out += torch.ops.dpm_ops.self_knn_certified(x, 5, "sqeuclidean", True, 337)
    out += torch.ops.dpm_ops.knn_certified(x[:300, :35], x[300:, :35], 7, "cosine")
    return out


@pytest.mark.skipif(int8_gemm_engine() != "amx", reason="this process does not run the AMX int8 GEMM")
def test_amx_int8_gemm_equals_torchs_bitwise(monkeypatch):
    """The AMX tile kernel (csrc/knn/knn_int8_gemm_amx.h) and torch's int8 GEMM (DPM_OPS_AMX=0) both
    sum exactly in int32, so the bounds and the searches' results must be the same bit for bit."""
    amx = _int8_gemm_cases()
    monkeypatch.setenv("DPM_OPS_AMX", "0")
    assert int8_gemm_engine() == "onednn"
    onednn = _int8_gemm_cases()
    assert len(amx) == len(onednn) == 20
    for ours, theirs in zip(amx, onednn):
        assert torch.equal(ours, theirs)


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") in ("default", "avx2"), reason="the portable build already")
def test_portable_loops():
    """The stage-1 and stage-2 loops' portable build, chosen as torch's own kernels are, by
    ATEN_CPU_CAPABILITY=default: this module's tests rerun in a subprocess. On an AVX-512 machine
    (which runs the other build) its bounds come out in other roundings (no FMA) and so differ
    somewhere from this process's: the switch took effect."""
    portable = dict(os.environ, ATEN_CPU_CAPABILITY="default")

    def run(*args, env=None):
        result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert run("-c", _BOUNDS_SUM) != run("-c", _BOUNDS_SUM, env=portable)
    print(
        run("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "not portable", env=portable)[-300:]
    )
