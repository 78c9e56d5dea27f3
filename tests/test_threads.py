"""Threads and processes: the ops called from several Python threads at once, each under its own torch thread count;
the process-wide settings some of them switch for a block (forced_backend is per thread: test_backend.py); the ops in
DataLoader workers of every start method."""

import concurrent.futures
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F

import dpm_ops
from dpm_ops import evaluation as ev
from dpm_ops import ops
from dpm_ops._precision import ieee_fp32_matmuls

needs_cpp = pytest.mark.skipif(not dpm_ops.backends()["cpp"][0], reason="needs the compiled C++ backend")


def run_python(*args: str, timeout: float = 120) -> str:
    """python `args` in a fresh interpreter (its own OpenMP state), with this checkout first on the path; its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(dpm_ops.__file__)), *sys.path])}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
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
    out = run_python(
        "-c",
        textwrap.dedent("""
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
    """),
    )
    assert out.split() == ["0"] * 4


def _calls() -> dict:
    """name -> call(seed): each op on inputs of its own seed (sizes that split the kernels into several tasks),
    returning its outputs and gradients."""

    def rows(seed, n, d=32):
        return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))

    def labels(seed, n):
        return torch.randint(0, 20, (n,), generator=torch.Generator().manual_seed(seed))

    def grads(out, *inputs):
        return (out.detach(), *torch.autograd.grad(out.square().sum(), inputs))

    def rank(seed):
        dist = ev.pairwise_distance(rows(seed, 60), rows(seed + 1, 300))
        ids = (labels(seed, 60), labels(seed + 1, 300), labels(seed + 2, 60) % 3, labels(seed + 3, 300) % 3)
        result = ev.evaluate_rank(dist, *ids)
        return torch.as_tensor(result.all_AP), torch.as_tensor(result.cmc), torch.as_tensor(ev.tpr_at_fpr(dist, *ids))

    def fused(seed):
        x, protos = rows(seed, 64, 128).requires_grad_(), rows(seed + 1, 30, 128).requires_grad_()
        mask = torch.rand(64, 128, generator=torch.Generator().manual_seed(seed))  # also 8 pooling masks of 32 x 32
        maps = rows(seed + 2, 8 * 16 * 32, 32).view(8, 16, 32, 32).requires_grad_()
        pooled = ops.hierarchical_mask_pool([maps], mask.view(8, 1, 32, 32))
        return (*grads(ops.masked_cosine(x, mask, protos), x, protos), *grads(pooled, maps))

    def losses(seed):
        e = rows(seed, 64).requires_grad_()
        ids = torch.arange(16).repeat_interleave(4)
        loss = ops.batch_hard_triplet(e, ids) + ops.maskreid_ranking_loss(F.normalize(e, dim=1), ids)
        logits = rows(seed + 1, 64 * 3, 10).view(64, 3, 10).requires_grad_()
        return (*grads(loss, e), *grads(ops.hem_loss(logits), logits))

    return {
        "knn": lambda seed: ops.knn(rows(seed, 600), rows(seed + 1, 2500), 10),
        "knn_certified": lambda seed: ops.knn(rows(seed, 600), rows(seed + 1, 2500), 10, strategy="certified"),
        "self_knn": lambda seed: ops.self_knn(rows(seed, 1500), 8, normalize=True, cross_rows=200),
        "self_knn_certified": lambda seed: ops.self_knn(rows(seed, 1500), 8, cross_rows=200, strategy="certified"),
        "rerank_features": lambda seed: ev.rerank_features(rows(seed, 80), rows(seed + 1, 400), strategy="certified"),
        "evaluate_rank": rank,
        "fused": fused,
        "losses": losses,
    }


@needs_cpp
def test_ops_from_several_threads_give_the_serial_bits():
    # Four threads call the same ops on their own inputs, each under its own torch thread count (1 or 2): every
    # result and gradient has the bits of the same call made alone. The kernels keep no state between calls.
    calls, previous = _calls(), torch.get_num_threads()
    serial = {(name, seed): call(seed) for name, call in calls.items() for seed in range(4)}

    def run(name, seed):
        torch.set_num_threads(1 + seed % 2)
        return calls[name](seed)

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            jobs = {(name, seed, round): pool.submit(run, name, seed) for round in range(2) for name, seed in serial}
            got = {key: job.result() for key, job in jobs.items()}
    finally:
        torch.set_num_threads(previous)
    for (name, seed, _), results in got.items():
        assert all(torch.equal(a, b) for a, b in zip(results, serial[name, seed], strict=True)), name


_WORKERS_SCRIPT = """
import sys
import numpy as np
import torch
from dpm_ops import ops
from dpm_ops.data.loader import DecodedImages
from dpm_ops.data.records import ImageRecord
from dpm_ops.data.transforms import build_transforms


class Neighbours(torch.utils.data.Dataset):  # a user's dataset: the library's image dataset, then the ops
    def __init__(self):
        images = [np.full((64, 32, 3), 40 * i, np.uint8) for i in range(4)]
        records = [ImageRecord(f"crop{i}", i, 0) for i in range(4)]
        self.crops = DecodedImages(records, images, build_transforms("dpm", False))

    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = torch.randn(600, 32, generator=torch.Generator().manual_seed(i))
        found = ops.knn(x[:300], x, 5)[0].sum() + ops.self_knn(x, 5, strategy="certified")[0].sum()
        return torch.cat([found.view(1), self.crops[i]["image"].flatten()])


if __name__ == "__main__":
    torch.set_num_threads(2)
    ops.knn(torch.randn(3000, 64), torch.randn(3000, 64), 5)  # the parent's OpenMP threads exist before a fork
    want = [Neighbours()[i] for i in range(4)]
    for method in sys.argv[1:]:
        loader = torch.utils.data.DataLoader(Neighbours(), batch_size=None, num_workers=2, multiprocessing_context=method)
        print(method, all(torch.equal(g, w) for g, w in zip(loader, want, strict=True)))
"""


@needs_cpp
@pytest.mark.skipif(sys.platform != "linux", reason="fork and forkserver")
def test_ops_in_dataloader_workers(tmp_path):
    # DataLoader workers started by fork (after the parent ran OpenMP-parallel kernels: GNU OpenMP is not fork-safe,
    # torch runs its workers on one thread), spawn and forkserver (the dataset and its transforms pickled) run a
    # user's dataset that calls the ops, and the library's own image dataset, to the results of the parent.
    script = tmp_path / "workers.py"
    script.write_text(_WORKERS_SCRIPT)
    out = run_python(str(script), "fork", "spawn", "forkserver", timeout=180)
    assert out.split() == ["fork", "True", "spawn", "True", "forkserver", "True"]
