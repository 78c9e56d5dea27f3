"""The data layer: dataset loaders and registry, the synthetic occluded set, transforms,
identity samplers and the image Dataset / DataLoader helpers."""

from .datasets import (
    available_datasets,
    build_dataset,
    load_cuhk03_np,
    load_dukemtmc_reid,
    load_market1501,
    load_msmt17,
    load_occluded_duke,
    load_occluded_reid,
    load_partial_reid,
    load_synthetic,
    register_dataset,
)
from .errors import DatasetCountWarning, DatasetError, DatasetNotFoundError
from .loader import ImageDataset, build_dataloader
from .masks import mask_path_for
from .records import ImageRecord, ReIDSplits
from .samplers import MaskReIDBatchSampler, RandomIdentityBatchSampler, SampleRef
from .synth import SynthConfig, ensure_synthetic_dataset, generate_synthetic_dataset
from .transforms import build_transforms, masked_image

__all__ = [
    "DatasetCountWarning",
    "DatasetError",
    "DatasetNotFoundError",
    "ImageDataset",
    "ImageRecord",
    "MaskReIDBatchSampler",
    "RandomIdentityBatchSampler",
    "ReIDSplits",
    "SampleRef",
    "SynthConfig",
    "available_datasets",
    "build_dataloader",
    "build_dataset",
    "build_transforms",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
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
