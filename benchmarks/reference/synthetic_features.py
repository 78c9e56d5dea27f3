"""Synthetic re-ID features with realistic neighbourhoods (spec rerank_eval.md §7.1).

Each image is an identity centre in a low-dimensional latent space, plus an offset shared by
every image of its camera, plus per-image noise; the latent code is projected to the feature
dimension by a fixed random matrix, small isotropic noise is added and the result is
L2-normalised. Camera offsets make same-camera images of different people look alike, the
hard negatives that the Market-1501 protocol (same pid *and* same camera removed) is about.
Distractors (pid 0) have their own random centres. Every identity has gallery images on at
least two cameras, so every query keeps a cross-camera match. Deterministic in `seed`.
"""

from dataclasses import dataclass

import numpy as np

MARKET1501 = dict(num_query=3368, num_gallery=15913, num_ids=750, num_distractors=2798)
MSMT17 = dict(num_query=11659, num_gallery=82161, num_ids=3060, num_distractors=0)


@dataclass
class ReidFeatures:
    query: np.ndarray  # (Q, dim) float32, L2-normalised
    gallery: np.ndarray  # (G, dim) float32, L2-normalised
    query_pids: np.ndarray  # (Q,) int64, identities 1..num_ids
    gallery_pids: np.ndarray  # (G,) int64, distractors are 0
    query_camids: np.ndarray  # (Q,) int64
    gallery_camids: np.ndarray  # (G,) int64


def scaled(preset: dict, scale: float) -> dict:
    """`preset` with every count multiplied by `scale` (at least one identity, query and image)."""
    sizes = {name: max(1, round(count * scale)) for name, count in preset.items()}
    sizes["num_distractors"] = round(preset["num_distractors"] * scale)
    sizes["num_gallery"] = max(sizes["num_gallery"], 2 * sizes["num_ids"] + sizes["num_distractors"])
    return sizes


def _split_evenly(total: int, parts: int) -> np.ndarray:
    counts = np.full(parts, total // parts, dtype=np.int64)
    counts[: total % parts] += 1
    return counts


def make_reid_features(
    num_query: int = 3368,
    num_gallery: int = 15913,
    num_ids: int = 750,
    num_distractors: int = 2798,
    dim: int = 768,
    latent_dim: int = 64,
    num_cams: int = 6,
    camera_shift: float = 0.45,
    noise: float = 0.87,
    feature_noise: float = 0.02,
    seed: int = 0,
) -> ReidFeatures:
    """Market-1501-like features by default (3,368 queries, 15,913 gallery images, 768-d)."""
    num_matching = num_gallery - num_distractors
    if num_matching < 2 * num_ids:
        raise ValueError("num_gallery - num_distractors must leave two gallery images per identity")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, latent_dim))
    camera_offsets = camera_shift * rng.standard_normal((num_cams, latent_dim))
    projection = rng.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)

    ids = np.arange(num_ids)
    query_ids = np.repeat(ids, _split_evenly(num_query, num_ids))
    gallery_ids = np.repeat(ids, _split_evenly(num_matching, num_ids))
    query_cams = rng.integers(0, num_cams, query_ids.size)
    gallery_cams = rng.integers(0, num_cams, gallery_ids.size)
    # The first two gallery images of each identity sit on two different cameras, so that a
    # query from any camera keeps at least one cross-camera match.
    first = np.flatnonzero(np.r_[True, gallery_ids[1:] != gallery_ids[:-1]])
    gallery_cams[first + 1] = (gallery_cams[first] + rng.integers(1, num_cams, first.size)) % num_cams

    def images(latent_centres, cams):
        latent = latent_centres + camera_offsets[cams] + noise * rng.standard_normal(latent_centres.shape)
        features = latent @ projection + feature_noise * rng.standard_normal((len(cams), dim))
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        return features.astype(np.float32)

    distractor_cams = rng.integers(0, num_cams, num_distractors)
    distractor_centres = rng.standard_normal((num_distractors, latent_dim))
    gallery = np.concatenate([images(centres[gallery_ids], gallery_cams), images(distractor_centres, distractor_cams)])
    return ReidFeatures(
        query=images(centres[query_ids], query_cams),
        gallery=gallery,
        query_pids=query_ids.astype(np.int64) + 1,
        gallery_pids=np.concatenate([gallery_ids + 1, np.zeros(num_distractors, np.int64)]),
        query_camids=query_cams.astype(np.int64),
        gallery_camids=np.concatenate([gallery_cams, distractor_cams]).astype(np.int64),
    )
