"""rerank_features on a GPU with the certified neighbour search against the direct one (issue 13,
docs/certified_knn.md "GPU"), in the same run; the certified cases report their candidate sets.

Targets (issue 13, H100 / H200): rerank_features with strategy="certified" <= 10 ms at Market-1501
scale (N = 19,281, 768-d) and <= 0.3 s at MSMT17 scale (N = 93,820). Skipped without CUDA; the GPU
bring-up (scripts/gpu_check.py) runs this file first among the kernel benchmarks.
"""

import pytest
import torch

from benchmarks.bench_evaluation import group_name, report_candidates, time_rerank_strategy
from benchmarks.conftest import GPU, median_of

pytestmark = pytest.mark.skipif(not GPU, reason="GPU benchmarks (the CPU ones: bench_evaluation.py)")
TARGETS_S = {"market1501": 10e-3, "msmt17": 0.3}
GROUP = "rerank_features certified gpu"


@pytest.mark.parametrize("scale", ["market1501", "msmt17"])
@pytest.mark.parametrize("strategy", ["direct", "certified"])
def bench_gpu_rerank_features_strategy(timed, benchmark, strategy, scale):
    iterations = 5 if scale == "market1501" else 1
    query, gallery = time_rerank_strategy(timed, strategy, scale, "cuda", GROUP, iterations)
    if strategy == "certified":
        report_candidates(benchmark, query, gallery, scale, target_s=TARGETS_S[scale])


@pytest.mark.parametrize("scale", list(TARGETS_S))
def bench_gpu_certified_rerank_targets(scale):
    certified = median_of(group_name(GROUP, scale), "rerank certified")
    direct = median_of(group_name(GROUP, scale), "rerank direct")
    if certified is None:
        pytest.skip("timings not recorded (benchmarks disabled or a case was deselected)")
    versus = f", direct {direct * 1e3:.1f} ms" if direct is not None else ""
    print(f"\n{torch.cuda.get_device_name()} {scale}: rerank_features certified {certified * 1e3:.1f} ms{versus}")
    target = TARGETS_S[scale]
    assert certified <= target, (
        f"{scale}: certified rerank_features takes {certified * 1e3:.1f} ms, target <= {target * 1e3:.0f} ms"
    )
