"""Threads and processes: the ops called from several Python threads at once, under changing torch thread counts,
and the process-wide settings some of them switch for a block (forced_backend, per thread: test_backend.py)."""

import os
import subprocess
import sys
import threading
import textwrap

import pytest
import torch

import dpm_ops
from dpm_ops._precision import ieee_fp32_matmuls

needs_cpp = pytest.mark.skipif(not dpm_ops.backends()["cpp"][0], reason="needs the compiled C++ backend")


def run_python(code: str, timeout: float = 120) -> str:
    """`code` in a fresh interpreter (its own OpenMP state), with this checkout first on the path; its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(dpm_ops.__file__)), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_process_settings_in_overlapping_blocks(float32_matmul_precision):
    # Blocks open in two threads at once: the second inside keeps IEEE matmuls after the first leaves, and the
    # user's setting comes back after the last. Each block restoring what it had found gave the thread still inside
    # the user's bf16 passes, then left "ieee" for good.
    float32_matmul_precision("medium")
    settings = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [setting.fp32_precision for setting in settings]
    entered, left = threading.Barrier(2), threading.Event()
    inside = []

    def block(first: bool):
        with ieee_fp32_matmuls():
            entered.wait()
            if not first:
                left.wait()
                inside.append([setting.fp32_precision for setting in settings])
        if first:
            left.set()

    threads = [threading.Thread(target=block, args=(first,)) for first in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert inside == [["ieee", "ieee"]]
    assert [setting.fp32_precision for setting in settings] == before


@needs_cpp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2, reason="counts Linux threads")
def test_kernels_take_torch_thread_count_in_any_thread():
    # torch.set_num_threads(1), then the k-NN kernels from a new thread (a service's request thread): no OpenMP
    # thread is started. They asked OpenMP for its count, which is every core's in a thread that had run no parallel
    # torch op yet (torch applies its count to a thread lazily, at its first).
    out = run_python("""
        import os, threading, torch
        from dpm_ops import ops
        torch.set_num_threads(1)
        x, y = torch.randn(600, 8), torch.randn(100, 8)
        calls = [lambda: ops.knn(x, y, 5), lambda: ops.self_knn(x, 5)]
        calls += [lambda: ops.knn(x, y, 5, strategy="certified"), lambda: ops.self_knn(x, 5, strategy="certified")]
        def serve():
            before = len(os.listdir("/proc/self/task"))
            for call in calls:
                call()
                print(len(os.listdir("/proc/self/task")) - before)
        thread = threading.Thread(target=serve)
        thread.start()
        thread.join()
    """)
    assert out.split() == ["0"] * 4
