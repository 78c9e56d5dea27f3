"""The feature files of ``dpm-reid extract`` (:func:`dpm_ops.export.save_features_npz`) read back, and a
gallery file ranked for a query file: CMC / mAP / mINP by the model's test distance, optionally
k-reciprocal re-ranked, as the evaluator scores a dataset (``dpm-reid rank``)."""

from __future__ import annotations

import dataclasses
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .engine.extraction import FeatureSet
from .engine.recipes import RECIPES
from .engine.scoring import DISTANCES, compute_distances, rank_metrics, resolve_distance
from .evaluation._inputs import check_choice, check_count
from .export import ExportError
from .ops._checks import check_real

NPZ_ARRAYS = ("paths", "features", "pids", "camids", "model", "distance")  # and "masks" (DPM)
UNKNOWN_PID = -1  # extract's pid of a name that is not Market-style; Market's own junk images


@dataclasses.dataclass
class SavedFeatures:
    """One feature file: its descriptors, the recipe name of the model that made them and its test distance."""

    features: FeatureSet
    model: str
    distance: str


def load_features_npz(path, argument: str = "path") -> SavedFeatures:
    """A file of :func:`dpm_ops.export.save_features_npz` (``dpm-reid extract``), checked; an
    :class:`ExportError` naming ``argument`` and the file otherwise."""
    path = Path(path).expanduser()
    where = f"{argument} {path}"
    if not path.is_file():
        raise ExportError(
            f"{where}: {'is a folder' if path.is_dir() else 'not found'}; give an .npz of dpm-reid extract"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ExportError(f"{where}: a single .npy array, not an .npz of dpm-reid extract")
        with loaded as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        if isinstance(error, ExportError):
            raise
        raise ExportError(f"{where}: not an .npz file ({error})") from None
    missing = [name for name in NPZ_ARRAYS if name not in arrays]
    if missing:
        raise ExportError(f"{where}: no {', '.join(missing)} array: not a feature file of dpm-reid extract")
    model, distance = str(arrays["model"]), str(arrays["distance"])
    if model not in RECIPES:
        raise ExportError(f"{where}: model {model!r} is not one of {', '.join(RECIPES)}")
    if distance not in DISTANCES[1:]:
        raise ExportError(f"{where}: distance {distance!r} is not one of {', '.join(DISTANCES[1:])}")
    features = arrays["features"]
    if features.ndim != 2 or features.dtype.kind != "f" or 0 in features.shape:
        raise ExportError(
            f"{where}: features must be a non-empty (N, D) float array, got {features.dtype} {features.shape}"
        )
    if not np.isfinite(features).all():
        raise ExportError(f"{where}: features contain non-finite values (NaN or inf)")
    count = len(features)
    for name in ("pids", "camids"):
        if arrays[name].shape != (count,) or arrays[name].dtype.kind not in "iu":
            raise ExportError(f"{where}: {name} must be {count} integers, one per feature, got {arrays[name].shape}")
        if arrays[name].dtype.kind == "u" and arrays[name].max() > np.iinfo(np.int64).max:
            raise ExportError(f"{where}: {name} must fit in int64, got {arrays[name].max()}")
    if arrays["paths"].shape != (count,):
        raise ExportError(f"{where}: paths must hold {count} names, one per feature, got {arrays['paths'].shape}")
    masks = arrays.get("masks")
    if masks is not None and (masks.shape != features.shape or masks.dtype.kind != "f"):
        raise ExportError(
            f"{where}: masks must be floats of the features' shape {features.shape}, got {masks.dtype} {masks.shape}"
        )
    if masks is not None and not ((masks >= 0) & (masks <= 1)).all():  # DPM's sigmoid channel masks; NaN fails
        raise ExportError(f"{where}: masks must lie in [0, 1] (DPM's channel masks)")
    return SavedFeatures(
        FeatureSet(
            torch.from_numpy(features.astype(np.float32)),
            None if masks is None else torch.from_numpy(masks.astype(np.float32)),
            torch.from_numpy(arrays["pids"].astype(np.int64)),
            torch.from_numpy(arrays["camids"].astype(np.int64)),
            [str(name) for name in arrays["paths"]],
        ),
        model,
        distance,
    )


def rank_features(
    query: SavedFeatures,
    gallery: SavedFeatures,
    distance: str = "auto",
    *,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_rank: int = 50,
    device="cpu",
) -> dict:
    """``{"all": {rank1, rank5, rank10, mAP, mINP, num_query, num_valid, cmc}, "settings": {...}}`` (percent)
    of the gallery ranked for each query, as ``evaluate_model`` scores a dataset: ``distance`` "auto" is the
    model's test distance (DPM's masked arccos, with the query's mask), Market's protocol (a gallery item of
    the query's identity and camera does not count). Gallery items without an identity (pid -1: extract's
    names that are not Market-style, Market's junk images) are left out; every query needs one."""
    if query.model != gallery.model:
        raise ValueError(f"query and gallery come from different models: {query.model} and {gallery.model}")
    width = (query.features.features.shape[1], gallery.features.features.shape[1])
    if width[0] != width[1]:
        raise ValueError(f"query and gallery features differ in width: {width[0]} and {width[1]}")
    metric = resolve_distance(check_choice("distance", distance, DISTANCES), query.model)
    k1, k2 = check_count("k1", k1, 1), check_count("k2", k2, 1)
    lambda_value = check_real(None, "lambda_value", lambda_value, 0, 1)
    check_count("max_rank", max_rank, 1)
    unknown = int((query.features.pids == UNKNOWN_PID).sum())
    if unknown:
        raise ValueError(
            f"{unknown} of {len(query.features)} queries have no identity (pid -1: names not Market-style "
            "<pid>_c<camera>...): ranking scores each query against its identity"
        )
    kept = gallery.features.select(gallery.features.pids != UNKNOWN_PID)
    if len(kept) == 0:
        raise ValueError("no gallery item has an identity (pid -1 only: names not Market-style)")
    options = dict(rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value)
    distmat = compute_distances(query.features, kept, metric, device=device, **options)
    metrics = rank_metrics(distmat, query.features, kept, max_rank=min(max_rank, len(kept)))
    settings = dict(
        model=query.model,
        distance=metric,
        **(options if rerank else {"rerank": False}),
        num_gallery=len(kept),
        gallery_without_identity=len(gallery.features) - len(kept),
    )
    return {**metrics, "settings": settings}
