#!/usr/bin/env python3
"""Candidate sets of the certified k-NN with each bound, on the same Market-like synthetic features
(benchmarks/reference/synthetic_features.py): the CPU's int8 bound (the C++ kernels) and the GPUs'
bf16 bound, whose counts depend on the bound, not on the device. The bf16 pipeline runs here on its
CPU kernels (the torch version of the stage-1 kernel, which the CUDA kernel is tested against
bitwise, with an IEEE fp32 GEMM of the bf16 values in place of cuBLAS's). Table in
docs/certified_knn.md.

    python scripts/count_certified_candidates.py [--scale 1.0]   # ~2 min on 2 cores at Market scale
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.reference.synthetic_features import MARKET1501, make_reid_features, scaled  # noqa: E402
from dpm_ops.evaluation._select import TIE_MARGIN  # noqa: E402
from dpm_ops.ops import knn_certified  # noqa: E402

RERANK_K1 = 20  # rerank_features' default: it asks self_knn for k1 + 1 neighbours plus the tie margin


def summary(counts: torch.Tensor) -> str:
    """Mean and max candidates per row, and the share of rows that fell back (count -1)."""
    kept = counts[counts >= 0].double()
    mean, largest = (f"{float(kept.mean()):.1f}", str(int(kept.max()))) if len(kept) else ("-", "-")
    return f"{mean} | {largest} | {float((counts < 0).double().mean()):.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of Market-1501's query and gallery sizes")
    scale = parser.parse_args().scale
    features = make_reid_features(**scaled(MARKET1501, scale), seed=0)
    query, gallery = torch.from_numpy(features.query), torch.from_numpy(features.gallery)
    every = torch.cat([query, gallery])
    m = RERANK_K1 + 1 + TIE_MARGIN  # normalised order: self_knn keeps TIE_MARGIN more raw neighbours itself
    gpu = knn_certified.CUBLAS  # on CPU tensors: the stage ops' CPU kernels
    print(f"{len(query):,} x {len(gallery):,} x {query.shape[1]}")
    print("| search | bound | mean | max | fallback rate |\n|---|---|---|---|---|")
    raw = knn_certified.raw_neighbours(len(every), m, normalize=True)
    search = f"`self_knn` as `rerank_features` calls it ({len(every):,} rows, k {m}: {raw} raw neighbours)"
    cpu_counts = torch.ops.dpm_ops.self_knn_certified(every, m, "sqeuclidean", True, len(query))[4]
    # max_k: the CUDA kernels' (no limit on the raw neighbours)
    gpu_counts = knn_certified.self_knn_certified_rows(every, m, "sqeuclidean", True, len(query), gpu, len(every))[4]
    print(f"| {search} | int8 (CPU) | {summary(cpu_counts)} |\n| | bf16 (GPU) | {summary(gpu_counts)} |")
    for k in (10, 100):
        cpu_counts = torch.ops.dpm_ops.knn_certified(query, gallery, k, "euclidean")[2]
        gpu_counts = knn_certified.knn_certified_rows(query, gallery, k, "euclidean", gpu)[2]
        search = f"`knn` query × gallery, k {k}"
        print(f"| {search} | int8 (CPU) | {summary(cpu_counts)} |\n| | bf16 (GPU) | {summary(gpu_counts)} |")


if __name__ == "__main__":
    main()
