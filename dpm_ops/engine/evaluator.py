"""Evaluation engine: feature extraction, each model's test metric, optional k-reciprocal
re-ranking, Market-1501 CMC / mAP / mINP on all, clean and occluded queries, metrics.json and
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

import dataclasses
import io
import json
import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from dpm_ops.data import ImageDataset, ReIDSplits, build_dataloader
from dpm_ops.evaluation import PROTOCOLS, evaluate_rank, pairwise_distance, re_ranking, rerank_features
from dpm_ops.evaluation._inputs import check_count
from dpm_ops.ops import masked_arccos_distance

from . import distributed
from .checkpoint import atomic_write
from .recipes import get_recipe

DISTANCES = ("auto", "euclidean", "cosine", "masked_arccos")
MULTI_QUERY = ("off", "avg", "max")


@dataclasses.dataclass
class FeatureSet:
    """Descriptors of one split, in the order of its records."""

    features: torch.Tensor  # (N, D) float32, CPU
    masks: Optional[torch.Tensor]  # (N, D) float32 DPM channel masks, else None
    pids: torch.Tensor  # (N,) int64
    camids: torch.Tensor  # (N,) int64
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def concat(parts: Sequence["FeatureSet"]) -> "FeatureSet":
        """Concatenate shards in order; empty shards (which carry no feature width) are skipped."""
        filled = [p for p in parts if len(p)] or list(parts[:1])
        masks = None if filled[0].masks is None else torch.cat([p.masks for p in filled])
        return FeatureSet(
            torch.cat([p.features for p in filled]),
            masks,
            torch.cat([p.pids for p in filled]),
            torch.cat([p.camids for p in filled]),
            [path for p in filled for path in p.paths],
        )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP's forward broadcasts buffers (a collective): with uneven shards the ranks would
    # deadlock, and evaluation needs no gradient sync anyway.
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _model_cameras(model: torch.nn.Module) -> int:
    """Rows of the SIE camera embedding the camera ids index (0: the model takes no camera)."""
    embedding = getattr(getattr(model, "backbone", None), "sie_embed", None)
    return 0 if embedding is None else int(embedding.shape[0])


def extract_features(
    model: torch.nn.Module,
    loader,
    *,
    model_name: str,
    device="cpu",
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    normalize: bool = True,
    desc: str = "extract",
) -> FeatureSet:
    """Run ``model`` over ``loader`` (an evaluation loader of :class:`ImageDataset` items; paired
    image + mask items for MaskReID) in eval mode under ``torch.inference_mode`` and return the
    descriptors on the CPU in float32.

    ``normalize``: L2-normalise the features (the DPM / TransReID test recipe, ``FEAT_NORM: yes``;
    MaskReID's descriptor is unit-length already). The model's train/eval mode is restored after.
    """
    recipe = get_recipe(model_name)
    device = torch.device(device)
    model = _unwrap(model)
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(
            f"device is {device} but the model's parameters are on {param.device}; "
            f"move the model first or pass device={str(param.device)!r}"
        )
    num_cameras = _model_cameras(model)
    features, masks, pids, camids, paths = [], [], [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
                if recipe.uses_masks and "masked" not in batch:
                    raise ValueError(
                        f"{model_name} needs the paired image + mask loader (ImageDataset with "
                        "mask_paths); load the dataset with masks"
                    )
                if num_cameras and int(batch["camid"].max()) >= num_cameras:
                    raise ValueError(
                        f"camera id {int(batch['camid'].max())} in {batch['path'][0]!r}'s batch is "
                        f"out of range for the model's {num_cameras} camera embeddings (SIE): test "
                        f"camera ids must be 0..{num_cameras - 1} (dataset.test_camids for a "
                        "test-only set)"
                    )
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    feature, mask = recipe.test_forward(model, batch, device)
                feature = feature.float()
                if normalize:
                    feature = F.normalize(feature, dim=1)
                features.append(feature.cpu())
                if mask is not None:
                    masks.append(mask.float().cpu())
                pids.append(torch.as_tensor(batch["pid"], dtype=torch.int64))
                camids.append(torch.as_tensor(batch["camid"], dtype=torch.int64))
                paths.extend(batch["path"])
    finally:
        model.train(was_training)
    if not features:
        return FeatureSet(
            torch.zeros(0, 0), None, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), []
        )
    return FeatureSet(
        torch.cat(features), torch.cat(masks) if masks else None, torch.cat(pids), torch.cat(camids), paths
    )


# ------------------------------------------------------------------------------------ helpers


def eval_transform(model_name: str, image_size=None):
    """The test-time transform of ``model_name`` at network input ``image_size`` (None: the recipe's)."""
    return get_recipe(model_name).test_transform(image_size)


def _check_image_size(image_size):
    if image_size is None:
        return None
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        raise ValueError(f"image_size must be (height, width) positive integers, got {image_size!r}")
    return tuple(image_size)


def _shard(records: list, rank: int, world: int) -> list:
    """Contiguous shards in rank order, so concatenating the gathered parts restores the order."""
    n = len(records)
    return records[n * rank // world : n * (rank + 1) // world]


def _extract_split(
    model, records, splits, model_name, transform, *, batch_size, num_workers, device, amp_dtype, progress, desc
) -> Optional[FeatureSet]:
    info = distributed.current()
    rank, world = info.rank, info.world_size
    mask_paths = splits.mask_paths if get_recipe(model_name).uses_masks else None
    dataset = ImageDataset(_shard(records, rank, world), transform, mask_paths=mask_paths)
    loader = build_dataloader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.device(device).type == "cuda"
    )
    part = extract_features(
        model,
        loader,
        model_name=model_name,
        device=device,
        amp_dtype=amp_dtype,
        progress=progress and rank == 0,
        desc=desc,
    )
    if world == 1:
        return part
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(part, gathered, dst=0)
    return FeatureSet.concat(gathered) if rank == 0 else None


def pool_multi_query(query: FeatureSet, pool: FeatureSet, mode: str) -> FeatureSet:
    """Market-1501 multi-query (Zheng et al. 2015): every query's descriptor becomes the mean
    (``"avg"``) or element-wise maximum (``"max"``) of the descriptors of all ``pool`` images
    (gt_bbox) with its pid and camera, L2-normalised again (every recipe compares unit-length
    descriptors); DPM's channel masks are pooled the same way. The query image is one of those
    boxes in Market-1501 (same file name); a query whose file is not in ``pool`` is added to its
    own pool, so no query is pooled without its own image. Labels and paths stay the query's.
    """
    if mode not in MULTI_QUERY[1:]:
        raise ValueError(f"mode must be one of {MULTI_QUERY[1:]}, got {mode!r}")
    if (query.masks is None) != (pool.masks is None) and len(pool):
        raise ValueError("query and pool must both have DPM masks or both have none")
    pooled_names = {os.path.basename(path) for path in pool.paths}
    own = torch.tensor([os.path.basename(path) not in pooled_names for path in query.paths], dtype=torch.bool)
    own_images = FeatureSet(
        query.features[own],
        None if query.masks is None else query.masks[own],
        query.pids[own],
        query.camids[own],
        [p for p, o in zip(query.paths, own.tolist()) if o],
    )
    members = FeatureSet.concat([pool, own_images])
    keys = torch.stack([torch.cat([members.pids, query.pids]), torch.cat([members.camids, query.camids])], dim=1)
    groups, group_of = torch.unique(keys, dim=0, return_inverse=True)
    member_group, query_group = group_of[: len(members)], group_of[len(members) :]
    reduce = "mean" if mode == "avg" else "amax"

    def pooled(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(len(groups), values.shape[1])
        index = member_group[:, None].expand_as(values)
        return out.scatter_reduce_(0, index, values, reduce, include_self=False)[query_group]

    return FeatureSet(
        F.normalize(pooled(members.features), dim=1),
        None if query.masks is None else pooled(members.masks),
        query.pids,
        query.camids,
        query.paths,
    )


def resolve_distance(distance: str, model_name: str) -> str:
    """The metric "auto" stands for (the recipe's: DPM's masked arccos, Euclidean for the others)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    recipe = get_recipe(model_name)
    if distance == "auto":
        return recipe.test_distance
    if distance == "masked_arccos" and not recipe.test_masks:
        raise ValueError(f"distance='masked_arccos' needs DPM's channel masks; {model_name} has none")
    return distance


def compute_distances(
    query: FeatureSet,
    gallery: FeatureSet,
    distance: str,
    *,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    device="cpu",
) -> torch.Tensor:
    """(Q, G) float32 distances on ``device``; with ``rerank``, k-reciprocal re-ranked.

    Re-ranking: Euclidean / cosine features go through ``rerank_features`` (never an N x N
    matrix; for unit-length features the cosine distance 1 - cos = ||q - g||² / 2 and the
    re-ranked result is the same). DPM's masked arccos goes through ``re_ranking`` with the q-g
    matrix, q-q with each query's own mask and g-g with each gallery item's own mask. That
    distance is asymmetric, and it is re-ranked with ``orientation="rows"``: every item's
    neighbourhood is ranked under its own mask, as the test metric ranks the gallery under the
    query's. (The reference's reading, ``orientation="reference"``, would rank item i by the
    other items' masks, column i.) The angle is the geodesic distance between unit vectors, so
    it is passed as ``input="euclidean"`` and squared inside like a Euclidean distance (the
    angle ~ the chord for near neighbours).
    """
    device = torch.device(device)
    qf, gf = query.features.to(device), gallery.features.to(device)
    if distance == "masked_arccos":
        if query.masks is None or gallery.masks is None:
            raise ValueError("distance='masked_arccos' needs the masks of queries and gallery")
        qm, gm = query.masks.to(device), gallery.masks.to(device)
        q_g = masked_arccos_distance(qf, qm, gf)
        if not rerank:
            return q_g
        q_q = masked_arccos_distance(qf, qm, qf)
        g_g = masked_arccos_distance(gf, gm, gf)
        return re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value, input="euclidean", orientation="rows")
    if rerank:
        if distance == "cosine":
            qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
        return rerank_features(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
    return pairwise_distance(qf, gf, metric=distance)


def _subset_metrics(
    distmat, query: FeatureSet, gallery: FeatureSet, rows: Optional[torch.Tensor], max_rank: int, options: dict
) -> Optional[dict]:
    q_pids, q_camids = query.pids, query.camids
    if rows is not None:
        distmat, q_pids, q_camids = distmat[rows.to(distmat.device)], q_pids[rows], q_camids[rows]
    device = distmat.device
    result = evaluate_rank(
        distmat,
        q_pids.to(device),
        gallery.pids.to(device),
        q_camids.to(device),
        gallery.camids.to(device),
        max_rank=max_rank,
        **options,
    )
    cmc = [100.0 * float(v) for v in result.cmc]
    # A gallery smaller than max_rank cuts the CMC to its size, past which it would stay at its last value.
    rank = {k: cmc[min(k, len(cmc)) - 1] if len(cmc) == len(gallery.pids) else cmc[k - 1] for k in (1, 5, 10)}
    return {
        "rank1": rank[1],
        "rank5": rank[5],
        "rank10": rank[10],
        "mAP": 100.0 * result.mAP,
        "mINP": 100.0 * result.mINP,
        "num_query": int(len(q_pids)),
        "num_valid": int(result.num_valid),
        "cmc": cmc,
    }


def query_subsets(splits: ReIDSplits, query_records) -> dict:
    """{"clean": rows, "occluded": rows} of the queries (int64 index tensors), or {} when the
    dataset has no occlusion labels."""
    flags = [splits.is_occluded(record) for record in query_records]
    if not flags or flags[0] is None:
        return {}
    occluded = torch.tensor(flags, dtype=torch.bool)
    return {"clean": torch.nonzero(~occluded).flatten(), "occluded": torch.nonzero(occluded).flatten()}


def rank_metrics(
    distmat,
    query: FeatureSet,
    gallery: FeatureSet,
    subsets: Optional[dict] = None,
    max_rank: int = 50,
    protocol: str = "market1501",
    num_repeats: int = 10,
    seed: int = 0,
) -> dict:
    """{"all": {...}, "clean": {...}, "occluded": {...}} (percent) from a (Q, G) distance matrix;
    protocol / num_repeats / seed as in ``evaluate_rank``.

    A subset with no query, or with no query that has a match, is left out (with a warning for
    the latter)."""
    options = dict(protocol=protocol, num_repeats=num_repeats, seed=seed)
    metrics = {"all": _subset_metrics(distmat, query, gallery, None, max_rank, options)}
    for name, rows in (subsets or {}).items():
        if len(rows) == 0:
            continue
        try:
            metrics[name] = _subset_metrics(distmat, query, gallery, rows, max_rank, options)
        except ValueError as error:
            if "no query has a match" not in str(error):
                raise
            warnings.warn(f"query subset {name!r}: no query has a match in the gallery; left out", stacklevel=2)
    return metrics


def write_json_atomic(path: str, payload) -> None:
    """Write JSON atomically (:func:`dpm_ops.engine.checkpoint.atomic_write`): a reader, or a run
    killed half-way, never sees a partial file."""

    def write(handle) -> None:
        text = io.TextIOWrapper(handle, encoding="utf-8")
        json.dump(payload, text, indent=1)
        text.write("\n")
        text.detach()  # flushed; the binary handle stays atomic_write's to sync and close

    atomic_write(path, write)


def format_metrics_table(metrics: dict) -> str:
    """A plain-text table: one row per query subset (``all``, ``clean``, ``occluded``, ...),
    columns Rank-1 / Rank-5 / Rank-10 / mAP / mINP (percent) and the number of queries."""
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be the dict evaluate_model returns, got {type(metrics).__name__}")
    rows = [(name, values) for name, values in metrics.items() if isinstance(values, dict) and "mAP" in values]
    if not rows:
        raise ValueError("metrics holds no subset (a dict with rank1 / rank5 / rank10 / mAP / mINP / num_query)")
    header = f"{'queries':<10}{'Rank-1':>8}{'Rank-5':>8}{'Rank-10':>9}{'mAP':>8}{'mINP':>8}{'#queries':>10}"
    lines = [header, "-" * len(header)]
    for name, values in rows:
        try:
            lines.append(
                f"{name:<10}{values['rank1']:>8.1f}{values['rank5']:>8.1f}{values['rank10']:>9.1f}"
                f"{values['mAP']:>8.1f}{values['mINP']:>8.1f}{values['num_query']:>10d}"
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"metrics[{name!r}] is malformed: {error!r}") from error
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ engine


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
    distance: str = "auto",
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_rank: int = 50,
    protocol: str = "market1501",
    num_repeats: int = 10,
    seed: int = 0,
    multi_query: str = "off",
    out_dir: Optional[str] = None,
    pictures: bool = True,
    progress: bool = True,
) -> Optional[dict]:
    """Evaluate ``model`` on ``splits.query`` against ``splits.gallery``.

    ``image_size`` (height, width): the network input, default the recipe's ((256, 128) for the
    ViT models; MaskReID resizes to 160x64 and centre-crops 144x56, and an explicit size is the
    crop). ``distance``: "auto" (the model's test metric, see the module docstring), "euclidean",
    "cosine" or "masked_arccos" (DPM only). ``rerank``: k-reciprocal re-ranking with k1, k2,
    lambda_value. ``amp_dtype``: extract under autocast to that dtype (None: fp32).
    ``protocol`` / ``num_repeats`` / ``seed``: as in ``evaluate_rank`` ("cuhk03": CUHK03's
    single-gallery-shot CMC). ``multi_query`` "avg" / "max": Market-1501 multi-query, each query
    pooled with the ``splits.multi_query`` (gt_bbox) images of its pid and camera
    (:func:`pool_multi_query`). Returns ``{"all": {...}, "clean": {...}, "occluded": {...}}``
    (clean/occluded: query subsets against the same gallery, present when the dataset labels
    occlusion), each with rank1, rank5, rank10, mAP, mINP (percent), num_query, num_valid and the
    CMC curve ``cmc`` (max_rank values, percent). With ``out_dir``: writes ``metrics.json`` (atomically;
    the metrics plus a ``settings`` entry) and, with ``pictures``, cmc.png, ranked_best.png,
    ranked_worst.png and (DPM) masks.png.

    Under torch.distributed every rank must call it; rank 0 returns the metrics, others None.
    """
    recipe = get_recipe(model_name)
    image_size = _check_image_size(image_size)
    metric = resolve_distance(distance, model_name)
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 10:
        raise ValueError(f"max_rank must be an integer >= 10 (Rank-10 is reported), got {max_rank!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not splits.query or not splits.gallery:
        raise ValueError(f"splits {splits.name!r} has an empty query or gallery list")
    if recipe.uses_masks and splits.mask_paths is None:
        raise ValueError(f"{model_name} needs foreground masks: load {splits.name!r} with with_masks=True")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    check_count("num_repeats", num_repeats, 1)
    check_count("seed", seed, 0)
    if multi_query not in MULTI_QUERY:
        raise ValueError(f"multi_query must be one of {MULTI_QUERY}, got {multi_query!r}")
    if multi_query != "off" and splits.multi_query is None:
        raise ValueError(
            f"multi_query={multi_query!r} needs the multi-query pools of {splits.name!r} "
            "(Market-1501's gt_bbox/: load it with multi_query=True)"
        )

    transform = recipe.test_transform(image_size)
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device, amp_dtype=amp_dtype, progress=progress)
    query = _extract_split(model, splits.query, splits, model_name, transform, desc="query", **common)
    gallery = _extract_split(model, splits.gallery, splits, model_name, transform, desc="gallery", **common)
    pool = None
    if multi_query != "off":
        wanted = {(r.pid, r.camid) for r in splits.query}
        pool = _extract_split(
            model,
            [r for r in splits.multi_query if (r.pid, r.camid) in wanted],
            splits,
            model_name,
            transform,
            desc="multi-query",
            **common,
        )
    if query is None:  # not rank 0
        return None
    if pool is not None:
        query = pool_multi_query(query, pool, multi_query)

    distmat = compute_distances(
        query, gallery, metric, rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value, device=device
    )
    subsets = query_subsets(splits, splits.query)
    metrics = rank_metrics(distmat, query, gallery, subsets, max_rank, protocol, num_repeats, seed)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        settings = {
            "model": model_name,
            "dataset": splits.name,
            "distance": metric,
            "rerank": bool(rerank),
            "image_size": list(recipe.test_input_size(image_size)),
            "max_rank": max_rank,
            "num_query": len(query),
            "num_gallery": len(gallery),
            "protocol": protocol,
            "multi_query": multi_query,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        }
        if protocol == "cuhk03":
            settings.update(num_repeats=num_repeats, seed=seed)
        if rerank:
            settings.update(k1=k1, k2=k2, lambda_value=lambda_value)
        write_json_atomic(os.path.join(out_dir, "metrics.json"), {**metrics, "settings": settings})
        if pictures:
            write_pictures(
                out_dir,
                metrics,
                distmat,
                query,
                gallery,
                subsets,
                model=model,
                splits=splits,
                model_name=model_name,
                transform=transform,
                device=device,
            )
    return metrics


def write_pictures(
    out_dir: str,
    metrics: dict,
    distmat,
    query: FeatureSet,
    gallery: FeatureSet,
    subsets: dict,
    *,
    model=None,
    splits: Optional[ReIDSplits] = None,
    model_name: str = "",
    transform=None,
    device="cpu",
    num_queries: int = 8,
    top_k: int = 10,
) -> list[str]:
    """cmc.png, ranked_best.png, ranked_worst.png and, for a model with channel masks (DPM),
    masks.png in ``out_dir``."""
    from dpm_ops import visualize  # matplotlib only when pictures are asked for

    written = [os.path.join(out_dir, "cmc.png")]
    dataset = f" on {splits.name}" if splits is not None else ""
    visualize.plot_cmc(metrics, written[-1], title=f"CMC: {model_name}{dataset}")
    occluded = None
    if subsets:
        occluded = np.zeros(len(query), dtype=bool)
        occluded[subsets["occluded"].numpy()] = True
    dist_np = distmat.detach().float().cpu().numpy()
    for which in ("best", "worst"):
        written.append(os.path.join(out_dir, f"ranked_{which}.png"))
        visualize.plot_ranked_lists(
            query.paths,
            gallery.paths,
            dist_np,
            query.pids.numpy(),
            gallery.pids.numpy(),
            query.camids.numpy(),
            gallery.camids.numpy(),
            out_png=written[-1],
            which=which,
            num_queries=num_queries,
            top_k=top_k,
            q_occluded=occluded,
        )
    if query.masks is not None and model is not None:
        rows = _mask_examples(occluded, len(query), num_queries)
        token_maps = dpm_token_maps(
            model, [query.paths[i] for i in rows], query.camids[rows], query.masks[rows], transform, device
        )
        written.append(os.path.join(out_dir, "masks.png"))
        visualize.plot_mask_heatmaps(
            [query.paths[i] for i in rows],
            query.masks[rows].numpy(),
            written[-1],
            token_maps=token_maps,
            all_masks=query.masks.numpy(),
            occluded=None if occluded is None else occluded[rows],
            all_occluded=occluded,
        )
    return written


def _mask_examples(occluded: Optional[np.ndarray], num_query: int, count: int) -> np.ndarray:
    """Evenly spread queries; half occluded, half clean when the dataset says which."""
    if occluded is None:
        return np.unique(np.linspace(0, num_query - 1, min(count, num_query)).round().astype(np.int64))
    picks = []
    for group, share in ((np.flatnonzero(occluded), count - count // 2), (np.flatnonzero(~occluded), count // 2)):
        if len(group):
            picks.append(group[np.unique(np.linspace(0, len(group) - 1, min(share, len(group))).round().astype(int))])
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def dpm_token_maps(
    model, paths: Sequence[str], camids: torch.Tensor, masks: torch.Tensor, transform, device="cpu"
) -> np.ndarray:
    """(B, H_p, W_p) share of each final-LayerNorm patch token's energy that lies in the channels
    its image's mask keeps, relative to the mask's average: ``Σ_c m_c² t_c² / (Σ_c t_c² · mean_c m_c²)``.

    1 everywhere for a flat mask; > 1 where a patch's features sit in the kept channels, < 1 where
    they sit in the suppressed ones. DPM itself never computes a spatial map (the mask is a channel
    mask, dpm.md §2); this projects the channel mask back onto the patches for inspection only.
    """
    from dpm_ops.data.image_io import read_image

    model = _unwrap(model)
    device = torch.device(device)
    images = torch.stack([transform(read_image(path)) for path in paths]).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            backbone = model.backbone
            last = len(backbone.blocks) - 1
            feats = backbone.forward_features(images, camids.to(device), (last,))
            tokens = backbone.norm(feats.tapped_tokens[0]).float()  # (B, N, C)
    finally:
        model.train(was_training)
    m2 = masks.to(device).float().square()[:, None, :]  # (B, 1, C)
    energy = tokens.square()
    share = (energy * m2).sum(-1) / energy.sum(-1).clamp_min(1e-12) / m2.mean(-1).clamp_min(1e-12)
    return share.reshape(len(paths), *backbone.grid_size).cpu().numpy()
