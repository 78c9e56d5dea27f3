"""The certified knn / self_knn on Triton (the interpreter without a GPU) and CUDA against their direct
paths, with the tolerance and row-coverage rule of test_knn_certified.py (docs/certified_knn.md, "GPU").

Sizes stay small: the Triton interpreter runs every tile in numpy on shared CPU cores.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_knn_certified import (
    _adversarial_rows,
    certified_knn,
    certified_self_knn,
    check_same_knn,
    check_same_self_knn,
    gaussian,
    rows_too_short_to_normalise,
    squared,
)

from benchmarks.reference.synthetic_features import make_reid_features
from conftest import backend_params, device_for, emulated_on_cpu, op_for, record_launches, sign_rows
from dpm_ops.ops import knn, knn_certified, self_knn
from dpm_ops.ops.knn_reference import COSINE_EPS, pairwise_distance_reference

GPU_BACKENDS = backend_params("triton", "cuda")


def on(backend, *tensors):
    device = device_for(backend)
    return [t.to(device) for t in tensors]


def reid_like(num_query, num_gallery, dim=64, seed=0):
    f = make_reid_features(
        num_query=num_query,
        num_gallery=num_gallery,
        num_ids=num_gallery // 20,
        num_distractors=num_gallery // 5,
        dim=dim,
        seed=seed,
    )
    return torch.from_numpy(f.query), torch.from_numpy(f.gallery)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_random_rows_match_direct(backend, metric):
    x, y = on(backend, gaussian(30, 32, 0), gaussian(160, 32, 1))  # several column tiles
    covered, rows = check_same_knn(x, y, 7, metric, backend=backend)
    assert covered > 0.9 * rows


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reid_like_features_match_direct(backend, metric):
    query, gallery = on(backend, *reid_like(30, 300))
    x = query * 3.0 if metric == "euclidean" else query  # not unit rows: norms enter the formula
    result = op_for("knn_certified", backend)(x, gallery, 11, metric)
    assert bool((result[2] >= 11).all()), "every row certified, none fell back"
    assert float(result[2].double().mean()) < 0.2 * len(gallery), "stage 1 prunes most columns"
    check_same_knn(x, gallery, 11, metric, result[:2], backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_duplicate_heavy_rows_fall_back_and_match(backend):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(8, 32, generator=gen)
    others = 5 + torch.randn(60, 32, generator=gen)  # a cluster far from the copies
    y = torch.cat([base[:1].repeat(300, 1), base[1:].repeat(4, 1), others])  # 300 copies: over the cap of 256
    x = torch.cat([base[:3], others[:2] + 0.1])
    x, y = on(backend, x, y)
    _, _, counts = op_for("knn_certified", backend)(x, y, 5, "sqeuclidean")
    assert counts[0] == -1 and bool((counts[1:] >= 5).all())
    assert counts[1] >= 4 and counts[2] >= 4  # the 4 copies of rows 1 and 2 tie: all candidates
    check_same_knn(x, y, 5, "sqeuclidean", min_covered=0.0, backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tie_heavy_exact_input_is_bitwise_identical(backend):
    x, y = on(backend, sign_rows(24, 16), sign_rows(150, 16, seed=1))
    for metric in ("euclidean", "sqeuclidean", "cosine"):
        certified = certified_knn(x, y, 9, metric, backend=backend)
        direct = knn(x, y, 9, metric, backend=backend, strategy="direct")
        assert torch.equal(certified[0], direct[0]) and torch.equal(certified[1], direct[1]), metric


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("rows, cols, k", [(1, 1, 1), (4, 5, 5), (0, 3, 2), (3, 20, 20)])
def test_tiny_and_k_at_least_n(backend, rows, cols, k):
    x, y = on(backend, gaussian(rows, 16, 4), gaussian(cols, 16, 5))
    certified = certified_knn(x, y, k, "euclidean", backend=backend)
    assert certified[0].shape == (rows, k) and certified[1].shape == (rows, k)
    if rows:
        check_same_knn(x, y, k, "euclidean", certified, min_covered=0.0, backend=backend)


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("k, rows", [(7, 64), (40, 64), (70, 32)])
def test_triton_stage1_in_the_row_blocks_of_large_inputs(backend, k, rows, monkeypatch):
    """At scale a program takes 64 or 32 rows (16 for few rows: the grid fills the GPU). With one
    multiprocessor planned, small inputs take the large blocks too: a full one and a partial one."""
    from dpm_ops.triton import _device
    from dpm_ops.triton import knn_certified as kernels

    limits = record_launches(monkeypatch, kernels, "_limits_kernel")
    collect = record_launches(monkeypatch, kernels, "_collect_kernel")
    monkeypatch.setattr(_device, "multiprocessors", lambda device: 1)
    x, y = on(backend, gaussian(rows + 9, 32, 14), gaussian(130, 32, 15))  # three column tiles, one partial
    check_same_knn(x, y, k, "euclidean", backend=backend)
    if k <= 64:  # the 32-row self_knn costs the interpreter ~10 s; the limits kernel is the same code
        (z,) = on(backend, torch.cat([x, y]))
        cert = op_for("self_knn_certified", backend)(z, k, "sqeuclidean", False, len(x))
        direct = self_knn(z, k, "sqeuclidean", False, len(x), backend=backend, strategy="direct")
        check_same_self_knn(cert, direct, z, k, False)
    calls = 2 if k <= 64 else 1
    assert [launch["BLOCK_M"] for launch in limits] == [rows] * calls
    assert [launch["BLOCK_M"] for launch in collect] == [64] * calls


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidate_distance_kernels_match_the_torch_version(backend, metric, dtype):
    """Stage 2's fused kernels (Triton's, CUDA's) against the torch version (the op's CPU kernel): counts
    from 0 to past one block of 64, padding N, the diagonal of self pairs, D across the 64-wide chunks
    and the 32 lanes."""
    gen = torch.Generator().manual_seed(17)
    n, width = 90, 150
    counts = torch.tensor([0, 1, 63, 64, 65, 150, 7, 128])
    rows = torch.randint(0, n, (len(counts),), generator=gen)
    candidates = torch.randint(0, n, (len(counts), width), generator=gen)
    candidates[:, 0] = rows  # each row's own pair first (0 in self_knn)
    candidates = candidates.masked_fill(torch.arange(width) >= counts[:, None], n)
    for x, exact in ((gaussian(n, 100, 18, dtype), False), (sign_rows(n, 100, seed=19, dtype=dtype), True)):
        xo = knn_certified.Operand.of(on(backend, x)[0], metric, dtype)
        args = (xo.rows, xo.rows, xo.norms, xo.norms, *on(backend, rows, candidates, counts), metric)
        for self_pairs in (False, True):
            if backend == "triton":
                got = knn_certified.TRITON.distances(*args, self_pairs)
            else:
                got = op_for("knn_certified_candidate_distances", backend)(*args, self_pairs)
            expected = knn_certified.candidate_distances(*args, self_pairs)
            assert got.dtype == dtype and bool((got.isinf() == (candidates >= n).to(got.device)).all())
            if exact:  # every product and sum exact: any order gives the same bits
                assert torch.equal(got, expected)
            else:  # within the rounding of the distance computation (squared: euclidean's sqrt magnifies it near 0)
                tau = 2 * x.shape[1] * torch.finfo(dtype).eps * 2 * float(xo.norms.max())
                both = got.isfinite()
                torch.testing.assert_close(
                    squared(got[both], metric), squared(expected[both], metric), rtol=0, atol=tau
                )
            if self_pairs:
                assert bool((got[counts > 0, 0] == 0).all())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_float64_and_non_contiguous_inputs(backend):
    (base,) = on(backend, gaussian(160, 64, 6, torch.float64))
    x, y = base[:30, ::2], base.T.contiguous().T[30:, 1::2]  # strided views
    assert not x.is_contiguous() and not y.is_contiguous()
    d, i = certified_knn(x, y, 6, "euclidean", backend=backend)
    assert d.dtype == torch.float64  # stage 2 in fp64
    check_same_knn(x, y, 6, "euclidean", (d, i), backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_distances_are_differentiable(backend):
    x, y = on(backend, gaussian(10, 16, 9), gaussian(80, 16, 10))
    x, y = x.requires_grad_(), y.requires_grad_()
    certified_knn(x, y, 4, "euclidean", backend=backend)[0].sum().backward()
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    knn(x2, y2, 4, "euclidean", backend=backend, strategy="direct")[0].sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(y.grad, y2.grad)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_self_knn_matches_direct(backend, normalize):
    query, gallery = reid_like(30, 140, seed=2)
    (x,) = on(backend, torch.cat([query, gallery]))
    q, k = len(query), 10
    cert = op_for("self_knn_certified", backend)(x, k, "sqeuclidean", normalize, q)
    direct = self_knn(x, k, "sqeuclidean", normalize, q, backend=backend, strategy="direct")
    assert bool((cert[4] >= k).all())
    check_same_self_knn(cert, direct, x, k, normalize)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_self_knn_cosine_rows_too_short_to_normalise(backend, normalize):
    # as test_knn_certified.py's: rows below F.normalize's eps have a formula self-distance of ~1; stage 1
    # takes d(i, i) = 0, as the direct path, and the row maxima and neighbours stay the direct path's
    for rows, k in rows_too_short_to_normalise(150):
        (rows,) = on(backend, rows)
        cert = certified_self_knn(rows, k, "cosine", normalize, 0, backend=backend)
        direct = self_knn(rows, k, "cosine", normalize, 0, backend=backend, strategy="direct")
        torch.testing.assert_close(cert[2], direct[2], atol=1e-5, rtol=0)  # the row maxima
        torch.testing.assert_close(cert[0], direct[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_self_knn_exact_input_is_bitwise_identical(backend):
    (x,) = on(backend, sign_rows(90, 16, seed=11))
    for normalize in (False, True):
        cert = certified_self_knn(x, 8, "euclidean", normalize, 30, backend=backend)
        direct = self_knn(x, 8, "euclidean", normalize, 30, backend=backend, strategy="direct")
        for a, b in zip(cert, direct):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_self_knn_duplicates_fall_back(backend):
    gen = torch.Generator().manual_seed(5)
    # 262 copies (their ties overflow the cap of 256) between two clusters (certified: the copies are
    # neither their rows' nearest nor their farthest).
    side = torch.zeros(1, 16)
    side[0, 0] = 20
    x = torch.cat(
        [
            0.1 * torch.randn(1, 16, generator=gen).repeat(262, 1),
            side + torch.randn(10, 16, generator=gen),
            -side + torch.randn(10, 16, generator=gen),
        ]
    )
    (x,) = on(backend, x)
    cert = certified_self_knn(x, 4, "euclidean", True, 10, backend=backend)
    direct = self_knn(x, 4, "euclidean", True, 10, backend=backend, strategy="direct")
    counts = op_for("self_knn_certified", backend)(x, 4, "euclidean", True, 10)[4]
    assert bool((counts[:262] == -1).all()) and bool((counts[262:] >= 4).all())
    torch.testing.assert_close(cert[2], direct[2], atol=1e-4, rtol=0)
    torch.testing.assert_close(cert[0], direct[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("strategy", ["certified", "direct"])
def test_autocast_leaves_the_pipelines_in_the_compute_type(backend, strategy):
    # Autocast reaches into a custom op's Python kernel (the certified pipeline, the Triton twins): their
    # own matmuls (the query x gallery block, the fallback rows, the rows the normalised order leaves
    # undecided) must stay in fp32 under it, as the C++ kernels' do (csrc/common/no_autocast.h).
    gen = torch.Generator().manual_seed(6)
    copies = torch.randn(1, 16, generator=gen).repeat(262, 1)  # over the cap of 256, and ties at the k-th place
    (x,) = on(backend, torch.cat([torch.randn(40, 16, generator=gen), copies]))
    expected = (
        self_knn(x, 4, "euclidean", True, 30, backend=backend, strategy=strategy),
        knn(x[:30], x[30:], 5, backend=backend, strategy=strategy),
    )
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        got = (
            self_knn(x, 4, "euclidean", True, 30, backend=backend, strategy=strategy),
            knn(x[:30], x[30:], 5, backend=backend, strategy=strategy),
        )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- the tensor-core bound ------------------------------------------------------------------------


def test_bound_constant_by_hand():
    # D = 768: operands 2v + v^2 (v = 2^-8 + 2^-23), accumulation gamma_768 at the unit given, times
    # (1 + v)^2, and the direct path's gamma_768 at 2^-24.
    v, g24 = 2.0**-8 + 2.0**-23, 768 * 2.0**-24 / (1 - 768 * 2.0**-24)
    g21 = 768 * 2.0**-21 / (1 - 768 * 2.0**-21)
    assert knn_certified.stage1_constant(768, 2.0**-24) == pytest.approx(g24 * (1 + v) ** 2 + 2 * v + v * v + g24)
    gpu = knn_certified.stage1_constant(768)  # truncating tensor-core accumulation
    assert gpu == pytest.approx(g21 * (1 + v) ** 2 + 2 * v + v * v + g24)
    assert 2 * knn_certified.BF16_OPERAND_UNIT < gpu < 0.0083


@pytest.mark.parametrize("case", list(_adversarial_rows()))
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_gpu_bound_contains_float64_truth(case, metric):
    x, y = _adversarial_rows()[case]
    xo, yo = knn_certified.Operand.of(x, metric, torch.float32), knn_certified.Operand.of(y, metric, torch.float32)
    lower, upper = knn_certified.stage1_bounds(*knn_certified.stage1_args(xo, yo), metric)
    assert bool((lower <= upper).all())
    # Every fp32 summation of the exact products lies inside: the reference's GEMM, a sequential sum,
    # and the float64 truth rounded by the same monotone formula.
    for dots in (x @ y.T, (x[:, None, :] * y[None]).cumsum(-1)[..., -1]):
        if metric == "cosine":
            dots = (
                torch.nn.functional.normalize(x, dim=1, eps=COSINE_EPS)
                @ torch.nn.functional.normalize(y, dim=1, eps=COSINE_EPS).T
            )
        values = knn_certified.distance(dots, xo.norms[:, None], yo.norms[None, :], metric)
        assert bool(((lower <= values) & (values <= upper)).all())
    reference = pairwise_distance_reference(x, y, metric)
    assert bool(((lower <= reference) & (reference <= upper)).all())
    xd, yd = x.double(), y.double()
    if metric == "cosine":
        truth = 1 - torch.nn.functional.normalize(xd, dim=1) @ torch.nn.functional.normalize(yd, dim=1).T
    else:
        truth = ((xo.norms[:, None] + yo.norms[None, :]).double() - 2 * (xd @ yd.T)).clamp_min(0)
        truth = truth.sqrt() if metric == "euclidean" else truth
    slack = 4 * 2.0**-24 * truth.abs() + 1e-300
    assert bool(((lower.double() <= truth + slack) & (truth - slack <= upper.double())).all())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", ["large norms", "cancellation"])
def test_certified_search_on_adversarial_inputs(backend, case):
    x, y = on(backend, *_adversarial_rows()[case])
    for metric in ("sqeuclidean", "cosine"):
        check_same_knn(x[:12], y[:120], 5, metric, min_covered=0.0, backend=backend)


def test_rows_too_long_for_the_bound_are_computed_exactly():
    # D >= 2^20, past the dimension the bound is derived for (ops/knn_certified.MAX_DIM): no stage 1 (so
    # no GPU kernel runs here, on CPU tensors), every row by the exact fallback
    x, y = gaussian(2, knn_certified.MAX_DIM, 1), gaussian(3, knn_certified.MAX_DIM, 2)
    shorter = [knn_certified.Operand.of(t[:, :-1], "euclidean", torch.float32) for t in (x, y)]
    assert knn_certified.bound_applies(*shorter)
    assert not knn_certified.bound_applies(*(knn_certified.Operand.of(t, "euclidean", torch.float32) for t in (x, y)))
    values, indices, counts = knn_certified.knn_certified_rows(x, y, 2, "euclidean", knn_certified.TRITON)
    assert counts.tolist() == [-1, -1]
    expected = pairwise_distance_reference(x.double(), y.double(), "euclidean").topk(2, largest=False)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(values, expected.values.float(), atol=0, rtol=1e-5)
    with pytest.raises(ValueError, match=r"too long \(D >= 2\^20\)"):
        knn_certified.cuda_kernels(knn_certified.TRITON)["knn_certified_bounds"](x, y, "euclidean")


def test_truncating_accumulation_stays_inside():
    """Sums truncated toward zero (the tensor cores' worst case) of the bf16 products, in blocks of 4 with
    the accumulator: still inside the bound, whose accumulation unit is 2^-21."""
    gen = torch.Generator().manual_seed(21)
    x, y = 1 + torch.rand(6, 256, generator=gen), 1 + torch.rand(40, 256, generator=gen)  # no cancellation
    xo, yo = (
        knn_certified.Operand.of(x, "sqeuclidean", torch.float32),
        knn_certified.Operand.of(y, "sqeuclidean", torch.float32),
    )
    products = xo.bf16.double()[:, None, :] * yo.bf16.double()[None]  # exact
    acc = torch.zeros(products.shape[:2], dtype=torch.float64)
    for d0 in range(0, 256, 4):
        exact = acc + products[..., d0 : d0 + 4].sum(-1)
        nearest = exact.float()
        toward_zero = torch.nextafter(nearest, torch.zeros(1)).double()
        acc = torch.where(nearest.double().abs() > exact.abs(), toward_zero, nearest.double())
    err = (xo.scales[:, None] * yo.scales[None, :]).double()
    direct = x.double() @ y.double().T
    assert bool(((acc - direct).abs() <= err).all())
    # The accumulation alone, against the exact sum of the same products: within gamma'_D of their sum.
    accumulation = knn_certified.gamma(256, knn_certified.TENSOR_CORE_ACCUMULATION_UNIT) * products.abs().sum(-1)
    assert bool(((acc - products.sum(-1)).abs() <= accumulation).all())


def test_certified_strategy_errors():
    x = gaussian(5, 4, 13)
    with pytest.raises(ValueError, match="strategy='certified' runs on .* got backend 'reference'"):
        knn(x, x, 1, backend="reference", strategy="certified")
    with pytest.raises(ValueError, match="strategy='certified' runs on .* got backend 'reference'"):
        self_knn(x, 1, backend="reference", strategy="certified")


# ---- backend "cuda"'s pipeline (cuBLAS stage 1) on CPU tensors: its GEMM emulated by an IEEE fp32 GEMM
# of the bf16 values (exact products, fp32 sums), everything else as on the GPU ----------------------


def test_cublas_first_columns():
    """The cuBLAS path's candidate buffers: each row's first `cap` held columns ascending, padded with
    N, and its full count; rows with none, with more than cap, with all."""
    gen = torch.Generator().manual_seed(21)
    n, cap = 300, 16
    mask = torch.rand(7, n, generator=gen) < torch.tensor([0.0, 0.01, 0.05, 0.2, 1.0, 0.03, 0.5])[:, None]
    columns, counts = knn_certified._first_columns(mask, cap)
    assert columns.dtype == counts.dtype == torch.int32 and columns.shape == (7, cap)
    for r in range(7):
        held = mask[r].nonzero().squeeze(1)
        assert counts[r] == len(held)
        expected = torch.full((cap,), n)
        expected[: min(cap, len(held))] = held[:cap]
        assert torch.equal(columns[r].long(), expected), r


def _expected_candidates(lower, upper, k, cap, self_pairs):
    """Stage 1's rule row by row from the full bounds: near = L <= the k-th smallest U, far = U >= max L."""
    n = lower.shape[1]

    def first(held):
        columns = torch.full((cap,), n, dtype=torch.int32)
        columns[: min(cap, len(held))] = held[:cap].int()
        return columns, len(held)

    out = [[], [], [], []]
    for lo, up in zip(lower, upper):
        for i, (columns, count) in enumerate(
            [first((lo <= up.sort().values[k - 1]).nonzero().squeeze(1))]
            + ([first((up >= lo.max()).nonzero().squeeze(1))] if self_pairs else [])
        ):
            out[2 * i].append(columns)
            out[2 * i + 1].append(count)
    return [torch.stack(c) if c else None for c in out[0::2]], [torch.tensor(c) if c else None for c in out[1::2]]


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("self_pairs", [False, True])
def test_candidates_op_on_cpu(metric, self_pairs, monkeypatch):
    """dpm_ops::knn_certified_candidates's CPU kernel (the torch version, the model of the CUDA kernel)
    against the rule applied row by row, in row blocks of 7 rows (the diagonal's offset in each) and with
    a cap that some rows overflow."""
    monkeypatch.setattr(knn_certified, "_CHUNK_ELEMENTS", 7 * 130)
    query, gallery = reid_like(30, 100, seed=23)
    y = torch.cat([gallery, query[:1].repeat(30, 1)])  # near-duplicates of query row 0: over the cap
    x = y if self_pairs else query
    xo, yo = (knn_certified.Operand.of(v, metric, torch.float32) for v in (x, y))
    args = knn_certified.stage1_args(xo, yo)
    k, cap = 5, 24
    near, near_count, far, far_count = torch.ops.dpm_ops.knn_certified_candidates(*args, k, cap, metric, self_pairs)
    lower, upper = knn_certified.stage1_bounds(*args, metric, 0 if self_pairs else None)
    (e_near, e_far), (e_near_count, e_far_count) = _expected_candidates(lower, upper, k, cap, self_pairs)
    assert torch.equal(near, e_near) and torch.equal(near_count, e_near_count.int())
    assert bool((near_count > cap).any()) and bool((near_count <= cap).any())
    if self_pairs:
        assert torch.equal(far, e_far) and torch.equal(far_count, e_far_count.int())
    else:
        assert far.shape == (0, cap) and far_count.shape == (0,)


@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("k", [1, 7, 32, 33, 100, 256])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_candidates_match_the_torch_version(backend, k, metric, dtype):
    """The fused stage-1 kernel (knn_certified_kernels.cu) against its torch version on the same GPU and the
    same cuBLAS GEMM: the same buffers and counts, bitwise. Register (k <= 32) and shared-memory lists,
    rows over the cap, N not a multiple of the 256 columns a step, self pairs and not, exact ties."""
    if emulated_on_cpu(backend):  # ~20 min there
        pytest.skip("GPU-sized; under the CUDA emulator test_emulated_kernels.py checks the kernel on 300 rows")
    query, gallery = reid_like(40, 600, seed=24)
    for y in (torch.cat([gallery, query[:1].repeat(50, 1)]), sign_rows(650, 64, seed=25)):
        y = y.to(dtype)
        for self_pairs in (False, True):
            x = y if self_pairs else y[:45] * 1.5
            xo, yo = (knn_certified.Operand.of(on(backend, v)[0], metric, dtype) for v in (x, y))
            args = (*knn_certified.stage1_args(xo, yo), k, max(k, 60), metric, self_pairs)
            with knn_certified._fp32_reductions():
                got = op_for("knn_certified_candidates", backend)(*args)
                expected = knn_certified.candidates_torch(*args)
            for g, e, what in zip(got, expected, ("near", "near_count", "far", "far_count")):
                assert g.dtype == torch.int32 and torch.equal(g, e), (what, self_pairs)


@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_cuda_candidates_bad_input(backend):
    xo = knn_certified.Operand.of(on(backend, gaussian(20, 8, 26))[0], "euclidean", torch.float32)
    args = knn_certified.stage1_args(xo, xo)
    candidates = op_for("knn_certified_candidates", backend)
    with pytest.raises(ValueError, match="k must be in \\[1, 20\\], got 21"):
        candidates(*args, 21, 20, "euclidean", False)
    with pytest.raises(ValueError, match="cap must be in \\[1, rows of y = 20\\], got 0"):
        candidates(*args, 3, 0, "euclidean", False)
    with pytest.raises(ValueError, match="x must be 2-D bfloat16 rows"):
        candidates(xo.rows, *args[1:], 3, 8, "euclidean", False)
    with pytest.raises(ValueError, match="self_pairs needs x and y of as many rows"):
        candidates(args[0][:5], args[1], args[2][:5], args[3], args[4][:5], args[5], 3, 8, "euclidean", True)
    distances = op_for("knn_certified_candidate_distances", backend)
    rows, columns, counts = on(backend, torch.tensor([0, 1]), torch.tensor([[1, 2], [0, 20]]), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="x must be float32 or float64 rows, got BFloat16"):
        distances(xo.bf16, xo.rows, xo.norms, xo.norms, rows, columns, counts, "euclidean", False)
    with pytest.raises(ValueError, match="rows, candidates and counts must be integer tensors"):
        distances(xo.rows, xo.rows, xo.norms, xo.norms, rows, columns.float(), counts, "euclidean", False)
    with pytest.raises(ValueError, match="rows \\(R\\), candidates \\(R, C\\) and counts \\(R\\) expected"):
        distances(xo.rows, xo.rows, xo.norms, xo.norms, rows[:1], columns, counts, "euclidean", False)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_cublas_pipeline_matches_direct_on_cpu(metric):
    query, gallery = reid_like(60, 700, seed=7)
    result = knn_certified.knn_certified_rows(query, gallery, 9, metric, knn_certified.CUBLAS)
    assert bool((result[2] >= 9).all())
    check_same_knn(query, gallery, 9, metric, result[:2], backend="cpp")
    # 300 copies of query row 0: over the cap, that row is computed exactly; the others are certified.
    y = torch.cat([query[:1].repeat(300, 1), gallery[:100]])
    result = knn_certified.knn_certified_rows(query[:4], y, 5, metric, knn_certified.CUBLAS)
    assert result[2][0] == -1 and bool((result[2][1:] >= 5).all())
    check_same_knn(query[:4], y, 5, metric, result[:2], min_covered=0.0, backend="cpp")


@pytest.mark.parametrize("normalize", [False, True])
def test_cublas_pipeline_self_knn_on_cpu(normalize):
    query, gallery = reid_like(80, 500, seed=8)
    x = torch.cat([query, gallery])
    cert = knn_certified.self_knn_certified_rows(x, 12, "sqeuclidean", normalize, 80, knn_certified.CUBLAS, 600)
    direct = self_knn(x, 12, "sqeuclidean", normalize, 80, backend="cpp", strategy="direct")
    assert bool((cert[4] >= 12).all())
    check_same_self_knn(cert, direct, x, 12, normalize)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck(backend):
    x, y = on(backend, gaussian(6, 16, 14, torch.float64), gaussian(30, 16, 15, torch.float64))
    torch.library.opcheck(op_for("knn_certified", backend), (x.requires_grad_(), y, 3, "euclidean"))
    torch.library.opcheck(op_for("self_knn_certified", backend), (y, 4, "sqeuclidean", True, 10))


def test_rows_beyond_the_bound_are_computed_exactly():
    # Norms above 2^60 (fp64: their squares stay finite): no bound, every row takes the exact path.
    x, y = gaussian(5, 8, 16, torch.float64) * 1e20, gaussian(40, 8, 17, torch.float64) * 1e20
    values, indices, counts = knn_certified.knn_certified_rows(x, y, 3, "euclidean", knn_certified.CUBLAS)
    assert bool((counts == -1).all())
    check_same_knn(x, y, 3, "euclidean", (values, indices), min_covered=0.0, backend="cpp")
    with pytest.raises(ValueError, match="too large"):
        knn_certified._knn_certified_bounds_cuda(x, y, "euclidean")
    lower, upper = knn_certified._knn_certified_bounds_cuda(x[:, :4] * 1e-20, y[:, :4] * 1e-20, "cosine")
    assert lower.shape == (5, 40) and bool((lower <= upper).all())


def test_candidate_count_script_compares_both_bounds():
    """scripts/count_certified_candidates.py (docs/certified_knn.md's table of both bounds' candidate sets)
    at 1/25 of Market: the GPU pipeline's bound through its CPU kernels, with no fallback row."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "count_certified_candidates.py"
    result = subprocess.run(
        [sys.executable, str(script), "--scale", "0.04"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines() if "int8" in line or "bf16" in line]
    assert [row[2].strip() for row in rows] == ["int8 (CPU)", "bf16 (GPU)"] * 3
    assert all(row[5].strip() == "0.0000" and float(row[3]) >= 10 for row in rows)
