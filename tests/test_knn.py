"""knn / self_knn (fused distance + top-k): every backend against the reference (knn_reference.py).

Features are rows of four +-1 entries (the rest 0): every distance and cosine is exact in float32
whatever the tiling, and equal values are everywhere, so indices are compared exactly, ties by
(value, index) included, straddling the k-th place.
"""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpm_ops
from conftest import backend_params, device_for, emulated_on_cpu, needs_gpu, op_for, record_launches, sign_rows
from dpm_ops.ops import knn, knn_reference, self_knn, self_knn_reference
from dpm_ops.ops.knn_reference import pairwise_distance_reference

KERNEL_BACKENDS = backend_params("cpp", "cuda", "triton")
ALL_BACKENDS = backend_params("reference", "cpp", "cuda", "triton")
METRICS = ("euclidean", "sqeuclidean", "cosine")


def random_rows(count, dim, seed, dtype=torch.float64):
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def interpreted(backend):
    return backend == "triton" and device_for(backend).type == "cpu"


# (M, N, k): one row, k = N, odd sizes across tile edges, empty x.
SHAPES = [(1, 1, 1), (1, 7, 3), (37, 75, 13), (30, 90, 90), (0, 5, 2), (65, 33, 1)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES)
def test_knn_matches_reference_exactly(backend, metric, shape):
    M, N, k = shape
    device = device_for(backend)
    x, y = sign_rows(M, 8, seed=M).to(device), sign_rows(N, 8, seed=N + 1).to(device)
    values, indices = knn(x, y, k, metric, backend=backend)
    expected_values, expected_indices = knn_reference(x, y, k, metric)
    assert values.shape == (M, k) and indices.shape == (M, k) and indices.dtype == torch.long
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_knn_large_and_float64(backend):
    if interpreted(backend):
        pytest.skip("the Triton interpreter is too slow for large shapes; they run on GPU")
    device = device_for(backend)
    x, y = sign_rows(700, 24, seed=3).to(device), sign_rows(5000, 24, seed=4).to(device)
    for k in (21, 40):  # register lists and shared-memory lists on the GPU
        torch.testing.assert_close(knn(x, y, k, backend=backend), knn_reference(x, y, k), rtol=0, atol=1e-6)
    x, y = random_rows(300, 33, 5).to(device), random_rows(2100, 33, 6).to(device)
    values, indices = knn(x, y, 7, "euclidean", backend=backend)
    expected_values, expected_indices = knn_reference(x, y, 7)
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-10)
    assert torch.equal(indices, expected_indices)  # random float64 data: no ties


@pytest.mark.skipif(not dpm_ops.backends()["cpp"][0], reason="the C++ extension is not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2000, 768), (700, 513), (5, 100_000), (3, 300_000)])
def test_cpp_squared_norms_are_torchs_bit_for_bit(shape, dtype, threads):
    """The C++ operands' squared norms, summed in chunks of rows (knn_operands.h), are (x * x).sum(1)
    bit for bit, whatever the thread count: against an all-zero row a sqeuclidean distance is the
    row's squared norm itself. The shapes cover several chunks, a last chunk of three rows, and one."""
    x = random_rows(*shape, seed=11, dtype=dtype) * torch.logspace(-3, 3, shape[0], dtype=dtype)[:, None]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, _ = knn(x, torch.zeros(1, shape[1], dtype=dtype), 1, "sqeuclidean", backend="cpp", strategy="direct")
        expected = (x * x).sum(1)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(values[:, 0], expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("k", [1, 40, 150])
def test_knn_ties_across_tiles_keep_index_order(backend, k):
    """Three copies of 50 rows: every value repeats in three column tiles of 64 (columns j, j + 50,
    j + 100), so a later tile offers pairs equal to kept ones, which lose by index; the first tile fills
    the lists; k 150 takes every column."""
    device = device_for(backend)
    base = sign_rows(50, 6, seed=12)
    x, y = sign_rows(20, 6, seed=13).to(device), base.repeat(3, 1).to(device)
    values, indices = knn(x, y, k, backend=backend)
    expected_values, expected_indices = knn_reference(x, y, k)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("k, dtype, rows", [(9, torch.float32, 32), (70, torch.float32, 16), (9, torch.float64, 16)])
def test_triton_knn_in_the_row_blocks_of_large_inputs(backend, k, dtype, rows, monkeypatch):
    """At scale a program takes up to 32 rows (16 for few rows: the grid fills the GPU). With one
    multiprocessor planned, small inputs take the large blocks too: a full one and a partial one."""
    from dpm_ops.triton import _device
    from dpm_ops.triton import knn as kernels

    launches = record_launches(monkeypatch, kernels, "_knn_kernel")
    monkeypatch.setattr(_device, "multiprocessors", lambda device: 1)
    device = device_for(backend)
    x, y = sign_rows(rows + 9, 8, seed=20, dtype=dtype).to(device), sign_rows(150, 8, seed=21, dtype=dtype).to(device)
    for metric in METRICS:
        values, indices = knn(x, y, k, metric, backend=backend)
        expected_values, expected_indices = knn_reference(x, y, k, metric)
        torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
        torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-6)
    assert [launch["BLOCK_M"] for launch in launches] == [rows] * len(METRICS)


@pytest.mark.parametrize("backend", backend_params("triton"))
@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 200),
    k_fraction=st.floats(0, 1),
    dim=st.sampled_from([4, 5, 8]),
    copies=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    metric=st.sampled_from(METRICS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    multiprocessors=st.sampled_from([1, 132]),
)
def test_triton_lists_match_the_reference_on_ties(
    backend, m, n, k_fraction, dim, copies, seed, metric, dtype, multiprocessors
):
    """The Triton lists (offer_tile) against the reference on exact, tie-heavy input: rows of four
    +-1 entries, columns repeated `copies` times across tiles, k from 1 to N, row blocks of 16 and
    32 (one multiprocessor planned: the largest blocks)."""
    from dpm_ops.triton import _device

    device = device_for(backend)
    y = sign_rows(-(-n // copies), dim, seed=seed + 1, dtype=dtype).repeat(copies, 1)[:n].to(device)
    x = sign_rows(m, dim, seed=seed, dtype=dtype).to(device)
    k = max(1, min(n, 256, round(k_fraction * n)))
    with mock.patch.object(_device, "multiprocessors", lambda device: multiprocessors):
        values, indices = knn(x, y, k, metric, backend=backend)
    expected_values, expected_indices = knn_reference(x, y, k, metric)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_knn_non_contiguous_and_half_inputs(backend):
    device = device_for(backend)
    x, y = sign_rows(20, 10, seed=7).to(device), sign_rows(50, 10, seed=8).to(device)
    x_strided = torch.stack([x, x], dim=2).flatten(1)[:, ::2]  # strided columns, same values as x
    y_transposed = y.t().contiguous().t()
    expected = knn_reference(x, y, 9)
    torch.testing.assert_close(knn(x_strided, y_transposed, 9, backend=backend), expected, rtol=0, atol=1e-6)
    values, indices = knn(x.half(), y.bfloat16(), 9, backend=backend)  # exact in half: computed in float32
    assert values.dtype == torch.float32
    torch.testing.assert_close((values, indices), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_fp32_follows_the_matmul_precision(backend, fp32_matmul_precision, monkeypatch):
    # Sign rows: every distance is exact in TF32 too, so the reference is matched exactly either way.
    from dpm_ops.triton import knn as kernels

    launches = record_launches(monkeypatch, kernels, "_knn_kernel")
    device = device_for(backend)
    x, y = sign_rows(37, 40, seed=9).to(device), sign_rows(75, 40, seed=10).to(device)
    for metric in METRICS:
        torch.testing.assert_close(
            knn(x, y, 13, metric, backend=backend), knn_reference(x, y, 13, metric), rtol=0, atol=1e-6
        )
    want = "ieee" if fp32_matmul_precision == "highest" else "tf32"
    assert {launch["PRECISION"] for launch in launches} == {want}
    knn(x.double(), y.double(), 3, backend=backend)
    assert launches[-1]["PRECISION"] == "ieee"  # fp64 stays fp64


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
def test_gpu_kernels_cap_k_at_256(backend):
    device = device_for(backend)
    x, y = sign_rows(2, 8, seed=11).to(device), sign_rows(300, 8, seed=12).to(device)
    kernel = {"cuda": "CUDA", "triton": "Triton"}[backend]
    with pytest.raises(ValueError, match=f"knn: the {kernel} kernel takes k <= 256, got 257"):
        knn(x, y, 257, backend=backend)
    # self_knn with normalize keeps k + 4 raw neighbours; strategy="certified" has no such cap
    with pytest.raises(ValueError, match=rf"self_knn: the {kernel} kernel takes k <= 252 with normalize .*, got 253"):
        self_knn(y, 253, normalize=True, backend=backend, strategy="direct")
    with pytest.raises(ValueError, match=f"self_knn: the {kernel} kernel takes k <= 256, got 257"):
        self_knn(y, 257, backend=backend, strategy="direct")


def neighbour_overlap(indices, expected):
    """The fraction of the expected neighbours found in each row's returned set."""
    return (indices[:, :, None] == expected[:, None, :]).any(dim=2).float().mean().item()


# fp32 distances under "highest" (IEEE fp32) and "high" (TF32 tensor cores) against fp64.
PRECISION_TOLERANCES = {"highest": {"atol": 1e-4, "rtol": 1e-5}, "high": {"atol": 2e-2, "rtol": 2e-3}}


@needs_gpu
@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("metric", METRICS)
def test_knn_cuda_float32_follows_the_matmul_precision(backend, precision, metric, float32_matmul_precision):
    float32_matmul_precision(precision)
    x, y = random_rows(300, 256, 40, torch.float32).cuda(), random_rows(3000, 256, 41, torch.float32).cuda()
    values, indices = knn(x, y, 20, metric, backend=backend)
    full = pairwise_distance_reference(x.double(), y.double(), metric)
    torch.testing.assert_close(values.double(), full.gather(1, indices), **PRECISION_TOLERANCES[precision])
    assert neighbour_overlap(indices, knn_reference(x.double(), y.double(), 20, metric)[1]) > 0.95
    assert bool((values[:, 1:] >= values[:, :-1]).all())


@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_knn_cuda_half_inputs_run_on_tensor_cores(backend, dtype, metric):
    # bf16 / fp16 operands, fp32 products: exact products of the rounded inputs for the Euclidean
    # metrics; for cosine the unit rows are rounded to the dtype too (a bf16 tolerance).
    x = random_rows(300, 64, 42, torch.float32).to(dtype).to(device_for(backend))
    y = random_rows(2000, 64, 43, torch.float32).to(dtype).to(device_for(backend))
    values, indices = knn(x, y, 40, metric, backend=backend)  # k > 32: the shared-memory lists
    assert values.dtype == torch.float32
    full = pairwise_distance_reference(x.double(), y.double(), metric)
    tol = {"atol": 1e-2, "rtol": 1e-2} if metric == "cosine" else {"atol": 1e-3, "rtol": 1e-4}
    torch.testing.assert_close(values.double(), full.gather(1, indices), **tol)
    assert neighbour_overlap(indices, knn_reference(x.double(), y.double(), 40, metric)[1]) > 0.9
    got = self_knn(x, 10, metric, True, 100, backend=backend)
    assert got[0].dtype == torch.float32 and bool((got[1][:, 0] == torch.arange(len(x), device=x.device)).all())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_knn_gradcheck_float64(backend, metric):
    device = device_for(backend)
    rows, k = ((3, 5), 2) if interpreted(backend) else ((5, 9), 4)  # each call costs ~0.1 s interpreted
    x = random_rows(rows[0], 4, 10).to(device).requires_grad_()
    y = random_rows(rows[1], 4, 11).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: knn(a, b, k, metric, backend=backend)[0], (x, y))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_knn_gradient_matches_reference(backend):
    device = device_for(backend)
    for metric in METRICS:
        x = random_rows(6, 5, 12)
        # rows of x repeated in y: zero distances, where the gradient is 0 as torch.cdist's (the
        # reference's square root had an infinite derivative there: NaN gradients)
        y = torch.cat([random_rows(11, 5, 13), x[:4]])
        x, y = x.to(device).requires_grad_(), y.to(device).requires_grad_()
        grad = random_rows(6, 3, 14).to(device)
        expected = torch.autograd.grad(knn_reference(x, y, 3, metric)[0], (x, y), grad)
        got = torch.autograd.grad(knn(x, y, 3, metric, backend=backend)[0], (x, y), grad)
        for g, e in zip(got, expected):
            assert torch.isfinite(e).all()
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_knn_bad_input_names_the_argument(backend):
    device = device_for(backend)
    x, y = sign_rows(3, 4).to(device), sign_rows(5, 4, seed=1).to(device)
    nan_x = x.clone()
    nan_x[1, 2] = float("nan")
    inf_y = y.clone()
    inf_y[0, 0] = float("inf")
    cases = [
        (lambda: knn(x, y, 6, backend=backend), "k must be an integer in \\[1, 5\\]"),  # k > rows of y
        (lambda: knn(x, y, 0, backend=backend), "k must"),
        (lambda: knn(x, y, True, backend=backend), "k must"),
        (lambda: knn(x, y, 2, "l1", backend=backend), "metric"),
        (lambda: knn(x[0], y, 2, backend=backend), "x must be 2-D"),
        (
            lambda: knn(x, y[:, :3], 2, backend=backend),
            "^knn: x and y must have the same feature dimension, got 4 and 3$",
        ),
        (lambda: knn(x.long(), y, 2, backend=backend), "x must be floating"),
        (lambda: knn(nan_x, y, 2, backend=backend), "x contains non-finite"),
        (lambda: knn(x, inf_y, 2, backend=backend), "y contains non-finite"),
        (lambda: knn(x, y[:0], 1, backend=backend), "k must"),  # empty y: no k is possible
        (lambda: self_knn(x, 4, backend=backend), "k must"),
        (lambda: self_knn(x, 2, cross_rows=4, backend=backend), "cross_rows"),
        (lambda: self_knn(nan_x, 2, backend=backend), "x contains non-finite"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_cpp_schema_checks_direct_calls():
    x = sign_rows(3, 4)
    with pytest.raises(ValueError, match="k must be in"):
        torch.ops.dpm_ops.knn(x, x, 4, "euclidean")
    with pytest.raises(ValueError, match="metric"):
        torch.ops.dpm_ops.self_knn(x, 2, "hamming", False, 0)


# ---- self_knn ------------------------------------------------------------------------------------

SELF_BACKENDS = backend_params("cpp", "cuda", "triton")


@pytest.mark.parametrize("backend", SELF_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("n, k, cross_rows", [(1, 1, 0), (2, 2, 1), (45, 7, 11), (300, 25, 60), (1500, 21, 400)])
def test_self_knn_matches_reference_exactly(backend, metric, normalize, n, k, cross_rows):
    # Ties everywhere: rows with equal values at the k-th place take the full-row fallback too.
    if n > 1000 and (emulated_on_cpu(backend) or interpreted(backend)):
        pytest.skip("too slow under the CUDA emulator and the Triton interpreter (300 rows cover the kernels' paths)")
    if n == 300 and (metric, normalize) != ("sqeuclidean", True) and interpreted(backend):
        pytest.skip("the Triton interpreter: 300 rows as re-ranking calls it only (the others at 45 rows)")
    x = sign_rows(n, 8, seed=n).to(device_for(backend))
    got = self_knn(x, k, metric, normalize, cross_rows, backend=backend)
    expected = self_knn_reference(x, k, metric, normalize, cross_rows)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    for g, e in zip((got[0], got[2], got[3]), (expected[0], expected[2], expected[3])):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", SELF_BACKENDS)
def test_self_knn_float64_non_contiguous_and_whole_blocks(backend):
    # float64 stays float64; a transposed view; the query x gallery block empty or all rows but one.
    device = device_for(backend)
    x = random_rows(70, 33, 40).to(device)
    for rows, (metric, normalize, cross_rows) in zip(
        (x, x.T.contiguous().T, x[:45], x[:45]),
        (("cosine", True, 20), ("sqeuclidean", False, 10), ("euclidean", True, 45), ("euclidean", False, 44)),
    ):
        got = self_knn(rows, 5, metric, normalize, cross_rows, backend=backend)
        expected = self_knn_reference(rows, 5, metric, normalize, cross_rows)
        assert got[0].dtype == torch.float64 and got[3].shape == expected[3].shape
        assert torch.equal(got[1], expected[1])  # random float64 rows: no ties
        for g, e in zip((got[0], got[2], got[3]), (expected[0], expected[2], expected[3])):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", SELF_BACKENDS)
@pytest.mark.parametrize("strategy", ["direct", "certified"])
def test_self_knn_normalize_finds_a_left_out_neighbour_that_rounding_ties(backend, strategy):
    # Dividing by the row maximum s can round distinct raw distances to one key. Row 0 (the origin) keeps
    # k + 4 = 6 raw neighbours: itself and five points at squared distance a. The point at a + 1, left out,
    # has the same key (a / s == (a + 1) / s in fp32) and a lower index, so it is the 2nd neighbour in
    # (key, index) order: only the recompute of rows the raw neighbours leave undecided finds it. Row 0's
    # distances are exact integers in fp32 on every path (squared norms below 2^24, s = 5018^2 even).
    a, s = 12_600_001, 5018.0**2
    assert torch.tensor(a / s, dtype=torch.float32) == torch.tensor(float(a)) / torch.tensor(s)
    assert torch.tensor(float(a)) / torch.tensor(s) == torch.tensor(float(a + 1)) / torch.tensor(s)
    at_a = torch.tensor([3549.0, 66, 12, 10])  # 3549^2 + 66^2 + 12^2 + 10^2 = a
    flips = torch.ones(5, 4)
    flips[torch.arange(1, 5), torch.arange(4)] = -1  # five points at distance a: at_a and four sign flips
    rows = [torch.zeros(4), torch.tensor([3549.0, 66, 14, 7]), *(flips * at_a), torch.tensor([5018.0, 0, 0, 0])]
    x = torch.nn.functional.pad(torch.stack(rows), (0, 4)).to(device_for(backend))
    assert (x * x).sum(1).tolist()[:7] == [0, a + 1, a, a, a, a, a]
    expected = self_knn_reference(x, 2, "sqeuclidean", True, 0)
    assert expected[1][0].tolist() == [0, 1]
    got = self_knn(x, 2, "sqeuclidean", True, 0, backend=backend, strategy=strategy)
    assert torch.equal(got[1][0], expected[1][0]) and torch.equal(got[0][0], expected[0][0])
    assert got[2][0] == s


@pytest.mark.parametrize("backend", [pytest.param("reference"), *SELF_BACKENDS])
def test_self_knn_outputs_carry_no_gradient(backend):
    # Before: the kernels' outputs required grad and backward left x.grad None (a warning only).
    x = random_rows(20, 8, 41).to(device_for(backend)).requires_grad_()
    assert not any(t.requires_grad for t in self_knn(x, 3, "euclidean", cross_rows=5, backend=backend))


@pytest.mark.parametrize("backend", SELF_BACKENDS)
def test_self_knn_random_features_are_symmetric(backend):
    # Random float32 features: the CPU kernel's d(i, j) and d(j, i) are one number (upper-triangle
    # tiles offered both ways) and d(i, i) = 0; the order matches the reference up to GEMM rounding.
    if emulated_on_cpu(backend) or interpreted(backend):
        pytest.skip("too slow under the CUDA emulator and the Triton interpreter; runs on GPU")
    x = random_rows(2500, 48, 20, torch.float32).to(device_for(backend))
    values, indices, row_max, cross = self_knn(x, 30, "sqeuclidean", True, 700, backend=backend)
    assert torch.equal(indices[:, 0], torch.arange(len(x), device=x.device)) and bool((values[:, 0] == 0).all())
    lookup = {}
    for i, (row_values, row_indices) in enumerate(zip(values.tolist(), indices.tolist())):
        for v, j in zip(row_values, row_indices):
            lookup[(i, j)] = v
    shared = [(i, j) for (i, j) in lookup if (j, i) in lookup]
    assert len(shared) > len(x)
    if backend == "cpp":
        assert all(lookup[(i, j)] == lookup[(j, i)] for i, j in shared)
    else:  # CUDA, Triton: every row in full, d(i, j) and d(j, i) are two GEMM entries
        assert all(math.isclose(lookup[(i, j)], lookup[(j, i)], rel_tol=1e-5, abs_tol=1e-4) for i, j in shared)
    expected_values, expected_indices, expected_max, expected_cross = self_knn_reference(
        x, 30, "sqeuclidean", True, 700
    )
    assert (indices == expected_indices).float().mean() > 0.999
    torch.testing.assert_close(row_max, expected_max, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cross, expected_cross, rtol=1e-5, atol=1e-4)


# Triton: test_knn_certified_gpu.py::test_autocast_leaves_the_pipelines_in_the_compute_type
@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_autocast_leaves_the_gemms_in_the_compute_type(backend):
    # The ops' own GEMMs must not be recast to bf16 by autocast: the same numbers with and without.
    device = device_for(backend)
    x, y = random_rows(40, 16, 50, torch.float32).to(device), random_rows(300, 16, 51, torch.float32).to(device)
    expected = knn(x, y, 5, backend=backend), self_knn(y, 5, "sqeuclidean", True, 10, backend=backend)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = knn(x, y, 5, backend=backend), self_knn(y, 5, "sqeuclidean", True, 10, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- op registration: opcheck and torch.compile -------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_knn_opcheck(backend):
    device = device_for(backend)
    x = random_rows(6, 5, 30).to(device).requires_grad_()
    y = random_rows(10, 5, 31).to(device).requires_grad_()
    for metric in METRICS:
        torch.library.opcheck(op_for("knn", backend), (x, y, 4, metric))


@pytest.mark.parametrize("backend", SELF_BACKENDS)
def test_self_knn_opcheck(backend):
    x = random_rows(20, 5, 32).to(device_for(backend))
    torch.library.opcheck(op_for("self_knn", backend), (x, 6, "sqeuclidean", True, 7))


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_opcheck_half_inputs(backend):
    # Direct calls with bfloat16 rows (the CUDA path takes them as they are): float32 distances,
    # and the fake functions say so.
    x = random_rows(6, 5, 33, torch.float32).to(torch.bfloat16).to(device_for(backend))
    y = random_rows(20, 5, 34, torch.float32).to(torch.bfloat16).to(device_for(backend))
    assert op_for("knn", backend)(x, y, 4, "euclidean")[0].dtype == torch.float32
    torch.library.opcheck(op_for("knn", backend), (x, y, 4, "euclidean"))
    torch.library.opcheck(op_for("self_knn", backend), (y, 4, "sqeuclidean", True, 3))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_knn_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = device_for(backend)
    x = random_rows(7, 6, 33).to(device).requires_grad_()
    y = random_rows(12, 6, 34).to(device).requires_grad_()

    def loss(x, y):
        values, indices = knn(x * 2, y, 5, "euclidean", backend=backend)
        return (values**2).sum() + indices.sum()

    value = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, y)
    torch.testing.assert_close(value, loss(x, y))
    got = torch.autograd.grad(value, (x, y))
    reference = knn_reference(x * 2, y, 5)
    want = torch.autograd.grad((reference[0] ** 2).sum(), (x, y))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_euclidean_gradient_is_zero_where_the_distance_cancels_to_zero(backend):
    # |x|^2 + |y|^2 - 2 x.y cancels to exactly 0 for these close rows (x != y): D = 0, whose gradient is 0
    # (the knn docstring), not (x - y) / 1
    device = device_for(backend)
    x = torch.tensor([[1000.0, 1000.0]], device=device, requires_grad=True)
    y = torch.tensor([[1000.0, 1000.0001], [0.0, 0.0]], device=device, requires_grad=True)
    distances, _ = knn(x, y, 1, "euclidean", backend=backend)
    assert distances.item() == 0
    for grad in torch.autograd.grad(distances.sum(), (x, y)):
        assert not grad.any()
