"""A torch Dataset over :class:`ImageRecord` lists and a DataLoader helper."""

from __future__ import annotations

import signal
from typing import Mapping, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DatasetError
from .image_io import as_mask, as_rgb, read_image, read_mask
from .records import ImageRecord
from .samplers import SampleRef
from .transforms import Transform, masked_image


class ImageDataset(Dataset):
    """Reads images (and foreground masks) with Pillow and applies a transform.

    An item is a dict: ``image`` (tensor), ``pid``, ``camid``, ``index`` and ``path``; with
    ``mask_paths`` also ``mask`` (1, H, W) in {0, 1} and ``masked`` (MaskReID's masked input,
    ``mask * image``), both produced by the transform's paired mode so they stay aligned.

    Indexing with a :class:`SampleRef` ``(index, seed)`` (what the identity samplers yield) seeds
    the transform with ``seed``, making the sample's augmentation independent of worker
    scheduling; a plain int uses the torch RNG of the worker.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Transform,
        mask_paths: Optional[Mapping[str, str]] = None,
    ):
        self.records = list(records)
        self.transform = transform
        self.mask_paths = mask_paths
        if mask_paths is not None:
            missing = [r.path for r in self.records if r.path not in mask_paths]
            if missing:
                raise DatasetError(f"{len(missing)} image(s) have no mask, first: {missing[0]}")

    @property
    def pids(self) -> list[int]:
        return [record.pid for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, index: int) -> tuple[Image.Image, Optional[Image.Image]]:
        """The record's RGB image and its binary mask (None without ``mask_paths``)."""
        path = self.records[index].path
        image = read_image(path)
        if self.mask_paths is None:
            return image, None
        return image, read_mask(self.mask_paths[path], expected_size=image.size)

    def __getitem__(self, key: Union[int, SampleRef, tuple]) -> dict:
        if isinstance(key, tuple):
            index, seed = key
            generator = torch.Generator().manual_seed(int(seed))
        else:
            index, generator = key, None
        record = self.records[index]
        image, mask = self._read(index)
        item = {"pid": record.pid, "camid": record.camid, "index": int(index), "path": record.path}
        if mask is None:
            item["image"] = self.transform(image, generator)
            return item
        image_tensor, mask_tensor = self.transform.pair(image, mask, generator)
        item.update(image=image_tensor, mask=mask_tensor, masked=masked_image(image_tensor, mask_tensor))
        return item


class DecodedImages(ImageDataset):
    """:class:`ImageDataset` items of images in memory, e.g. a tracker's crops: one record each, each image
    a PIL image, an (H, W, 3) / (H, W) uint8 array or a file path (read as RGB, 16-bit greyscale scaled to
    8 bits: :func:`~dpm_ops.data.image_io.as_rgb`), each mask, when given, of its image's size
    (:func:`~dpm_ops.data.image_io.as_mask`). The records name the images in errors."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        images: Sequence,
        transform: Transform,
        masks: Optional[Sequence] = None,
    ):
        super().__init__(records, transform)
        for name, given in (("images", images), ("masks", masks)):
            if given is not None and len(given) != len(self.records):
                raise ValueError(
                    f"DecodedImages: {name} must be one per record ({len(self.records)}), got {len(given)}"
                )
        # as the files are read: a 16-bit image given as it is went white, a mask of another size was stretched
        self.images = [as_rgb(image, record.path) for image, record in zip(images, self.records)]
        self.masks = None
        if masks is not None:
            self.masks = [
                as_mask(mask, f"masks[{i}]", image.size) for i, (mask, image) in enumerate(zip(masks, self.images))
            ]

    def _read(self, index: int) -> tuple[Image.Image, Optional[Image.Image]]:
        return self.images[index], None if self.masks is None else self.masks[index]


def _ignore_sigterm(worker_id: int) -> None:
    """A worker outlives a SIGTERM sent to the whole process group (SLURM's scancel and preemption): the training
    process stops after its step (engine/preemption.py), which needs the batches; it ends its workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_dataloader(
    dataset: ImageDataset,
    *,
    batch_sampler: Optional[Sampler] = None,
    batch_size: int = 256,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """A training loader (with an identity ``batch_sampler``) or, without one, an evaluation
    loader that keeps the dataset order in batches of ``batch_size`` (DPM tests with 256).

    ``seed`` fixes the torch RNG of the workers, which only matters for plain-int indexing.
    """
    generator = torch.Generator().manual_seed(seed)
    common = dict(
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=generator,
        worker_init_fn=_ignore_sigterm if num_workers > 0 else None,
    )
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **common)
