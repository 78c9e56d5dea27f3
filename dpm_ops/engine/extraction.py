"""Feature extraction for the evaluation engine: a model's test descriptors (and DPM's channel masks)
over a split, sharded over ``torch.distributed`` ranks and gathered on rank 0 in dataset order, and
Market-1501 multi-query pooling."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from dpm_ops.data import ImageDataset, build_dataloader
from dpm_ops.ops._checks import check_flag, check_int_list

from . import distributed
from .recipes import get_recipe, model_cameras

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

    def select(self, keep: torch.Tensor) -> "FeatureSet":
        """The items where the (N,) bool tensor ``keep`` is true, in order."""
        return FeatureSet(
            self.features[keep],
            None if self.masks is None else self.masks[keep],
            self.pids[keep],
            self.camids[keep],
            [path for path, kept in zip(self.paths, keep.tolist()) if kept],
        )

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


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    # DDP's forward broadcasts buffers (a collective): with uneven shards the ranks would
    # deadlock, and evaluation needs no gradient sync anyway.
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


AMP_DTYPES = (None, torch.float16, torch.bfloat16)


def as_device(device) -> torch.device:
    """``device`` (a torch.device or its name) as a torch.device; torch's own error for "gpu" names no argument."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a name such as cpu, cuda, cuda:N, got {device!r}") from None


def extract_features(
    model: torch.nn.Module,
    loader,
    *,
    model_name: str,
    device="cpu",
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    normalize: bool = True,
    flip: bool = False,
    desc: str = "extract",
) -> FeatureSet:
    """Run ``model`` over ``loader`` (an evaluation loader of :class:`ImageDataset` items; paired
    image + mask items for MaskReID) in eval mode under ``torch.inference_mode`` and return the
    descriptors on the CPU in float32.

    ``normalize``: L2-normalise the features (the DPM / TransReID test recipe, ``FEAT_NORM: yes``;
    MaskReID's descriptor is unit-length already). ``flip``: flip test-time augmentation, as fast-reid's
    TEST.FLIP: each image's outputs (feature, DPM's mask) averaged with those of its horizontal mirror
    (MaskReID's masked image mirrored with it), before the normalisation; twice the forward passes.
    The model's train/eval mode is restored after.
    """
    check_flag(None, "flip", flip)
    if amp_dtype not in AMP_DTYPES:  # autocast only warns, then runs without it
        raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")
    recipe = get_recipe(model_name)
    device = as_device(device)
    model = unwrap_ddp(model)
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(
            f"device is {device} but the model's parameters are on {param.device}; "
            f"move the model first or pass device={str(param.device)!r}"
        )
    num_cameras = model_cameras(model)
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
                    mirrored = recipe.test_forward(model, _mirrored(batch), device) if flip else None
                feature = feature.float()
                if mirrored is not None:
                    feature = (feature + mirrored[0].float()) / 2
                    mask = None if mask is None else (mask.float() + mirrored[1].float()) / 2
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


def _mirrored(batch: dict) -> dict:
    """An evaluation batch with its images (and MaskReID's masked images) flipped left to right."""
    return {**batch, **{key: batch[key].flip(-1) for key in ("image", "masked") if key in batch}}


def eval_transform(model_name: str, image_size=None):
    """The test-time transform of ``model_name`` at network input ``image_size`` (None: the recipe's)."""
    return get_recipe(model_name).test_transform(image_size)


def _check_image_size(image_size):
    if image_size is None:
        return None
    return check_int_list(None, "image_size", image_size, 1, length=2, why=" (height, width)")


def _shard(records: list, rank: int, world: int) -> list:
    """Contiguous shards in rank order, so concatenating the gathered parts restores the order."""
    n = len(records)
    return records[n * rank // world : n * (rank + 1) // world]


def _extract_split(
    model, records, splits, model_name, transform, *, batch_size, num_workers, device, amp_dtype, flip, progress, desc
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
        flip=flip,
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
    if not isinstance(query, FeatureSet) or not isinstance(pool, FeatureSet):
        raise ValueError(f"query and pool must be FeatureSets, got {type(query).__name__}, {type(pool).__name__}")
    if (query.masks is None) != (pool.masks is None) and len(pool):
        raise ValueError("query and pool must both have DPM masks or both have none")
    if len(pool) and pool.features.shape[1] != query.features.shape[1]:
        raise ValueError(
            f"query and pool features differ in width: {query.features.shape[1]} and {pool.features.shape[1]}"
        )
    pooled_names = {os.path.basename(path) for path in pool.paths}
    own = torch.tensor([os.path.basename(path) not in pooled_names for path in query.paths], dtype=torch.bool)
    members = FeatureSet.concat([pool, query.select(own)])
    keys = torch.stack([torch.cat([members.pids, query.pids]), torch.cat([members.camids, query.camids])], dim=1)
    groups, group_of = torch.unique(keys, dim=0, return_inverse=True)
    member_group, query_group = group_of[: len(members)], group_of[len(members) :]
    # a query whose file is in the pool under another pid or camera has no member: it pooled to zeros
    empty = torch.bincount(member_group, minlength=len(groups))[query_group] == 0
    if bool(empty.any()):
        first = query.paths[int(empty.nonzero()[0])]
        raise ValueError(
            f"{int(empty.sum())} queries (e.g. {first}) have no pool image of their pid and camera: their file is "
            "in the pool under another pid or camera"
        )
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
