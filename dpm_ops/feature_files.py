"""Features of images and their files: every image of a folder or a list of images (a tracker's crops)
through a model's test transforms and eval forward (``dpm-reid extract``), written to an ``.npz`` and read
back, and a gallery file ranked for a query file: CMC / mAP / mINP by the model's test distance,
optionally k-reciprocal re-ranked, as the evaluator scores a dataset (``dpm-reid rank``).

    from dpm_ops.feature_files import extract_folder, extract_images, save_features_npz
    features = extract_folder(model, "photos/")              # the model's test transforms, batched
    crops = extract_images(model, [crop0, crop1], camids=0)  # arrays, PIL images or paths
    save_features_npz("photos.npz", features, model)
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .data import DecodedImages, ImageDataset, ImageRecord, build_dataloader, mask_path_for
from .data.assembly import _verify_readable
from .data.errors import DatasetError, DatasetNotFoundError
from .data.parsing import MARKET_NAME
from .engine.checkpoint import atomic_write
from .ops._checks import row_norm_limit
from .engine.config import WORKERS
from .engine.builders import resolve_device
from .engine.extraction import FeatureSet, as_device, eval_transform, extract_features
from .engine.recipes import RECIPES, get_recipe, model_cameras
from .engine.scoring import DISTANCES, check_reranking, compute_distances, rank_metrics, resolve_distance
from .evaluation._inputs import check_choice, check_count
from .evaluation.query_expansion import check_aqe
from .export import ExportError, as_export_error, check_int, check_output_path, model_input_size, model_kind
from .export import check_flag as check_export_flag
from .ops._checks import check_flag, quote

NPZ_ARRAYS = ("paths", "features", "pids", "camids", "model", "distance")  # and "masks" (DPM)
UNKNOWN_PID = -1  # extract's pid of a name that is not Market-style; Market's own junk images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------- features of a folder


def find_images(folder) -> list[str]:
    """Relative paths (POSIX, sorted) of every image under ``folder``, recursively, by extension
    (case-insensitive): .jpg .jpeg .png .bmp .tif .tiff .webp."""
    root = Path(os.path.expanduser(str(folder)))
    if root.exists() and not root.is_dir():
        raise DatasetError(f"images folder {root} is a file, not a folder (extract_images takes single images)")
    if not root.is_dir():
        raise DatasetNotFoundError(f"images folder not found: {root}")
    found = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not found:
        raise DatasetError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) under {root}")
    return found


def _labels_from_name(path: str) -> tuple[int, Optional[int]]:
    """(pid, 0-based camera) of a Market-style name ``<pid>_c<camera>...``; (-1, None) otherwise."""
    match = MARKET_NAME.match(os.path.basename(path))
    if match is None or int(match.group(2)) < 1:
        return -1, None
    return int(match.group(1)), int(match.group(2)) - 1


def extract_folder(
    model: torch.nn.Module,
    folder,
    *,
    image_size: Optional[Sequence[int]] = None,
    camid: Optional[int] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device=None,
    amp_dtype: Optional[torch.dtype] = None,
    flip: bool = False,
    progress: bool = True,
) -> FeatureSet:
    """Features of every image under ``folder`` (:func:`find_images`), with the model's test
    transforms and the evaluator's extraction (:func:`dpm_ops.engine.extraction.extract_features`):
    L2-normalised features, DPM's channel masks, in the order of the relative paths.

    ``pids`` / ``camids`` come from Market-style names (``0001_c2s1_...``: pid 1, camera 1), -1 where a
    name is not one. A model with a camera embedding needs every image's camera: from the names, or
    ``camid`` (0-based) for all of them. MaskReID reads each image's foreground mask from the
    ``<folder>_seg`` mirror tree (``.png``, the dataset layout of ``dpm_ops.data.masks``).
    ``image_size`` as in :func:`export_onnx`. ``device``: the model's by default. ``flip``: flip test-time
    augmentation, as the evaluator's (``eval.flip``).
    """
    kind = model_kind(model)
    size = model_input_size(model, kind, image_size)
    check_int("batch_size", batch_size, 1)
    check_int("num_workers", num_workers, 0, WORKERS.high)  # 10**9 forked until the OOM killer ended the process
    flip, progress = check_export_flag("flip", flip), check_export_flag("progress", progress)
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):  # "" was the current folder, None "None"
        raise ExportError(f"folder must be the path of an image folder, got {quote(folder)}")
    root = Path(os.path.expanduser(str(folder))).resolve()  # "." has no parent: the _seg tree sits beside it
    relative = find_images(root)
    absolute = [str(root / name) for name in relative]
    labels = [_labels_from_name(name) for name in relative]
    if camid is not None:
        check_int("camid", camid, 0)
        labels = [(pid, camid) for pid, _ in labels]
    if model_cameras(model):
        for name, (_, camera) in zip(relative, labels):
            if camera is None:
                market = MARKET_NAME.match(os.path.basename(name))
                what = "names camera c0 (Market-style cameras count from c1)" if market else "names no camera"
                raise ExportError(
                    f"the model has a camera embedding but {name} {what} (<pid>_c<camera>...); "
                    "pass camid (--camera) for every image"
                )
    _check_cameras_in_range(model, relative, [camera for _, camera in labels])
    mask_paths = None
    if get_recipe(kind).uses_masks:
        mask_paths = {path: mask_path_for(path, str(root.parent)) for path in absolute}
        missing = [mask for mask in mask_paths.values() if not os.path.isfile(mask)]
        if missing:
            raise DatasetNotFoundError(
                f"{kind} needs each image's foreground mask; {len(missing)} missing, first: {missing[0]}"
            )
        _verify_readable(mask_paths.values(), "mask")
    _verify_readable(absolute, "image")  # before the long part: an unreadable file is named up front
    records = [
        ImageRecord(path, pid, -1 if camera is None else camera) for path, (pid, camera) in zip(absolute, labels)
    ]
    dataset = ImageDataset(records, eval_transform(kind, size), mask_paths=mask_paths)
    options = dict(amp_dtype=amp_dtype, flip=flip, progress=progress, normalize=True)
    features = _extract(model, kind, dataset, batch_size, num_workers, device, **options)
    return dataclasses.replace(features, paths=relative)


def extract_images(
    model: torch.nn.Module,
    images,
    *,
    camids=None,
    masks=None,
    image_size: Optional[Sequence[int]] = None,
    batch_size: int = 64,
    device=None,
    amp_dtype: Optional[torch.dtype] = None,
    normalize: bool = True,
    flip: bool = False,
    progress: bool = False,
) -> FeatureSet:
    """Features of images given one by one, e.g. a tracker's person crops, as :func:`extract_folder`
    computes a folder's. ``images``: a list of image paths, PIL images or (H, W, 3) RGB / (H, W) grey
    uint8 arrays (:func:`dpm_ops.data.image_io.as_rgb`), or one of them. ``camids``: each image's
    0-based camera, or one int for all (a model with a camera embedding needs them). ``masks``:
    MaskReID's foreground mask of each image (paths, PIL images or (H, W) bool / uint8 arrays of the
    image's size). ``normalize=False``: the eval forward's features as they are (not L2-normalised). ``flip``:
    flip test-time augmentation (:func:`extract_folder`).
    The result's ``paths`` are the given paths, or ``images[i]``; its ``pids`` are -1.
    """
    kind = model_kind(model)
    size = model_input_size(model, kind, image_size)
    check_int("batch_size", batch_size, 1)
    normalize = check_export_flag("normalize", normalize)  # "no" would read as true
    progress = check_export_flag("progress", progress)
    images = _listed(images, "images", 3)
    if not images:
        raise ExportError("images: no image given")
    names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"images[{i}]" for i, x in enumerate(images)]
    cameras = image_cameras(model, camids, names)
    uses_masks = get_recipe(kind).uses_masks
    if uses_masks != (masks is not None):
        need = f"{kind} needs each image's foreground mask" if uses_masks else f"{kind} takes no mask"
        raise ExportError(f"masks: {need}")
    if masks is not None:
        masks = _listed(masks, "masks", 2)
        if len(masks) != len(names):
            raise ExportError(f"masks: one per image ({len(names)}), got {len(masks)}")
    records = [ImageRecord(name, -1, camera) for name, camera in zip(names, cameras)]
    dataset = DecodedImages(records, images, eval_transform(kind, size), masks=masks)
    return _extract(model, kind, dataset, batch_size, 0, device, amp_dtype, flip, progress, normalize)


def _listed(items, name: str, item_ndim: int) -> list:
    """``items`` as a list: one image / mask (a path, a PIL image, an array of at most ``item_ndim``
    dimensions) becomes a list of it; a stacked array, its rows."""
    if isinstance(items, (str, os.PathLike, Image.Image)) or (
        isinstance(items, np.ndarray) and items.ndim <= item_ndim
    ):
        return [items]
    try:
        return list(items)
    except TypeError:
        raise ExportError(f"{name} must be a list, got {type(items).__name__}") from None


def image_cameras(model: torch.nn.Module, camids, names: Sequence[str]) -> list[int]:
    """``camids`` (None, one int, or one per image of ``names``) as each image's 0-based camera (-1:
    none), checked against ``model``'s camera embedding, which needs them."""
    if camids is None:
        if model_cameras(model):
            raise ExportError("camids: the model has a camera embedding; pass each image's 0-based camera, or one int")
        return [-1] * len(names)
    given = camids.tolist() if isinstance(camids, (np.ndarray, torch.Tensor)) else camids  # 0-d: its number
    if isinstance(given, numbers.Integral) and not isinstance(given, bool):
        cameras = [check_int("camids", int(given), 0)] * len(names)
    else:
        cameras = list(given) if isinstance(given, (list, tuple, range)) else None  # not True, 1.5 or "12"
        if (
            cameras is None
            or len(cameras) != len(names)
            or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in cameras)
        ):
            raise ExportError(f"camids must be one integer >= 0, or one per image ({len(names)}), got {camids!r}")
    _check_cameras_in_range(model, names, cameras)
    return [int(c) for c in cameras]


def _check_cameras_in_range(model: torch.nn.Module, names: Sequence[str], cameras: Sequence[Optional[int]]) -> None:
    count = model_cameras(model)
    for name, camera in zip(names, cameras):
        if count and camera is not None and camera >= count:
            raise ExportError(
                f"camera {camera} of {name} is out of range for the model's {count} camera embeddings (0..{count - 1})"
            )


def _extract(
    model, kind: str, dataset, batch_size, num_workers, device, amp_dtype, flip, progress, normalize
) -> FeatureSet:
    """:func:`~dpm_ops.engine.extraction.extract_features` over ``dataset`` on ``device`` (default: the model's)."""
    device = as_export_error(as_device, device) if device is not None else next(model.parameters()).device
    loader = build_dataloader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    return extract_features(
        model,
        loader,
        model_name=kind,
        device=device,
        amp_dtype=amp_dtype,
        flip=flip,
        progress=progress,
        normalize=normalize,
        desc="extract",
    )


def save_features_npz(path, features: FeatureSet, model: torch.nn.Module) -> Path:
    """Write ``features`` (from :func:`extract_folder`) to an ``.npz`` (atomically): ``paths`` (N,) str,
    ``features`` (N, D) float32, ``masks`` (N, D) float32 (DPM only), ``pids`` / ``camids`` (N,) int64,
    ``model`` and ``distance`` (the model's test metric: "masked_arccos" for DPM, else "euclidean")."""
    kind = model_kind(model)
    if not isinstance(features, FeatureSet):
        raise ExportError(f"features must be a FeatureSet (extract_folder / extract_images), got {quote(features)}")
    # the file's model and distance label its features: DPM's masked distance needs their masks
    if get_recipe(kind).test_masks != (features.masks is not None):
        has = "have channel masks (a DPM model's)" if features.masks is not None else "have no channel masks"
        raise ExportError(f"features {has}, but model is a {kind} model: pass the model that extracted them")
    path = check_output_path(path, "path", ".npz")
    arrays = {
        "paths": np.array(features.paths, dtype=str),
        "features": features.features.numpy(),
        "pids": features.pids.numpy(),
        "camids": features.camids.numpy(),
        "model": np.array(kind),
        "distance": np.array(resolve_distance("auto", kind)),
    }
    if features.masks is not None:
        arrays["masks"] = features.masks.numpy()
    return atomic_write(path, lambda handle: np.savez(handle, **arrays))


# --------------------------------------------------------------------------- the files read back


@dataclasses.dataclass
class SavedFeatures:
    """One feature file: its descriptors, the recipe name of the model that made them and its test distance."""

    features: FeatureSet
    model: str
    distance: str


def _check_model_fields(where: str, model: str, distance: str, has_masks: bool) -> None:
    """A file's model, distance and masks agree as save_features_npz writes them: a DPM file without masks failed
    later, naming no file; a baseline's file labelled cosine was ranked by euclidean distances."""
    if distance != resolve_distance("auto", model):
        raise ExportError(
            f"{where}: distance {distance!r} is not model {model}'s test distance {resolve_distance('auto', model)!r}"
        )
    if get_recipe(model).test_masks != has_masks:
        problem = (
            "needs its features' channel masks, and the file holds no masks array"
            if not has_masks
            else "has no channel masks, and the file holds a masks array"
        )
        raise ExportError(f"{where}: model {model} {problem}")


def load_features_npz(path, argument: str = "path") -> SavedFeatures:
    """A file of :func:`save_features_npz` (``dpm-reid extract``), checked; an
    :class:`ExportError` naming ``argument`` and the file otherwise."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ExportError(f"{argument} must be the path of an .npz of dpm-reid extract, got {quote(path)}")
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
            arrays = {name: _array(data, name, where) for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        if isinstance(error, ExportError):
            raise
        # numpy's "pickled data ... allow_pickle" for any other file is advice not to follow here
        reason = "neither a zip archive nor a .npy array" if "allow_pickle" in str(error) else error
        raise ExportError(f"{where}: not an .npz file ({reason})") from None
    missing = [name for name in NPZ_ARRAYS if name not in arrays]
    if missing:
        raise ExportError(f"{where}: no {', '.join(missing)} array: not a feature file of dpm-reid extract")
    model, distance = str(arrays["model"]), str(arrays["distance"])
    if model not in RECIPES:
        raise ExportError(f"{where}: model {model!r} is not one of {', '.join(RECIPES)}")
    _check_model_fields(where, model, distance, "masks" in arrays)
    features = arrays["features"]
    if features.ndim != 2 or features.dtype.kind != "f" or 0 in features.shape:
        raise ExportError(
            f"{where}: features must be a non-empty (N, D) float array, got {features.dtype} {features.shape}"
        )
    if not np.isfinite(features).all():
        raise ExportError(f"{where}: features contain non-finite values (NaN or inf)")
    # ranked in float32: past its range they are named here, not as a distance's "x" after a cast's warning
    limit = row_norm_limit(torch.float32)
    largest = max(-float(features.min()), float(features.max()))
    if largest <= limit:
        features = features.astype(np.float32, copy=False)
        largest = float(torch.linalg.vector_norm(torch.from_numpy(features), dim=1).max())  # inf past float32's
    if largest > limit:
        raise ExportError(f"{where}: features too large for float32 distances (norms must stay below {limit:.3g})")
    count = len(features)
    for name in ("pids", "camids"):
        if arrays[name].shape != (count,) or arrays[name].dtype.kind not in "iu":
            raise ExportError(
                f"{where}: {name} must be {count} integers, one per feature, got {arrays[name].dtype} {arrays[name].shape}"
            )
        if arrays[name].dtype.kind == "u" and arrays[name].max() > np.iinfo(np.int64).max:
            raise ExportError(f"{where}: {name} must fit in int64, got {arrays[name].max()}")
    if arrays["paths"].shape != (count,) or arrays["paths"].dtype.kind != "U":  # int paths would load as "0"
        raise ExportError(
            f"{where}: paths must hold {count} names (strings), one per feature, "
            f"got {arrays['paths'].dtype} {arrays['paths'].shape}"
        )
    masks = arrays.get("masks")
    if masks is not None and (masks.shape != features.shape or masks.dtype.kind != "f"):
        raise ExportError(
            f"{where}: masks must be floats of the features' shape {features.shape}, got {masks.dtype} {masks.shape}"
        )
    if masks is not None and not ((masks >= 0) & (masks <= 1)).all():  # DPM's sigmoid channel masks; NaN fails
        raise ExportError(f"{where}: masks must lie in [0, 1] (DPM's channel masks)")
    return SavedFeatures(
        FeatureSet(
            torch.from_numpy(features),
            None if masks is None else torch.from_numpy(masks.astype(np.float32)),
            torch.from_numpy(arrays["pids"].astype(np.int64)),
            torch.from_numpy(arrays["camids"].astype(np.int64)),
            [str(name) for name in arrays["paths"]],
        ),
        model,
        distance,
    )


def _array(data, name: str, where: str) -> np.ndarray:
    """The .npz's array ``name``; one of pickled Python objects is named (numpy's advice to allow pickles
    was read as a file that is no .npz)."""
    try:
        return data[name]
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise
        raise ExportError(
            f"{where}: array {name!r} holds pickled Python objects, which are not loaded; save strings (dtype str) "
            "and numbers"
        ) from None


def rank_features(
    query: SavedFeatures,
    gallery: SavedFeatures,
    distance: str = "auto",
    *,
    aqe=False,
    rerank=False,
    k1: int | None = None,
    k2: int | None = None,
    lambda_value: float = 0.3,
    max_rank: int = 50,
    roc: bool = False,
    device="cpu",
) -> dict:
    """``{"all": {rank1, rank5, rank10, mAP, mINP, num_query, num_valid, cmc}, "settings": {...}}`` (percent)
    of the gallery ranked for each query, as ``evaluate_model`` scores a dataset: ``distance`` "auto" is the
    model's test distance (DPM's masked arccos, with the query's mask), Market's protocol (a gallery item of
    the query's identity and camera does not count). Gallery items without an identity (pid -1: extract's
    names that are not Market-style, Market's junk images) are left out; every query needs one. ``aqe``
    and ``rerank``: as for ``evaluate_model`` (alpha query expansion over the queries and the kept gallery);
    ``roc``: also fast-reid's TPR@FPR report (``tpr_at_fpr``, percent)."""
    if query.model != gallery.model:
        raise ValueError(f"query and gallery come from different models: {query.model} and {gallery.model}")
    width = (query.features.features.shape[1], gallery.features.features.shape[1])
    if width[0] != width[1]:
        raise ValueError(f"query and gallery features differ in width: {width[0]} and {width[1]}")
    metric = resolve_distance(check_choice("distance", distance, DISTANCES), query.model)
    if rerank is False and (k1 is not None or k2 is not None):  # as the command line's --k1 without --rerank
        raise ValueError("k1 and k2 are re-ranking's: pass rerank=True (or 'kreciprocal', 'gnn'), or leave them None")
    method, k1, k2, lambda_value = check_reranking(rerank, k1, k2, lambda_value, metric)
    expansion = check_aqe(aqe)
    check_count("max_rank", max_rank, 10, why=" (Rank-10 is reported)")  # 1..9 was an IndexError
    roc = check_flag(None, "roc", roc)
    device = resolve_device(str(as_device(device)), "device")  # "cuda" without CUDA: torch's AssertionError
    unknown = int((query.features.pids == UNKNOWN_PID).sum())
    if unknown:
        raise ValueError(
            f"{unknown} of {len(query.features)} queries have no identity (pid -1: names not Market-style "
            "<pid>_c<camera>...): ranking scores each query against its identity"
        )
    kept = gallery.features.select(gallery.features.pids != UNKNOWN_PID)
    if len(kept) == 0:
        raise ValueError("no gallery item has an identity (pid -1 only: names not Market-style)")
    options = dict(k1=k1, k2=k2, lambda_value=lambda_value)
    steps = dict(aqe=expansion or False, rerank=method or False)
    distmat = compute_distances(query.features, kept, metric, device=device, **steps, **options)
    metrics = rank_metrics(distmat, query.features, kept, max_rank=min(max_rank, len(kept)), roc=roc)
    settings = dict(
        model=query.model,
        distance=metric,
        rerank=method is not None,
        **(dict(rerank_method=method, **options) if method else {}),
        aqe=expansion or False,
        roc=roc,
        num_gallery=len(kept),
        gallery_without_identity=len(gallery.features) - len(kept),
    )
    return {**metrics, "settings": settings}
