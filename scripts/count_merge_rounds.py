#!/usr/bin/env python3
"""Merge rounds of the Triton knn lists (dpm_ops/triton/knn.py, offer_tile) at Market scale, counted on
the CPU: per program of BM rows and 64-column tile, a tile costs as many rounds as the most pairs any
of its rows takes into its k kept ones (the k rounds per tile of a full merge, before). Market-like
synthetic features (benchmarks/reference/synthetic_features.py); table in docs/certified_knn.md.

    python scripts/count_merge_rounds.py   # ~1 min on 2 cores
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.reference.synthetic_features import make_reid_features  # noqa: E402

TILE = 64


def merge_rounds(distances: torch.Tensor, k: int, rows_per_program: int):
    """(rounds per program, tiles where some row takes a pair per program, pairs taken per row)."""
    M, N = distances.shape
    programs = M // rows_per_program  # whole programs only
    kept = torch.full((M, k), float("inf"))
    rounds = busy = taken = 0
    for start in range(0, N, TILE):
        kept, position = torch.cat([kept, distances[:, start : start + TILE]], 1).topk(k, dim=1, largest=False)
        takes = (position >= k).sum(1)  # the tile's columns among the k smallest so far
        most = takes[: programs * rows_per_program].view(programs, rows_per_program).max(1).values
        rounds, busy, taken = rounds + int(most.sum()), busy + int((most > 0).sum()), taken + int(takes.sum())
    return rounds / programs, busy / programs, taken / M


def main():
    features = make_reid_features(seed=0)
    query, gallery = torch.from_numpy(features.query).float(), torch.from_numpy(features.gallery).float()
    every = torch.cat([query, gallery])
    self_distances = torch.cdist(every, every).square_().fill_diagonal_(0)
    cross_distances = torch.cdist(query, gallery).square_()
    for label, distances, k, rows in (
        (f"self_knn N {len(every)}, k 25 (the limits kernel)", self_distances, 25, 64),
        (f"query x gallery {len(query)} x {len(gallery)}, k 21", cross_distances, 21, 16),
        ("query x gallery, k 100", cross_distances, 100, 16),
    ):
        tiles = -(-distances.shape[1] // TILE)
        rounds, busy, taken = merge_rounds(distances, k, rows)
        print(
            f"{label}: BM {rows}, {tiles} tiles, rounds per program {tiles * k} before, {rounds:.0f} now; "
            f"tiles with a take {busy:.0f}; pairs taken per row {taken:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
