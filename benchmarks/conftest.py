"""pytest-benchmark setup shared by every kernel benchmark.

`pytest benchmarks/` times each backend and its baseline in the same run; targets are checked as
ratios of those timings. `--benchmark-disable` turns every case into a one-shot smoke test (ratio
checks are then skipped). `--benchmark-json=F` keeps the numbers.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dpm_ops  # noqa: E402  (after TRITON_INTERPRET)

# Timings of the current session, {(group, name): median seconds}, for ratio checks.
_MEDIANS = {}


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine_info():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu x{os.cpu_count()} ({torch.backends.cpu.get_cpu_capability()}), torch threads {torch.get_num_threads()}"


@pytest.fixture
def timed(benchmark, request):
    """timed(fn, group=, name=, device=, flop=, bytes_moved=, **info): time fn, record the median.

    Inner loops amortise launch overhead; a device synchronize closes every timed round.
    """
    def run(fn, *, group, name, device, flop=None, bytes_moved=None, rounds=5, iterations=3, **info):
        benchmark.group = group
        benchmark.name = name
        benchmark.extra_info.update(device=str(device), machine=machine_info(), **info)
        fn()  # warm-up: compilation, caches, allocator
        synchronize(device)

        def body():
            for _ in range(iterations):
                fn()
            synchronize(device)

        benchmark.pedantic(body, rounds=rounds, iterations=1, warmup_rounds=0)
        if benchmark.disabled:
            return None
        median = benchmark.stats.stats.median / iterations
        _MEDIANS[(group, name)] = median
        benchmark.extra_info["median_s"] = median
        if flop is not None:
            benchmark.extra_info["gflop_per_s"] = flop / median / 1e9
        if bytes_moved is not None:
            benchmark.extra_info["gb_per_s"] = bytes_moved / median / 1e9
        return median
    return run


def median_of(group, name):
    return _MEDIANS.get((group, name))


def speedup(group, name, baseline="reference"):
    """median(baseline) / median(name) from this session; skips the calling check when a timing is
    missing (benchmarks disabled, or a case skipped or deselected)."""
    base, other = median_of(group, baseline), median_of(group, name)
    if base is None or other is None:
        pytest.skip("timings not recorded (benchmarks disabled, or a case was skipped or deselected)")
    return base / other

