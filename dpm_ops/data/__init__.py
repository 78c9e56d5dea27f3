"""The data layer: dataset loaders and registry, transforms, identity samplers and the image
Dataset / DataLoader helpers. The synthetic set's generator is :mod:`dpm_ops.data.synth` (imported
on demand, so ``python -m dpm_ops.data.synth`` runs cleanly); its loader is ``build_dataset("synthetic", root)``."""

from .combined import combine_datasets
from .datasets import (
    available_datasets,
    build_dataset,
    load_msmt17,
    load_occluded_reid,
    load_partial_reid,
    register_dataset,
)
from .errors import DatasetCountWarning, DatasetError, DatasetNotFoundError
from .layouts import load_cuhk03_np, load_dukemtmc_reid, load_market1501, load_occluded_duke, load_synthetic
from .loader import DecodedImages, ImageDataset, build_dataloader
from .masks import mask_path_for
from .records import ImageRecord, ReIDSplits
from .samplers import MaskReIDBatchSampler, RandomIdentityBatchSampler, SampleRef, SourceBalancedBatchSampler
from .transforms import build_transforms, masked_image

__all__ = [
    "DatasetCountWarning",
    "DatasetError",
    "DatasetNotFoundError",
    "DecodedImages",
    "ImageDataset",
    "ImageRecord",
    "MaskReIDBatchSampler",
    "RandomIdentityBatchSampler",
    "ReIDSplits",
    "SampleRef",
    "SourceBalancedBatchSampler",
    "available_datasets",
    "build_dataloader",
    "build_dataset",
    "build_transforms",
    "combine_datasets",
    "load_cuhk03_np",
    "load_dukemtmc_reid",
    "load_market1501",
    "load_msmt17",
    "load_occluded_duke",
    "load_occluded_reid",
    "load_partial_reid",
    "load_synthetic",
    "mask_path_for",
    "masked_image",
    "register_dataset",
]
