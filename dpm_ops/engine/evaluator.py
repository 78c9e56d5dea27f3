"""Evaluation engine: feature extraction, each model's test metric, optional alpha query expansion
and k-reciprocal or GNN re-ranking, Market-1501 CMC / mAP / mINP on all, clean and occluded queries, metrics.json and
pictures.

Each model's test feature, transform and distance come from its recipe (:mod:`.recipes`): DPM's
query-masked arccos ``arccos(clip(<q̂, n(m_q ⊙ ĝ)>, -1+1e-5, 1-1e-5))`` on its features and channel
masks, the Euclidean distance of L2-normalised features for the others.

Precision: features are extracted in fp32 unless an autocast dtype is passed (the official
code trains under fp16 autocast and tests in fp32; the config's ``eval.amp`` chooses).

Protocols: Market-1501 single-query CMC / mAP / mINP; CUHK03 single-gallery-shot CMC
(``protocol="cuhk03"``, see :func:`dpm_ops.evaluation.evaluate_rank`); Market-1501 multi-query
(``multi_query="avg" | "max"``, :func:`pool_multi_query`).

Under ``torch.distributed`` every rank extracts a contiguous shard of the query and gallery
lists and rank 0 gathers them (in dataset order) and computes everything.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Optional

import torch

from dpm_ops.data import ReIDSplits
from dpm_ops.evaluation import PROTOCOLS
from dpm_ops.evaluation.query_expansion import check_aqe
from dpm_ops.evaluation.rank import MAX_REPEATS
from dpm_ops.evaluation._inputs import check_choice, check_count
from dpm_ops.ops._checks import check_flag, quote

from .checkpoint import atomic_write
from .extraction import (
    MULTI_QUERY,
    FeatureSet,
    _check_image_size,
    _extract_split,
    as_device,
    eval_transform,
    extract_features,
    pool_multi_query,
    unwrap_ddp,
)
from .pictures import PICTURES, dpm_token_maps, write_pictures
from .recipes import get_recipe, recipe_name_of
from .scoring import (
    DISTANCES,
    check_reranking,
    compute_distances,
    format_metrics_table,
    query_subsets,
    rank_metrics,
    resolve_distance,
)

# The engine's pieces, importable from here as before the split into extraction / scoring / pictures.
__all__ = [
    "DISTANCES",
    "MULTI_QUERY",
    "FeatureSet",
    "compute_distances",
    "dpm_token_maps",
    "eval_transform",
    "evaluate_model",
    "extract_features",
    "format_metrics_table",
    "pool_multi_query",
    "query_subsets",
    "rank_metrics",
    "resolve_distance",
    "write_json_atomic",
    "write_pictures",
]


def write_json_atomic(path: str, payload) -> None:
    """Write JSON atomically (:func:`dpm_ops.engine.checkpoint.atomic_write`): a reader, or a run
    killed half-way, never sees a partial file."""

    def write(handle) -> None:
        text = io.TextIOWrapper(handle, encoding="utf-8")
        json.dump(payload, text, indent=1)
        text.write("\n")
        text.detach()  # flushed; the binary handle stays atomic_write's to sync and close

    atomic_write(path, write)


def evaluate_model(
    model: torch.nn.Module,
    splits: ReIDSplits,
    *,
    model_name: str,
    image_size=None,
    batch_size: int = 128,
    num_workers: int = 0,
    device="cpu",
    amp_dtype: Optional[torch.dtype] = None,
    flip: bool = False,
    distance: str = "auto",
    aqe=False,
    rerank=False,
    k1: Optional[int] = None,
    k2: Optional[int] = None,
    lambda_value: float = 0.3,
    max_rank: int = 50,
    protocol: str = "market1501",
    num_repeats: int = 10,
    seed: int = 0,
    multi_query: str = "off",
    roc: bool = False,
    out_dir: Optional[str] = None,
    pictures: bool = True,
    progress: bool = True,
    record: Optional[dict] = None,
) -> Optional[dict]:
    """Evaluate ``model`` on ``splits.query`` against ``splits.gallery``.

    ``image_size`` (height, width): the network input, default the model's own for the ViT models
    (another is a ValueError: their position embedding fixes it); MaskReID resizes to 160x64 and
    centre-crops 144x56 by default, and an explicit size is the crop). ``distance``: "auto" (the model's
    test metric, see the module docstring), "euclidean", "cosine" or "masked_arccos" (DPM only). ``aqe``: True
    or a dict of k, alpha, times (default 5, 3.0, 1): alpha query expansion of the pooled features before the
    distance (fast-reid's TEST.AQE). ``rerank``: True / "kreciprocal" or "gnn" (GNN re-ranking) with k1, k2
    (None: the method's, 20 / 6, 26 / 7), lambda_value.
    ``amp_dtype``: extract under autocast to it (None: fp32). ``flip``: flip test-time augmentation (fast-reid's
    TEST.FLIP; ``extract_features``).
    ``protocol`` / ``num_repeats`` / ``seed``: as in ``evaluate_rank`` ("cuhk03": CUHK03's
    single-gallery-shot CMC). ``multi_query`` "avg" / "max": Market-1501 multi-query, each query
    pooled with the ``splits.multi_query`` (gt_bbox) images of its pid and camera
    (:func:`pool_multi_query`). ``roc``: also fast-reid's TPR@FPR report (TEST.ROC; percent, ``tpr_at_fpr``
    of each subset: its ``roc_report``). Returns ``{"all": {...}, "clean": {...}, "occluded": {...}}``
    (clean/occluded: query subsets against the same gallery, present when the dataset labels
    occlusion), each with rank1, rank5, rank10, mAP, mINP (percent), num_query, num_valid and the
    CMC curve ``cmc`` (max_rank values, percent). With ``out_dir``: writes ``metrics.json`` (atomically;
    the metrics plus a ``settings`` entry, to which ``record``'s entries are added: ``dpm-reid eval`` records its
    weights file there) and, with ``pictures``, cmc.png, ranked_best.png,
    ranked_worst.png and (DPM) masks.png. Under torch.distributed every rank calls it; rank 0 returns the
    metrics, others None."""
    recipe = get_recipe(model_name)
    network = _check_model_and_splits(model, splits, model_name)
    image_size = recipe.eval_input_size(network, _check_image_size(image_size))
    metric = resolve_distance(distance, model_name)
    _check_options(splits, model_name, max_rank, batch_size, protocol, num_repeats, seed, multi_query)
    method, k1, k2, lambda_value = check_reranking(rerank, k1, k2, lambda_value, metric)
    expansion = _check_aqe(aqe, splits)
    flip, roc = check_flag(None, "flip", flip), check_flag(None, "roc", roc)
    _check_late_options(device, out_dir, pictures, progress, record)
    transform = recipe.test_transform(image_size)
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device, amp_dtype=amp_dtype, flip=flip)
    common.update(progress=progress)
    query = _extract_queries(model, splits, model_name, transform, multi_query, common)
    gallery = _extract_split(model, splits.gallery, splits, model_name, transform, desc="gallery", **common)
    if query is None:  # not rank 0
        return None
    scoring = dict(aqe=expansion or False, rerank=method or False, k1=k1, k2=k2, lambda_value=lambda_value)
    distmat = compute_distances(query, gallery, metric, device=device, **scoring)
    subsets = query_subsets(splits, splits.query)
    metrics = rank_metrics(distmat, query, gallery, subsets, max_rank, protocol, num_repeats, seed, roc)
    if out_dir is not None:
        protocol_options = dict(max_rank=max_rank, protocol=protocol, multi_query=multi_query)
        protocol_options.update(dict(num_repeats=num_repeats, seed=seed) if protocol == "cuhk03" else {})
        settings = _settings(model_name, splits.name, metric, recipe.test_input_size(image_size), amp_dtype, scoring)
        settings.update(num_query=len(query), num_gallery=len(gallery), flip=flip, roc=roc, **protocol_options)
        settings.update(record or {})
        context = dict(model=model, splits=splits, model_name=model_name, transform=transform, device=device)
        _write_outputs(out_dir, metrics, settings, pictures, (distmat, query, gallery, subsets), context)
    return metrics


def _write_outputs(out_dir, metrics, settings, pictures, ranking, context) -> None:
    """metrics.json (atomically, with its ``settings``) and, with ``pictures``, the ranking's pictures; an earlier
    evaluation's pictures are removed first (they sat beside the new metrics as theirs, also where a new one
    failed to write: a full disk)."""
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "metrics.json"), {**metrics, "settings": settings})
    remove_pictures(out_dir)
    if pictures:
        write_pictures(out_dir, metrics, *ranking, **context)


def remove_pictures(out_dir) -> None:
    """An earlier evaluation's pictures in ``out_dir`` (they would pass for those of the metrics.json written now)."""
    for earlier in PICTURES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, earlier))


def _settings(model_name, dataset, metric, image_size, amp_dtype, scoring) -> dict:
    """metrics.json's record of what was scored and how (the protocol's keys are added by the caller)."""
    settings = dict(model=model_name, dataset=dataset, distance=metric, rerank=scoring["rerank"] is not False)
    settings.update(image_size=list(image_size), amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off")
    if scoring["rerank"]:
        settings.update(rerank_method=scoring["rerank"], k1=scoring["k1"], k2=scoring["k2"])
        settings["lambda_value"] = scoring["lambda_value"]
    return {**settings, "aqe": scoring["aqe"]}


def _check_model_and_splits(model, splits, model_name: str) -> torch.nn.Module:
    """A model of ``model_name``'s recipe (another one's outputs failed after the first batch) and loaded splits;
    returns the network (unwrapped from DDP and torch.compile)."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    network = unwrap_ddp(model)
    network = getattr(network, "_orig_mod", network)  # torch.compile's wrapper: the module it compiles
    kind = recipe_name_of(network)
    if kind != model_name:
        raise ValueError(
            f"model_name {model_name!r} does not match the model, a {type(network).__name__}"
            + (f" (model_name {kind!r})" if kind else f" (not a {get_recipe(model_name).model_class.__name__})")
        )
    if not isinstance(splits, ReIDSplits):
        raise ValueError(f"splits must be the ReIDSplits of a dataset (build_dataset), got {type(splits).__name__}")
    return network


def _check_aqe(aqe, splits) -> Optional[dict]:
    """check_aqe's settings, with k within the pooled query + gallery images (found after the extraction)."""
    expansion = check_aqe(aqe)
    pooled = len(splits.query) + len(splits.gallery)
    if expansion is not None and expansion["k"] > pooled:
        raise ValueError(
            f"aqe k must be an integer in [1, {pooled}] (the query and gallery images), got {expansion['k']}"
        )
    return expansion


def _check_late_options(device, out_dir, pictures, progress, record) -> None:
    """What the writing would check after the extraction (minutes on a real dataset): now."""
    if record is not None and not (isinstance(record, dict) and all(isinstance(key, str) for key in record)):
        raise ValueError(f"record must be a dict of named entries for metrics.json's settings, got {quote(record)}")
    check_flag(None, "pictures", pictures)
    check_flag(None, "progress", progress)
    as_device(device)
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir} exists and is not a folder")


def _check_options(splits, model_name, max_rank, batch_size, protocol, num_repeats, seed, multi_query) -> None:
    """Checked before the extraction (minutes on a real dataset): evaluate_rank and pool_multi_query check protocol
    and the pooling mode again, but only after it."""
    check_count("max_rank", max_rank, 10, why=" (Rank-10 is reported)")
    check_count("batch_size", batch_size, 1)
    if not splits.query or not splits.gallery:
        raise ValueError(f"splits {splits.name!r} has an empty query or gallery list")
    if get_recipe(model_name).uses_masks and splits.mask_paths is None:
        raise ValueError(f"{model_name} needs foreground masks: load {splits.name!r} with with_masks=True")
    check_choice("protocol", protocol, PROTOCOLS)
    check_count("num_repeats", num_repeats, 1, MAX_REPEATS)
    check_count("seed", seed, 0)
    check_choice("multi_query", multi_query, MULTI_QUERY)
    if multi_query != "off" and splits.multi_query is None:
        raise ValueError(
            f"multi_query={multi_query!r} needs the multi-query pools of {splits.name!r} "
            "(Market-1501's gt_bbox/: load it with multi_query=True)"
        )


def _extract_queries(model, splits, model_name, transform, multi_query, common) -> Optional[FeatureSet]:
    """The query descriptors (None off rank 0), pooled with their multi-query images when asked."""
    query = _extract_split(model, splits.query, splits, model_name, transform, desc="query", **common)
    if multi_query == "off":
        return query
    wanted = {(r.pid, r.camid) for r in splits.query}
    pool_records = [r for r in splits.multi_query if (r.pid, r.camid) in wanted]
    pool = _extract_split(model, pool_records, splits, model_name, transform, desc="multi-query", **common)
    return None if query is None else pool_multi_query(query, pool, multi_query)
