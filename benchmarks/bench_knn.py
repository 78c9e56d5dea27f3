"""knn / self_knn (fused distance + top-k) against eager torch (cdist + topk), in the same run.

Cases: a small shape for CI's --benchmark-disable pass; query x gallery kNN and the pooled
self-kNN of re-ranking at Market-1501 scale (slow). Eager holds the whole distance matrix; the
fused ops hold tiles only. Targets (CPU, Market scale): knn never slower than eager, and self_knn,
which computes half the GEMM, >= 1.5x eager's full matrix + topk. GPU (H100 / H200): knn at Market
scale (k 21) <= 3 ms; self_knn's CUDA and Triton kernels reported. The Market cases are `slow` on the
CPU only.
"""

import pytest
import torch

from benchmarks.conftest import median_of, speedup
from dpm_ops.ops import knn, self_knn

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
SMALL = (512, 2048, 128, 21)  # M, N, D, k
MARKET = (3368, 15913, 768, 21)  # queries x gallery, 768-d, k1 + 1
MARKET_POOLED = (19281, 19281, 768, 25)  # re-ranking's pooled set: k1 + 1 + tie margin


def features(rows, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=1).to(DEVICE)


def eager_knn(x, y, k):
    return torch.topk(torch.cdist(x, y), k, dim=1, largest=False)


def group_name(op, shape):
    return f"{op} {'x'.join(map(str, shape))} {DEVICE}"


CPU_SLOW = () if GPU else pytest.mark.slow  # seconds on a 2-core CPU, milliseconds on a GPU
SHAPES = [pytest.param(SMALL, id="small"), pytest.param(MARKET, id="market1501", marks=CPU_SLOW)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["eager cdist+topk", "dpm_ops knn"])
def bench_knn(timed, impl, shape):
    M, N, D, k = shape
    x, y = features(M, D, 0), features(N, D, 1)
    fn = (lambda: eager_knn(x, y, k)) if impl.startswith("eager") else (lambda: knn(x, y, k))
    short = shape == SMALL or GPU  # milliseconds a call: more rounds
    timed(
        fn,
        group=group_name("knn", shape),
        name=impl,
        device=DEVICE,
        rounds=7 if short else 3,
        iterations=3 if short else 1,
        flop=2 * M * N * D,
        shape=shape,
    )


SELF_KNN_IMPLS = [
    pytest.param("eager mm+topk", marks=CPU_SLOW),
    pytest.param("dpm_ops self_knn", marks=CPU_SLOW),
    # the Triton kernel beside the default (CUDA) one; the interpreter is not a benchmark
    pytest.param("dpm_ops self_knn triton", marks=pytest.mark.skipif(not GPU, reason="GPU only")),
]


@pytest.mark.parametrize("impl", SELF_KNN_IMPLS)
def bench_self_knn_market(timed, impl):
    N, _, D, k = MARKET_POOLED
    x = features(N, D, 2)

    def eager():
        sq = (x * x).sum(1)
        full = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_min_(0)
        full.fill_diagonal_(0)
        row_max = full.amax(1)
        return torch.topk(full / row_max[:, None], k, dim=1, largest=False), row_max

    backend = "triton" if impl.endswith("triton") else None
    fn = eager if impl.startswith("eager") else (lambda: self_knn(x, k, "sqeuclidean", True, 3368, backend=backend))
    timed(
        fn,
        group=group_name("self_knn", MARKET_POOLED),
        name=impl,
        device=DEVICE,
        rounds=2,
        iterations=1,
        flop=N * N * D,
        shape=MARKET_POOLED,
    )


def _ratio(op, shape, base, ours):
    group = group_name(op, shape)
    return speedup(group, ours, base)


@pytest.mark.skipif(GPU, reason="CPU targets")
def bench_cpu_knn_small():
    # Reported, not asserted: at ~5 ms per call OpenMP scheduling on a shared 2-core machine swings
    # both sides by 10x; the targets are checked at Market scale.
    ratio = _ratio("knn", SMALL, "eager cdist+topk", "dpm_ops knn")
    print(f"\nknn {SMALL}: {ratio:.2f}x eager cdist+topk")


@pytest.mark.slow
@pytest.mark.skipif(GPU, reason="CPU targets")
def bench_cpu_knn_market_targets():
    knn_ratio = _ratio("knn", MARKET, "eager cdist+topk", "dpm_ops knn")
    self_ratio = _ratio("self_knn", MARKET_POOLED, "eager mm+topk", "dpm_ops self_knn")
    print(f"\nMarket scale: knn {knn_ratio:.2f}x eager cdist+topk; self_knn {self_ratio:.2f}x eager mm+topk")
    assert knn_ratio >= 1.0 and self_ratio >= 1.5, "targets: knn never slower than eager, self_knn >= 1.5x"


@pytest.mark.skipif(not GPU, reason="GPU targets")
def bench_gpu_knn_market_target():
    seconds = median_of(group_name("knn", MARKET), "dpm_ops knn")
    if seconds is None:
        pytest.skip("timings not recorded (benchmarks disabled, or a case was skipped or deselected)")
    ratio = _ratio("knn", MARKET, "eager cdist+topk", "dpm_ops knn")
    print(f"\n{torch.cuda.get_device_name()}: knn {MARKET} {seconds * 1e3:.2f} ms ({ratio:.2f}x eager cdist+topk)")
    assert seconds <= 3e-3, f"knn at Market scale takes {seconds * 1e3:.2f} ms, target <= 3 ms"


@pytest.mark.skipif(not GPU, reason="GPU report")
def bench_gpu_self_knn_report():
    """Reported, not asserted: self_knn at Market scale on each GPU backend against eager mm + topk."""
    group = group_name("self_knn", MARKET_POOLED)
    for impl in ("dpm_ops self_knn", "dpm_ops self_knn triton"):
        seconds = median_of(group, impl)
        if seconds is not None:
            print(
                f"\n{impl} {MARKET_POOLED}: {seconds * 1e3:.2f} ms ({speedup(group, impl, 'eager mm+topk'):.2f}x eager)"
            )
