"""pytest-benchmark setup shared by every kernel benchmark.

`pytest benchmarks/` times each backend and its baseline in the same run; targets are checked as
ratios of those timings. `--benchmark-disable` turns every case into a one-shot smoke test (ratio
checks are then skipped). `--benchmark-json=F` keeps the numbers.
"""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dpm_ops  # noqa: E402, F401  (imported after TRITON_INTERPRET is set)

# What every kernel benchmark runs on: the GPU's kernels beside the eager reference, else the C++ one.
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
KERNELS = ("cuda", "triton") if GPU else ("cpp",)
IMPLS = ("reference",) + KERNELS


def skip_interpreted_triton(backend: str, smoke: bool) -> None:
    """Skip a Triton case off the GPU unless it is the smoke shape: the interpreter is not a benchmark."""
    if backend == "triton" and not GPU and not smoke:
        pytest.skip("the Triton interpreter is not a benchmark")


# Timings of the current session, {(group, name): seconds}: the median (reported, absolute targets)
# and the fastest round (ratio targets: other processes on a shared machine only ever add time, so the
# fastest rounds of both sides are the least disturbed pair).
_MEDIANS = {}
_BEST = {}


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
        _BEST[(group, name)] = benchmark.stats.stats.min / iterations
        benchmark.extra_info["median_s"] = median
        if flop is not None:
            benchmark.extra_info["gflop_per_s"] = flop / median / 1e9
        if bytes_moved is not None:
            benchmark.extra_info["gb_per_s"] = bytes_moved / median / 1e9
        _append_timing(request.node.nodeid, group, name, benchmark.extra_info, _BEST[(group, name)])
        return median

    return run


def _append_timing(test: str, group: str, name: str, info: dict, best: float) -> None:
    """One JSON line per timed case in $DPM_OPS_TIMINGS (scripts/gpu_check.py's timings.jsonl), written as soon as
    the case is timed: pytest-benchmark writes its JSON only when the session ends, which a timeout never reaches."""
    path = os.environ.get("DPM_OPS_TIMINGS")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(dict(test=test, group=group, name=name, best_s=best, **info), default=str) + "\n")


# Dense peaks of the GPUs the targets were set for (H100 / H200 SXM: the same SMs and clocks, H200 with
# HBM3e): FLOP/s per arithmetic and memory bandwidth in bytes/s. Elsewhere roofline fractions are
# reported as unknown and the targets that need them are skipped.
_HOPPER_SXM_FLOPS = {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12, "fp64": 67e12}
_HOPPER_SXM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def gpu_peaks():
    """({arithmetic: FLOP/s}, bytes/s) of this GPU, or None when its peaks are not known here."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "PCIe" in name or "NVL" in name:  # lower clocks and power: other peaks
        return None
    for model, bandwidth in _HOPPER_SXM_BANDWIDTH.items():
        if model in name:
            return _HOPPER_SXM_FLOPS, bandwidth
    return None


def roofline_fraction(seconds, flop, bytes_moved, arithmetic):
    """The roofline's lower bound on the time (compute or memory, whichever binds) over the time taken."""
    peaks = gpu_peaks()
    if peaks is None or seconds is None:
        return None
    flops, bandwidth = peaks
    return max(flop / flops[arithmetic], bytes_moved / bandwidth) / seconds


def median_of(group, name):
    return _MEDIANS.get((group, name))


def best_of(group, name):
    return _BEST.get((group, name))


def speedup(group, name, baseline="reference"):
    """best(baseline) / best(name) from this session (the fastest rounds); skips the calling check when
    a timing is missing (benchmarks disabled, or a case skipped or deselected)."""
    base, other = _BEST.get((group, baseline)), _BEST.get((group, name))
    if base is None or other is None:
        pytest.skip("timings not recorded (benchmarks disabled, or a case was skipped or deselected)")
    return base / other
