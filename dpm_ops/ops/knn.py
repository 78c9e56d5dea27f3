"""Fused distance + top-k (k-nearest neighbours) as torch custom ops, every backend behind one call.

    knn(x, y, k, metric)  ->  (distances (M, k), indices (M, k) int64)

the k rows of y nearest to every row of x, sorted by (distance, index): equal distances keep the
lower index first, exactly the first k entries of a stable sort of the full distance row. Metrics
and dtypes: knn_reference.py. At most a bounded block of dot products is held at a time: GEMM tiles
(CPU, Triton) or row blocks of at most 512 MiB (CUDA, cuBLAS; the whole (M, N) matrix when it fits),
each merged into per-row sorted lists.

Declared ops: ``knn`` (C++ CPU / CUDA kernels, csrc/knn/, and a Triton twin) and ``self_knn`` (one
set against itself, with the row maxima re-ranking needs; on the CPU from the upper-triangle tiles
only, each offered to its rows and its columns: half the GEMM work; on CUDA and Triton from every
row in full). The distances are differentiable in x and y (through the selected pairs; the
indices are not), for knn on every backend; self_knn has no autograd formula (re-ranking does not
need one; use the reference backend to differentiate it).

``strategy="certified"`` runs ``knn_certified`` / ``self_knn_certified`` (C++ CPU kernels; the CUDA kernels
and the Triton twins are the GPU pipeline of ops/knn_certified.py):
a low-precision GEMM (int8 on the CPU, bf16 on GPUs) with a rigorous per-pair error bound picks each
row's candidates, recomputed as the direct path computes them (docs/certified_knn.md).
"""

import torch

from .. import _backend
from ._checks import check_euclidean_scale, check_finite_rows, check_flag, check_int
from .._precision import compute_dtype
from ._declare import declare
from .knn_reference import COSINE_EPS, METRICS, knn_reference, self_knn_reference


def _check_tensor(name, t, op="knn"):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(f"{op}: {name} must hold data (a CPU or CUDA tensor), got a meta tensor")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")


def _check_k(k, limit, what, op="knn"):
    check_int(op, "k", k, 1, limit, why=f" (the number of rows of {what})")


def _check_metric(metric, op="knn"):
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")


def check_knn_args(x, y, k, metric="euclidean") -> None:
    """The knn ops' arguments (their Triton twins' check; the C++ ops make the same ones)."""
    _check_tensor("x", x)
    _check_tensor("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"knn: x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"knn: x and y must be on one device, got {x.device} and {y.device}")
    _check_k(k, y.shape[0], "y")
    _check_metric(metric)


def check_self_knn_args(x, k, metric="sqeuclidean", normalize=False, cross_rows=0) -> bool:
    """The self_knn ops' arguments (as check_knn_args); returns normalize as a bool."""
    _check_tensor("x", x, "self_knn")
    _check_k(k, x.shape[0], "x", "self_knn")
    _check_metric(metric, "self_knn")
    normalize = check_flag("self_knn", "normalize", normalize)
    check_int("self_knn", "cross_rows", cross_rows, 0, x.shape[0])
    return normalize


STRATEGIES = ("auto", "certified", "direct")
_CERTIFIED_MIN_WORK = 1 << 30  # rows x columns x features below which the direct path is as fast


def check_strategy(strategy, op: str = "knn"):
    """ValueError naming `op`, the public function the user called (knn, rerank_features, ...)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"{op}: strategy must be one of {STRATEGIES}, got {strategy!r}")


def check_certified_runs(strategy, name: str, op: str = "knn") -> None:
    """ValueError naming `op` (the public function the user called) when strategy="certified" is asked of a
    backend `name` that does not run it (the reference)."""
    if strategy == "certified" and name not in ("cpp", "cuda", "triton"):
        raise ValueError(
            f"{op}: strategy='certified' runs on the C++ CPU kernels and on CUDA / Triton (backends 'cpp', 'cuda', "
            f"'triton'), got backend {name!r}; use strategy='direct' or 'auto'"
        )


def int8_gemm_is_fast() -> bool:
    """Whether the certified search's stage-1 GEMM runs on int8 dot-product instructions here
    (int8_gemm_engine(): "amx", the library's own AMX tile kernel, or "onednn", torch's int8 GEMM, which
    takes oneDNN's VNNI kernels where the CPU has AVX-512 VNNI and torch.backends.mkldnn is enabled, and
    otherwise, AVX-VNNI alone included, a scalar loop that made "auto" 7-16x slower than the direct path):
    ~4x faster than the fp32 GEMM on an AMD EPYC Zen 4 core (oneDNN, VNNI: 434 against 94 GOP/s), ~25x on
    the Intel Xeon of the README (AMX: ~4.7 TOP/s against ~170 GFLOP/s)."""
    engine = int8_gemm_engine()
    if engine != "onednn":
        return engine == "amx"
    return bool(torch._C._cpu._get_cpu_capability().get("avx512_vnni")) and torch.backends.mkldnn.enabled


def int8_gemm_engine():
    """Which int8 GEMM the certified search's stage 1 runs on this CPU now: "amx" (the library's AMX tile
    kernel, csrc/knn/knn_int8_gemm_amx.h) or "onednn" (torch's; also where the environment says
    DPM_OPS_AMX=0, read at each call); None where torch's is not exact in this process (oneDNN held below
    VNNI, e.g. ONEDNN_MAX_CPU_ISA=AVX2: the certified search then runs the direct path) or without the C++
    extension."""
    module = _backend._EXTENSION[0]
    return None if module is None else module.int8_gemm()


def _use_certified(strategy, name, rows, columns, dim):
    """Resolves `strategy` for the backend `name`. "auto" picks the certified search for large problems on
    the C++ CPU kernels where the CPU has int8 dot-product instructions (measured faster there). On CUDA / Triton it
    stays the direct path until the certified pipeline has been measured on a GPU (docs/certified_knn.md:
    never run on one yet); strategy="certified" runs it there on request."""
    if strategy == "certified":
        check_certified_runs(strategy, name)
        return True
    if strategy != "auto" or rows * columns * dim < _CERTIFIED_MIN_WORK:
        return False
    return name == "cpp" and int8_gemm_is_fast()


# ---- the declared ops: fake (meta) functions and autograd ----------------------------------------


# Distances come in the compute dtype (float16 / bfloat16 inputs reach the CUDA op as they are).
def _fake_knn(x, y, k, metric="euclidean"):
    dtype = compute_dtype(x, y)
    return x.new_empty((x.shape[0], k), dtype=dtype), x.new_empty((x.shape[0], k), dtype=torch.long)


def _fake_self_knn(x, k, metric="sqeuclidean", normalize=False, cross_rows=0):
    n, dtype = x.shape[0], compute_dtype(x)
    return (
        x.new_empty((n, k), dtype=dtype),
        x.new_empty((n, k), dtype=torch.long),
        x.new_empty((n,), dtype=dtype),
        x.new_empty((cross_rows, n - cross_rows), dtype=dtype),
    )


def _setup_context(ctx, inputs, output):
    x, y, k, metric = inputs
    distances, indices = output[:2]
    ctx.save_for_backward(x, y, distances, indices)
    ctx.metric = metric
    ctx.mark_non_differentiable(indices)


def knn_distance_backward(grad, x, y, distances, indices, metric):
    """Gradients of the selected distances D[i, t] = d(x_i, y_{indices[i, t]}) w.r.t. x and y.

    sqeuclidean: dD/dx = 2 (x - y); euclidean: (x - y) / D (0 where D = 0, as torch.cdist);
    cosine: -(y^ - c x^) / max(|x|, eps) with c = x^.y^ (y^ / eps where |x| <= eps); symmetric in y.
    The y gradient is scattered over the selected rows.
    """
    neighbours = y[indices]  # (M, k, D)
    if metric == "cosine":
        x_norm = x.norm(dim=1, keepdim=True)
        y_norm = neighbours.norm(dim=2, keepdim=True)
        x_hat = x / x_norm.clamp_min(COSINE_EPS)
        y_hat = neighbours / y_norm.clamp_min(COSINE_EPS)
        cos = (x_hat[:, None, :] * y_hat).sum(dim=2, keepdim=True)
        dx = torch.where(x_norm[:, None] > COSINE_EPS, y_hat - cos * x_hat[:, None, :], y_hat) / x_norm[
            :, None
        ].clamp_min(COSINE_EPS)
        dy = torch.where(
            y_norm > COSINE_EPS, x_hat[:, None, :] - cos * y_hat, x_hat[:, None, :].expand_as(y_hat)
        ) / y_norm.clamp_min(COSINE_EPS)
        dx, dy = -dx, -dy
    else:
        diff = x[:, None, :] - neighbours
        if metric == "sqeuclidean":
            coef = 2 * (distances > 0).to(diff.dtype)[..., None]
        else:
            coef = torch.where(distances > 0, 1 / torch.where(distances > 0, distances, 1), 0)[..., None]
        dx, dy = coef * diff, -coef * diff
    g = grad[..., None]
    grad_x = (g * dx).sum(dim=1)
    grad_y = torch.zeros_like(y).index_add_(0, indices.flatten(), (g * dy).flatten(0, 1))
    return grad_x, grad_y


def _autograd(_no_backward_op, ctx, grad_distances, *grad_rest):
    x, y, distances, indices = ctx.saved_tensors
    # float16 / bfloat16 inputs (CUDA) differentiate in the distances' float32, like the others.
    grad_x, grad_y = knn_distance_backward(
        grad_distances, x.to(distances.dtype), y.to(distances.dtype), distances, indices, ctx.metric
    )
    return grad_x, grad_y, None, None


def _fake_knn_certified(x, y, k, metric="euclidean"):
    return *_fake_knn(x, y, k, metric), x.new_empty((x.shape[0],), dtype=torch.long)


def _fake_self_knn_certified(x, k, metric="sqeuclidean", normalize=False, cross_rows=0):
    return *_fake_self_knn(x, k, metric, normalize, cross_rows), x.new_empty((x.shape[0],), dtype=torch.long)


def _fake_bounds(x, y, metric="euclidean"):
    bound = x.new_empty((x.shape[0], y.shape[0]), dtype=compute_dtype(x, y))
    return bound, torch.empty_like(bound)


def _fake_candidates(x, y, x_norms, y_norms, x_scales, y_scales, k, cap, metric, self_pairs):
    far_rows = x.shape[0] if self_pairs else 0
    ints = {"dtype": torch.int32, "device": x.device}
    return (
        torch.empty((x.shape[0], cap), **ints),
        torch.empty((x.shape[0],), **ints),
        torch.empty((far_rows, cap), **ints),
        torch.empty((far_rows,), **ints),
    )


def _fake_candidate_distances(x, y, x_norms, y_norms, rows, candidates, counts, metric, self_pairs):
    return x.new_empty(candidates.shape)


KNN = declare(
    "knn",
    # The k nearest rows of y for every row of x, sorted by (distance, index).
    '(Tensor x, Tensor y, int k, str metric="euclidean") -> (Tensor distances, Tensor indices)',
    _fake_knn,
    triton="triton.knn:knn_forward",
    check=check_knn_args,
    reference=knn_reference,
    setup_context=_setup_context,
    autograd=_autograd,
)
SELF_KNN = declare(
    "self_knn",
    # The k nearest rows of x for every row of x itself (self at distance 0); with normalize, ordered by
    # (distance / row max, index). Also every row's maximum and the block [0:cross_rows, cross_rows:]
    # of the distance matrix.
    '(Tensor x, int k, str metric="sqeuclidean", bool normalize=False, int cross_rows=0)'
    " -> (Tensor distances, Tensor indices, Tensor row_max, Tensor cross)",
    _fake_self_knn,
    triton="triton.knn:self_knn_forward",
    check=check_self_knn_args,
    reference=self_knn_reference,
)
# knn and self_knn by the certified two-stage search (docs/certified_knn.md): the same results, and
# every row's number of stage-2 candidates (-1 where the row took the direct path).
KNN_CERTIFIED = declare(
    "knn_certified",
    '(Tensor x, Tensor y, int k, str metric="euclidean") -> (Tensor distances, Tensor indices, Tensor candidates)',
    _fake_knn_certified,
    triton="ops.knn_certified:knn_certified_triton",
    check=check_knn_args,
    setup_context=_setup_context,
    autograd=_autograd,
)
SELF_KNN_CERTIFIED = declare(
    "self_knn_certified",
    '(Tensor x, int k, str metric="sqeuclidean", bool normalize=False, int cross_rows=0)'
    " -> (Tensor distances, Tensor indices, Tensor row_max, Tensor cross, Tensor candidates)",
    _fake_self_knn_certified,
    triton="ops.knn_certified:self_knn_certified_triton",
    check=check_self_knn_args,
)
# Stage 1's lower and upper bounds of every pair's distance (M, N): what the tests check.
KNN_CERTIFIED_BOUNDS = declare(
    "knn_certified_bounds",
    '(Tensor x, Tensor y, str metric="euclidean") -> (Tensor lower, Tensor upper)',
    _fake_bounds,
)
# Stage 1 of the certified search on backend "cuda" (ops/knn_certified.py): from the bf16 rows, their
# squared norms in the compute dtype and the bound's fp32 scales, each row's first `cap` candidate columns
# (int32, ascending, padded with N) and their count; with self_pairs (x is y) also the row maximum's
# candidates (far; with (0, cap) and (0,) rows otherwise).
KNN_CERTIFIED_CANDIDATES = declare(
    "knn_certified_candidates",
    "(Tensor x, Tensor y, Tensor x_norms, Tensor y_norms, Tensor x_scales, Tensor y_scales, int k, int cap,"
    " str metric, bool self_pairs) -> (Tensor near, Tensor near_count, Tensor far, Tensor far_count)",
    _fake_candidates,
)
# Stage 2 of the certified search on backend "cuda": the distances (R, C) of the rows `rows` of x (the
# compute-dtype rows and squared norms) to their first `counts` candidate columns of y, as the direct path
# computes them; +inf past the counts. The indices are trusted (the pipeline's own buffers).
KNN_CERTIFIED_CANDIDATE_DISTANCES = declare(
    "knn_certified_candidate_distances",
    "(Tensor x, Tensor y, Tensor x_norms, Tensor y_norms, Tensor rows, Tensor candidates, Tensor counts,"
    " str metric, bool self_pairs) -> Tensor",
    _fake_candidate_distances,
)


# ---- public functions ----------------------------------------------------------------------------


def knn(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    metric: str = "euclidean",
    backend: str | None = None,
    strategy: str = "auto",
):
    """The k nearest rows of y (N, D) for every row of x (M, D): (distances (M, k), indices (M, k)).

    Sorted ascending, ties broken by (distance, index). k must be in [1, N] (a ValueError
    otherwise; the CUDA and Triton kernels also take k <= 256); M = 0 gives empty results.
    float16/bfloat16/float32 are returned in float32, float64 in float64 (mixed: the wider). The dot
    products follow torch's precision rules: float32 uses torch's fp32 matmul precision
    (set_float32_matmul_precision "high" / "medium", or fp32_precision "tf32": TF32 tensor cores, on CUDA and
    Triton); on CUDA, float16 / bfloat16 inputs of one
    dtype run their cuBLAS GEMM on tensor cores with float32 accumulation (cosine: the unit rows rounded
    to that dtype). Distances are differentiable in x and y.
    ``backend``: "reference" | "cpp" | "cuda" | "triton" (default: by device, dpm_ops.backends()).
    ``strategy``: "certified" (backends "cpp", "cuda", "triton"; a ValueError on "reference") runs the certified
    two-stage search (docs/certified_knn.md): an int8 (CPU) or bf16 (GPU) GEMM with a rigorous error bound picks each
    row's candidates, whose distances are then computed as the direct path does: the same
    neighbours in the same order, distances within a few ulp (summation order). "direct" computes
    every distance in the compute dtype. On CUDA / Triton the certified distances are IEEE fp32 (fp64
    for fp64 input) whatever the matmul precision, where the direct path may use TF32 or the inputs'
    half precision. "auto" (default): certified for large problems on the C++ backend where the CPU
    has int8 dot-product instructions; else direct (on GPUs until the certified pipeline is measured there).
    Values whose squared norms would overflow the compute dtype are a ValueError, as, for the Euclidean
    metrics, inputs whose values are all below ops._checks.row_norm_floor but not all 0 (their squares underflow).
    """
    check_knn_args(x, y, k, metric)
    check_strategy(strategy)
    check_finite_rows("knn", compute_dtype(x, y), x=x, y=y)
    if metric != "cosine":
        check_euclidean_scale("knn", compute_dtype(x, y), x=x, y=y)
    name = _backend.resolve(backend, x.device)
    certified = _use_certified(strategy, name, x.shape[0], y.shape[0], x.shape[1])
    if not (name == "cuda" and x.dtype == y.dtype):  # the CUDA kernel's GEMM takes float16 / bfloat16 as they are
        dtype = compute_dtype(x, y)
        x, y = x.to(dtype), y.to(dtype)
    if certified:
        return KNN_CERTIFIED.run(name, x, y, k, metric)[:2]
    return KNN.run(name, x, y, k, metric)


def self_knn(
    x: torch.Tensor,
    k: int,
    metric: str = "sqeuclidean",
    normalize: bool = False,
    cross_rows: int = 0,
    backend: str | None = None,
    strategy: str = "auto",
):
    """The k nearest rows of x (N, D) for every row of x, itself included at distance 0.

    Returns (distances (N, k), indices (N, k), row_max (N,), cross (cross_rows, N - cross_rows)):
    rows sorted by (distance, index), or with ``normalize`` by (distance / row_max, index) (the
    distances returned stay un-normalised); row_max[i] = max_j d(i, j); cross = d[:cross_rows,
    cross_rows:]. The CPU kernel computes only the tiles on and above the diagonal (half the GEMM
    work), so d(i, j) is the same number as d(j, i); the CUDA kernel scans every row in full (the
    whole GEMM, through cuBLAS with the precision rules of knn; the Triton kernel likewise, in fused
    distance tiles as its knn), where d(i, j) and d(j, i) are two GEMM entries, equal in exact
    arithmetic but not promised bitwise equal. The outputs carry no gradient on any backend (the
    kernels have none; knn(x, x, k) is differentiable).
    ``strategy``: as for knn; the certified search keeps the upper-triangle tiles and takes the
    cross block's tiles from the compute-dtype GEMM (they are returned in full anyway).
    """
    normalize = check_self_knn_args(x, k, metric, normalize, cross_rows)
    check_strategy(strategy, "self_knn")
    check_finite_rows("self_knn", x=x)
    if metric != "cosine":
        check_euclidean_scale("self_knn", compute_dtype(x), x=x)
    x = x.detach()  # no gradient on any backend, rather than the kernels' silently missing one
    name = _backend.resolve(backend, x.device)
    if _use_certified(strategy, name, x.shape[0], x.shape[0] // 2, x.shape[1]):  # half the GEMM
        return SELF_KNN_CERTIFIED.run(name, x.to(compute_dtype(x)), k, metric, normalize, int(cross_rows))[:4]
    if name != "cuda":  # the CUDA kernel takes float16 / bfloat16 as they are (tensor-core GEMM)
        x = x.to(compute_dtype(x))
    return SELF_KNN.run(name, x, k, metric, normalize, int(cross_rows))


__all__ = ["METRICS", "STRATEGIES", "knn", "knn_reference", "self_knn", "self_knn_reference", "knn_distance_backward"]
