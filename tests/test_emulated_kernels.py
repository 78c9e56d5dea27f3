"""The CUDA code of dpm_ops run on the CPU under the emulator (tests/cuda_emulation): the kernels' own
code, barriers and warp collectives, a block's threads taking turns in a fixed order.

* Every op's CUDA entry point (ATen preparation, cuBLAS's GEMMs as ATen CPU GEMMs, the kernels) as
  dpm_ops_emulated::<op> on the samples of test_op_declarations, against the op's C++ CPU kernel, under
  both schedules (breadth first, depth first: a warp running ahead shows a missing __syncthreads).
* The knn kernels, launched directly: the selection kernel of the direct knn and the certified
  search's stage-1 and stage-2 kernels, bitwise against the torch computations they stand for (the GPU
  tests, tests/test_knn_certified_gpu.py, check them on a GPU against the same torch versions), and the
  certified pipeline of backend "cuda" on them.
"""

import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_knn_certified import check_same_knn, gaussian
from test_knn_certified_gpu import reid_like
from test_op_declarations import ARCFACE_OPTIONS, SAMPLES, _neighbours, _randn

from conftest import sign_rows
from cuda_emulation import emulate
from dpm_ops import _backend
from dpm_ops.ops import hierarchical_mask_pool, knn_certified, masked_cosine, self_knn
from dpm_ops.ops._declare import DECLARED

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator builds with g++")
METRICS = {"euclidean": 0, "sqeuclidean": 1, "cosine": 2}  # knn::Metric
DTYPES = {torch.float32: 0, torch.float64: 1}  # dpm_ops::Dtype


# The ops whose CUDA kernels are written in Python (ops/knn_certified.py: the pipeline around the two
# stage ops, emulated): their candidate counts differ from the CPU kernels' (int8 stage 1 there), so they
# are checked on their own (test_cuda_certified_pipeline_on_the_emulated_stage_kernels).
PYTHON_CUDA_KERNELS = {"knn_certified", "self_knn_certified", "knn_certified_bounds"}
SCHEDULES = {"breadth first": 0, "depth first": 1}


@pytest.fixture(scope="module")
def emulated():
    """The emulated library; meanwhile torch fills the memory it allocates with NaN (integers with their
    largest value), so that an output element that no kernel writes shows."""
    library = emulate.build()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield library
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill
    library.set_schedule(SCHEDULES["breadth first"])


def _outputs(op, args) -> list:
    """What `op` returns on `args`, and its tensor arguments after the call (an in-place op's outputs)."""
    result = op(*args)
    return [result, [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]]


def test_every_cuda_entry_point_is_emulated(emulated):
    emulated_ops = {
        name for name in DECLARED if torch._C._dispatch_has_kernel_for_dispatch_key(f"{emulate.LIBRARY}::{name}", "CPU")
    }
    assert emulated_ops == set(DECLARED)


# The certified search's stage ops take their own dtypes (bf16 rows, fp32 scales): their samples only.
OWN_DTYPES = {"knn_certified_candidates", "knn_certified_candidate_distances"}


def _cast(value, dtype):
    """The sample with its float64 tensors in `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype == torch.float64 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", sorted(set(DECLARED) - PYTHON_CUDA_KERNELS))
def test_cuda_entry_point_matches_the_cpu_kernel(emulated, name, schedule, dtype):
    """The op's CUDA code path on its samples against its C++ CPU kernel: fp64 and fp32 within the usual
    tolerance, fp16 / bf16 (where the CPU kernel takes them) within the GPU tests' 2e-2 (the CUDA paths
    run their GEMMs on operands in the input's dtype)."""
    if name in OWN_DTYPES and dtype != torch.float64:
        pytest.skip("the certified search's stage ops take their own dtypes")
    emulated.set_schedule(SCHEDULES[schedule])
    try:
        expected = _outputs(getattr(torch.ops.dpm_ops, name), _cast(SAMPLES[name](), dtype))
    except ValueError as error:
        pytest.skip(f"the CPU kernel does not take {dtype}: {error}")
    got = _outputs(emulate.emulated_op(name), _cast(SAMPLES[name](), dtype))
    half = dtype in (torch.float16, torch.bfloat16)
    torch.testing.assert_close(got, expected, **({"atol": 2e-2, "rtol": 2e-2} if half else {}))


def _large_csr(n=80, width=30):
    """kreciprocal's CSR sets of n rows (k1 20, k1 / 2 10) and their values."""
    expand = DECLARED["kreciprocal_expand"].run(
        _backend.resolve(None, torch.device("cpu")), _neighbours(n, width), 20, 10
    )
    return (*expand, torch.rand(len(expand[1]), generator=torch.Generator().manual_seed(31)))


def _large_pair_sqdist_args():
    x = _randn(80, 24, seed=5).float()
    values, indices, _, _ = self_knn(x, 30, "sqeuclidean")
    return (x, values, indices, *_large_csr()[:2])


def _large_masked_cosine():
    return _randn(40, 300), _randn(40, 300, seed=1).sigmoid(), _randn(50, 300, seed=2)


def _large_pool_features():
    return [_randn(3, 300, 6, 5, seed=1), _randn(3, 40, 3, 7, seed=2)]


# Larger arguments than SAMPLES' for the ops with loops over a block's threads: rows and channels past
# 256, several blocks, per-row loops of many steps.
LARGE_SAMPLES = {
    "batch_hard_triplet": lambda: (_randn(70, 40), torch.arange(70) % 9, True),
    "hem_loss": lambda: (_randn(4, 6, 300), 1e-6, "sum"),
    "hem_loss_backward": lambda: (torch.tensor(0.5, dtype=torch.float64), _randn(4, 6, 300), 1e-6, "mean"),
    "hierarchical_mask_pool": lambda: (_large_pool_features(), _randn(3, 1, 16, 12).sigmoid(), "avg"),
    "hierarchical_mask_pool_backward": lambda: (
        _randn(3, 340),
        _large_pool_features(),
        None,
        hierarchical_mask_pool(_large_pool_features(), None, "max"),
        "max",
    ),
    "kreciprocal_expand": lambda: (_neighbours(80, 30), 20, 10),
    "kreciprocal_pair_sqdist": _large_pair_sqdist_args,
    "kreciprocal_query_expansion": lambda: (*_large_csr(), _neighbours(80, 30)[:, :6].contiguous()),
    "kreciprocal_jaccard_blend_": lambda: (
        torch.rand(20, 60, generator=torch.Generator().manual_seed(32)),
        *_large_csr(),
        0.3,
    ),
    "gnn_propagate": lambda: (*_large_csr(), _neighbours(80, 30)[:, :7].contiguous(), _randn(80, 7, seed=35).float()),
    "gnn_similarity_": lambda: (torch.rand(20, 60, generator=torch.Generator().manual_seed(36)), *_large_csr(), 0.3),
    "match_ranks": lambda: (
        torch.rand(20, 300, generator=torch.Generator().manual_seed(33)),
        *(torch.randint(0, 12, (320,), generator=torch.Generator().manual_seed(34)).split([20, 300])),
        *((torch.arange(320) % 5).split([20, 300])),
    ),
    "roc_counts": lambda: (  # several blocks; ties, and distances crowded near 0: bins with several match distances
        (torch.rand(40, 300, generator=torch.Generator().manual_seed(37)) ** 8 * 4096).round() / 4096,
        *(torch.randint(0, 12, (340,), generator=torch.Generator().manual_seed(38)).split([40, 300])),
        *((torch.arange(340) % 5).split([40, 300])),
    ),
    "knn": lambda: (_randn(40, 24), _randn(300, 24, seed=1), 40, "euclidean"),
    "self_knn": lambda: (_randn(300, 24), 40, "sqeuclidean", True, 20),
    "masked_cosine": lambda: (*_large_masked_cosine(), 1e-12),
    "masked_cosine_train": lambda: (*_large_masked_cosine(), 1e-12),
    "masked_cosine_backward": lambda: (
        _randn(40, 50),
        *_large_masked_cosine(),
        masked_cosine(*_large_masked_cosine()),
        None,
        1e-12,
    ),
    "masked_arcface_ce": lambda: (
        _randn(40, 300),
        _randn(40, 300, seed=1).sigmoid(),
        _randn(70, 300, seed=2),
        torch.arange(40) % 70,
        *ARCFACE_OPTIONS,
        True,
    ),
    "maskreid_ranking_loss": lambda: (
        torch.nn.functional.normalize(_randn(70, 40)),
        torch.arange(70) % 9,
        0.15,
        2.0,
        "literal",
        "hardest",
    ),
    "maskreid_ranking_loss_backward": lambda: (torch.tensor(0.5, dtype=torch.float64), _randn(70, 40), _randn(70, 70)),
}


@pytest.mark.parametrize("name", sorted(LARGE_SAMPLES))
def test_cuda_entry_point_on_larger_inputs(emulated, name):
    emulated.set_schedule(SCHEDULES["depth first"])
    got = _outputs(emulate.emulated_op(name), LARGE_SAMPLES[name]())
    expected = _outputs(getattr(torch.ops.dpm_ops, name), LARGE_SAMPLES[name]())
    torch.testing.assert_close(got, expected)


def _wide_csr(num_query=3, num_gallery=24600, per_row=4):
    """A CSR over a gallery too wide for the query x gallery sums kernel's shared memory (24,576 floats):
    its sums in global memory. Rows of `per_row` ascending columns among the first 50 items (shared often)."""
    gen = torch.Generator().manual_seed(37)
    rows = num_query + num_gallery
    cols = torch.rand(rows, 50, generator=gen).argsort(dim=1)[:, :per_row].sort(dim=1).values.flatten()
    row_ptr = torch.arange(0, rows * per_row + 1, per_row)
    return row_ptr, cols, torch.rand(len(cols), generator=gen), torch.rand(num_query, num_gallery, generator=gen)


@pytest.mark.parametrize("name", ["gnn_similarity_", "kreciprocal_jaccard_blend_"])
def test_query_gallery_sums_in_global_memory(emulated, name):
    row_ptr, cols, values, out = _wide_csr()
    got = _outputs(emulate.emulated_op(name), (out.clone(), row_ptr, cols, values, 0.3))
    expected = _outputs(getattr(torch.ops.dpm_ops, name), (out.clone(), row_ptr, cols, values, 0.3))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _no_entries(rows=6):
    return torch.zeros(rows + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)


# Ragged outputs without a single entry (their tensors' data pointers are null): the fill passes must not
# take them for the count passes.
EMPTY_OUTPUTS = {
    "gnn_propagate": lambda: (*_no_entries(), torch.arange(6)[:, None].repeat(1, 2), torch.ones(6, 2)),
    "kreciprocal_query_expansion": lambda: (*_no_entries(), torch.arange(6)[:, None].repeat(1, 2)),
    # each item's 2 neighbours the next two: no pair is reciprocal, every R* is empty
    "kreciprocal_expand": lambda: ((torch.arange(6)[:, None] + torch.tensor([1, 2])) % 6, 1, 0),
}


@pytest.mark.parametrize("name", sorted(EMPTY_OUTPUTS))
def test_cuda_entry_point_with_an_empty_output(emulated, name):
    got = _outputs(emulate.emulated_op(name), EMPTY_OUTPUTS[name]())
    expected = _outputs(getattr(torch.ops.dpm_ops, name), EMPTY_OUTPUTS[name]())
    assert expected[0][-1].numel() == 0  # no entries indeed
    torch.testing.assert_close(got, expected)


def _roc_labels(q_pids, g_pids, q_camids, g_camids):
    return tuple(torch.tensor(labels) for labels in (q_pids, g_pids, q_camids, g_camids))


ROC_EDGE_CASES = {
    "no match": (torch.rand(2, 3), *_roc_labels([1, 2], [1, 2, 3], [0, 0], [0, 0, 1])),  # pid 1, 2: own camera
    "no non-match": (torch.rand(2, 3), *_roc_labels([1, 1], [1, 1, 1], [0, 1], [1, 0, 2])),
    "a NaN": (torch.tensor([[0.5, float("nan")], [0.1, 0.2]]), *_roc_labels([1, 1], [1, 2], [0, 0], [1, 1])),
    "fp64 beyond its range": (
        torch.tensor([[-1e308, 1e308, 0.0]] * 2),
        *_roc_labels([1, 2], [1, 2, 3], [0, 0], [1, 1, 1]),
    ),
    "every non-match above the matches": (
        torch.tensor([[0.1, 0.2, 0.9, 0.8]]),
        *_roc_labels([1], [1, 1, 2, 3], [0], [1, 2, 1, 1]),
    ),
}


@pytest.mark.parametrize("case", ROC_EDGE_CASES)
def test_roc_counts_edge_cases(emulated, case):
    # the CUDA entry point counts the top bucket apart from bincount's: here every non-match or none lands there
    args = ROC_EDGE_CASES[case]
    args = (args[0].double(), *args[1:]) if "fp64" in case else args
    got, expected = _outputs(emulate.emulated_op("roc_counts"), args), _outputs(torch.ops.dpm_ops.roc_counts, args)
    torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("metric", METRICS)
def test_cuda_certified_pipeline_on_the_emulated_stage_kernels(emulated, metric):
    """knn by backend "cuda"'s pipeline (ops/knn_certified.py) with its two stage ops' CUDA kernels
    (cuBLAS's bf16 GEMM as the CPU's fp32 GEMM of the bf16 values): the direct path's neighbours."""
    query, gallery = reid_like(12, 300, seed=30)
    result = emulate.emulated_op("knn_certified")(query, gallery, 7, metric)
    assert bool((result[2] >= 7).all())
    check_same_knn(query, gallery, 7, metric, result[:2], backend="cpp")


COPIES = 50


def _rows(count, dim, seed, dtype, metric):
    """Gaussian rows after COPIES copies of the first (equal distances: ties, and candidate sets over a
    cap below COPIES) and a few sign rows; unit rows for cosine; their squared norms."""
    x = gaussian(count - COPIES - 6, dim, seed, dtype)
    x = torch.cat([x[:1].repeat(COPIES, 1), x, sign_rows(6, dim, seed=seed, dtype=dtype)])
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    return x.contiguous(), (x * x).sum(1)


# The rows launched: two blocks, the second at row0 > 0 (the launchers' global row indices), as the
# entry points launch a block of rows per GEMM. The emulator runs each row's block of 256 threads in
# turn, so the tests take a few rows of each kind: copies, Gaussian rows, the last rows.
BLOCKS = ((0, 24), (40, 64), (280, 300))


@pytest.mark.parametrize("k", [1, 5, 32, 33, 70])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_select_kernel(emulated, k, metric, dtype):
    """knn_kernels.cu's select_kernel, in two blocks of rows (row0 > 0) as knn_cuda.cpp launches it: each row's k
    smallest (distance, index) pairs (register lists for k <= 32, shared-memory lists above), the row maximum
    and the cross block, with self pairs; bitwise a stable sort of the same distances."""
    n, cross_rows = 300, 20
    x, norms = _rows(n, 24, k, dtype, metric)
    dots = x @ x.T
    d = knn_certified.distance(dots, norms[:, None], norms[None, :], metric)
    d.fill_diagonal_(0)
    order = torch.sort(d, dim=1, stable=True)
    values, indices = torch.empty(n, k, dtype=dtype), torch.empty(n, k, dtype=torch.long)
    row_max, cross = torch.empty(n, dtype=dtype), torch.full((cross_rows, n - cross_rows), -1.0, dtype=dtype)
    for r0, r1 in BLOCKS:
        block = dots[r0:r1].contiguous()
        emulate.call(
            emulated, "knn_select", DTYPES[dtype], block.data_ptr(), norms.data_ptr(), norms.data_ptr(), r1 - r0,
            r0, n, k, METRICS[metric], True, values.data_ptr(), indices.data_ptr(), row_max.data_ptr(),
            cross.data_ptr(), cross_rows,
        )  # fmt: skip
    launched = torch.cat([torch.arange(r0, r1) for r0, r1 in BLOCKS])
    assert torch.equal(values[launched], order.values[launched, :k])
    assert torch.equal(indices[launched], order.indices[launched, :k])
    assert torch.equal(row_max[launched], d.amax(1)[launched])
    assert torch.equal(cross, d[:cross_rows, cross_rows:])  # rows 0..19 are launched


@pytest.mark.parametrize("k", [1, 7, 33, 100])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("self_pairs", [False, True])
def test_certified_candidates_kernel(emulated, k, metric, dtype, self_pairs):
    """knn_certified_kernels.cu's candidates_kernel, in two blocks of rows as knn_certified_cuda.cpp launches it,
    against candidates_torch (the op's CPU kernel) on the same fp32 dot products: the same buffers and counts,
    bitwise. Caps that rows overflow, N not a multiple of the 256 columns a step."""
    n, cap = 300, max(k, 40)
    y, _ = _rows(n, 24, k + 1, dtype, metric)
    x = y if self_pairs else y * 1.25
    xo, yo = (knn_certified.Operand.of(v, metric, dtype) for v in (x, y))
    args = knn_certified.stage1_args(xo, yo)
    expected = knn_certified.candidates_torch(*args, k, cap, metric, self_pairs)
    dots = knn_certified._bf16_gemm(xo.bf16, yo.bf16)
    got = [torch.full((n, cap), -1, dtype=torch.int32), torch.full((n,), -1, dtype=torch.int32)]
    got += [torch.full((n, cap), -1, dtype=torch.int32), torch.full((n,), -1, dtype=torch.int32)]
    for r0, r1 in BLOCKS:
        block = dots[r0:r1].contiguous()
        emulate.call(
            emulated, "knn_certified_candidates", DTYPES[dtype], block.data_ptr(), xo.scales.data_ptr(),
            yo.scales.data_ptr(), xo.norms.data_ptr(), yo.norms.data_ptr(), r1 - r0, r0, n, k, cap, METRICS[metric],
            self_pairs, got[0].data_ptr(), got[1].data_ptr(), got[2].data_ptr() if self_pairs else None,
            got[3].data_ptr() if self_pairs else None,
        )  # fmt: skip
    launched = torch.cat([torch.arange(r0, r1) for r0, r1 in BLOCKS])
    for g, e in zip(got[: 4 if self_pairs else 2], expected):
        assert torch.equal(g[launched], e[launched])
    if cap < COPIES:  # the copies' rows: every copy is a candidate
        assert bool((expected[1][:COPIES] > cap).all())


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_certified_candidate_distances_kernel(emulated, metric, dtype):
    """knn_certified_kernels.cu's candidate_distances_kernel against candidate_distances (the op's CPU kernel):
    counts from 0 to the width, +inf past them, self pairs 0; bitwise on exact rows (any summation order
    gives the same bits), within the rounding of the dot product on Gaussian rows."""
    gen = torch.Generator().manual_seed(27)
    n, width = 90, 40
    counts = torch.tensor([0, 1, 7, 8, 9, 40, 33, 16])
    rows = torch.randint(0, n, (len(counts),), generator=gen)
    candidates = torch.randint(0, n, (len(counts), width), generator=gen)
    candidates[:, 0] = rows
    candidates = candidates.masked_fill(torch.arange(width) >= counts[:, None], n)
    for x, exact in ((sign_rows(n, 100, seed=28, dtype=dtype), True), (gaussian(n, 100, 29, dtype), False)):
        xo = knn_certified.Operand.of(x, metric, dtype)
        for self_pairs in (False, True):
            expected = knn_certified.candidate_distances(
                xo.rows, xo.rows, xo.norms, xo.norms, rows, candidates, counts, metric, self_pairs
            )
            got = torch.empty(len(counts), width, dtype=dtype)
            emulate.call(
                emulated, "knn_certified_candidate_distances", DTYPES[dtype], xo.rows.data_ptr(), xo.rows.data_ptr(),
                xo.norms.data_ptr(), xo.norms.data_ptr(), rows.data_ptr(), candidates.data_ptr(), counts.data_ptr(),
                len(counts), width, x.shape[1], METRICS[metric], self_pairs, got.data_ptr(),
            )  # fmt: skip
            assert torch.equal(got.isinf(), torch.arange(width) >= counts[:, None])
            if exact:
                assert torch.equal(got, expected)
            else:
                tau = 2 * x.shape[1] * torch.finfo(dtype).eps * 2 * float(xo.norms.max())
                finite = got.isfinite()
                raw = (lambda d: d * d) if metric == "euclidean" else (lambda d: d)
                torch.testing.assert_close(raw(got[finite]), raw(expected[finite]), rtol=0, atol=tau)


def test_emulator_reports_a_deadlock(emulated):
    with pytest.raises(RuntimeError, match="kernel deadlock_kernel deadlocked in block \\(0, 0, 0\\): threads 0, 1,"):
        emulate.call(emulated, "deadlock")


# The memory that out_of_bounds_kernel (launchers.cpp) writes one float past: 64 floats of each.
OUT_OF_BOUNDS = {"global": 0, "static shared": 1, "dynamic shared": 2}
SANITIZED = pytest.mark.skipif(not emulate.sanitized(), reason="under the sanitizers only (cuda_emulation/memcheck.sh)")


def _launch_in_child(library, launcher: str, *args) -> subprocess.CompletedProcess:
    """Runs one of the library's launchers in a child process (a sanitizer's report ends it)."""
    launch = f"import ctypes, torch; ctypes.CDLL({library._name!r}).{launcher}{args}"
    return subprocess.run([sys.executable, "-c", launch], capture_output=True, text=True, timeout=120)


@SANITIZED
@pytest.mark.parametrize("memory", OUT_OF_BOUNDS)
def test_address_sanitizer_reports_an_out_of_bounds_write(emulated, memory):
    done = _launch_in_child(emulated, "out_of_bounds", OUT_OF_BOUNDS[memory])
    assert done.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
    assert "WRITE of size 4" in done.stderr
    assert "256-byte region" in done.stderr  # the 64 floats, not a neighbour


@SANITIZED
def test_undefined_behaviour_sanitizer_reports_a_signed_overflow(emulated):
    done = _launch_in_child(emulated, "signed_overflow")
    assert done.returncode != 0
    assert "runtime error: signed integer overflow" in done.stderr, done.stderr
    assert "cannot be represented in type 'int'" in done.stderr
