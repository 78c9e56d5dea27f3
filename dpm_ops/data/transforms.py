"""Image transforms for DPM and MaskReID, and paired image + mask transforms (torch and Pillow only).

Every transform is a callable ``t(image, generator=None)``; random ones draw their parameters from
``generator`` (a ``torch.Generator``; the global torch RNG when None), so a sample's augmentation
is reproducible from one seed. ``t.pair(image, mask, generator)`` applies the same geometry to an
image and its foreground mask (same resize, flip, padding and crop window; masks use nearest
resampling and zero padding), while photometric steps (colour jitter, normalisation, random
erasing) touch the image only. After :class:`ToTensor` the mask is a float tensor (1, H, W) in {0, 1}.

Recipes (DPM's official configs; MaskReID's paper and the DGD test geometry):

* DPM train: bicubic resize 256x128, [colour jitter], flip 0.5, pad 10, random crop 256x128,
  to tensor, normalise mean = std = 0.5, timm-style random erasing (p 0.5, pixel mode).
  DPM test: bilinear resize 256x128, to tensor, normalise.
* MaskReID (DGD's pipeline): resize 160x64, random crop 144x56 + flip at train, centre crop at test;
  subtract DGD's mean pixel on the 0-255 scale without dividing by a std. The masked input is
  ``mask * image`` in normalised space, i.e. background = the mean pixel (see :func:`masked_image`).
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from dpm_ops.ops._checks import (
    MAX_IMAGE_SIDE,
    check_flag,
    check_int,
    check_int_list,
    check_known_options,
    check_real,
    is_integer,
    quote,
)

from .image_io import MASK_THRESHOLD, as_mask, as_rgb

DPM_MEAN = (0.5, 0.5, 0.5)
DPM_STD = (0.5, 0.5, 0.5)
# DGD's Caffe mean pixel is BGR (102, 102, 101); in RGB on the [0, 1] scale:
MASKREID_MEAN = (101 / 255, 102 / 255, 102 / 255)
# DGD subtracts the mean on the 0-255 scale and does not divide: std 1/255 undoes ToTensor's 1/255.
MASKREID_STD = (1 / 255, 1 / 255, 1 / 255)

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _uniform(generator: Optional[torch.Generator], low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _fitting(crop, image) -> tuple[int, int]:
    """A crop's (height, width), which the image must hold."""
    height, width = crop.size
    if image.height < height or image.width < width:
        raise ValueError(
            f"{type(crop).__name__}: cannot crop (height, width) = ({height}, {width}) "
            f"from a {image.height} x {image.width} image"
        )
    return height, width


def _randint(generator: Optional[torch.Generator], low: int, high: int) -> int:
    """Uniform integer in [low, high], both inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


class Transform:
    """Base: photometric by default, i.e. ``pair`` transforms the image and passes the mask through."""

    def __call__(self, image, generator: Optional[torch.Generator] = None):
        raise NotImplementedError

    def pair(self, image, mask, generator: Optional[torch.Generator] = None):
        return self(image, generator), mask

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Compose(Transform):
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    @staticmethod
    def _rgb(image) -> Image.Image:
        """An RGB PIL image, as the files are read (a 16-bit one given as it is went white)."""
        if not isinstance(image, Image.Image):  # every recipe starts on a PIL image
            raise ValueError(f"image must be a PIL.Image (e.g. image_io.read_image's), got {type(image).__name__}")
        return image if image.mode == "RGB" else as_rgb(image, "image")

    def __call__(self, image, generator=None):
        image = self._rgb(image)
        for transform in self.transforms:
            image = transform(image, generator)
        return image

    def pair(self, image, mask, generator=None):
        image = self._rgb(image)
        # every mask read as the files are: another size was stretched to the image's, a 0 / 1 'L' label
        # image thresholded to all background, silently
        mask = as_mask(mask, "given to pair()", image.size)
        for transform in self.transforms:
            image, mask = transform.pair(image, mask, generator)
        return image, mask


class Resize(Transform):
    """Resize a PIL image to ``size = (height, width)``."""

    def __init__(self, size: tuple[int, int], interpolation: str = "bilinear"):
        if interpolation not in _RESAMPLING:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLING)}")
        self.size = check_int_list("Resize", "size", size, 1, MAX_IMAGE_SIDE, length=2, why=" (height, width)")
        self.interpolation = interpolation

    def __call__(self, image, generator=None):
        height, width = self.size
        return image.resize((width, height), _RESAMPLING[self.interpolation])

    def pair(self, image, mask, generator=None):
        height, width = self.size
        return self(image), mask.resize((width, height), Image.Resampling.NEAREST)


class RandomHorizontalFlip(Transform):
    def __init__(self, p: float = 0.5):
        self.p = check_real("RandomHorizontalFlip", "p", p, 0, 1)

    def __call__(self, image, generator=None):
        return self.pair(image, None, generator)[0]

    def pair(self, image, mask, generator=None):
        if torch.rand((), generator=generator).item() < self.p:
            image = ImageOps.mirror(image)
            mask = None if mask is None else ImageOps.mirror(mask)
        return image, mask


class Pad(Transform):
    """Pad every side by ``padding`` pixels with ``fill`` (masks are padded with background).

    ``fill``: one value for every channel (as torchvision's ``Pad``) or one per channel."""

    def __init__(self, padding: int, fill: int | Sequence[int] = 0):
        self.padding = check_int("Pad", "padding", padding, 0, MAX_IMAGE_SIDE)
        # checked here, not at the first image in a loader worker (PIL clipped 300 to 255, cut 4 values to 3)
        if is_integer(fill):
            self.fill = check_int("Pad", "fill", fill, 0, 255, why=" (an 8-bit value for every channel)")
        else:
            self.fill = check_int_list("Pad", "fill", fill, 0, 255, length=3, why=" (8-bit RGB, or one int for all)")

    def __call__(self, image, generator=None):
        # PIL reads a bare int as a packed pixel, which would fill an RGB border with (fill, 0, 0)
        fill = (self.fill,) * len(image.getbands()) if isinstance(self.fill, int) else tuple(self.fill)
        return ImageOps.expand(image, border=self.padding, fill=fill)

    def pair(self, image, mask, generator=None):
        return self(image), ImageOps.expand(mask, border=self.padding, fill=0)


class RandomCrop(Transform):
    """Crop a random ``size = (height, width)`` window (uniform over all positions)."""

    def __init__(self, size: tuple[int, int]):
        self.size = check_int_list("RandomCrop", "size", size, 1, MAX_IMAGE_SIDE, length=2, why=" (height, width)")

    def _window(self, image, generator) -> tuple[int, int, int, int]:
        height, width = _fitting(self, image)
        top = _randint(generator, 0, image.height - height)
        left = _randint(generator, 0, image.width - width)
        return left, top, left + width, top + height

    def __call__(self, image, generator=None):
        return image.crop(self._window(image, generator))

    def pair(self, image, mask, generator=None):
        window = self._window(image, generator)
        return image.crop(window), mask.crop(window)


class CenterCrop(Transform):
    def __init__(self, size: tuple[int, int]):
        self.size = check_int_list("CenterCrop", "size", size, 1, MAX_IMAGE_SIDE, length=2, why=" (height, width)")

    def _window(self, image) -> tuple[int, int, int, int]:
        height, width = _fitting(self, image)
        top = (image.height - height) // 2
        left = (image.width - width) // 2
        return left, top, left + width, top + height

    def __call__(self, image, generator=None):
        return image.crop(self._window(image))

    def pair(self, image, mask, generator=None):
        window = self._window(image)
        return image.crop(window), mask.crop(window)


class ColorJitter(Transform):
    """Random brightness, contrast, saturation and hue, applied in a random order.

    Factors are drawn uniformly from [max(0, 1 - x), 1 + x]; the hue shift from [-hue, hue] of a
    full turn (hue <= 0.5).
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        self.brightness, self.contrast, self.saturation = (
            check_real("ColorJitter", name, value, 0)
            for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation))
        )
        self.hue = check_real("ColorJitter", "hue", hue, 0, 0.5, why=" (of a full turn)")

    @staticmethod
    def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
        # torchvision's PIL path adds np.array(shift * 255).astype(np.uint8): truncated toward zero, wrapping
        hsv = np.array(image.convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(shift * 255)) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")

    def __call__(self, image, generator=None):
        steps = []
        if self.brightness > 0:
            factor = _uniform(generator, max(0.0, 1 - self.brightness), 1 + self.brightness)
            steps.append(lambda im, f=factor: ImageEnhance.Brightness(im).enhance(f))
        if self.contrast > 0:
            factor = _uniform(generator, max(0.0, 1 - self.contrast), 1 + self.contrast)
            steps.append(lambda im, f=factor: ImageEnhance.Contrast(im).enhance(f))
        if self.saturation > 0:
            factor = _uniform(generator, max(0.0, 1 - self.saturation), 1 + self.saturation)
            steps.append(lambda im, f=factor: ImageEnhance.Color(im).enhance(f))
        if self.hue > 0:
            shift = _uniform(generator, -self.hue, self.hue)
            steps.append(lambda im, s=shift: self._shift_hue(im, s))
        for index in torch.randperm(len(steps), generator=generator).tolist():
            image = steps[index](image)
        return image


class ToTensor(Transform):
    """PIL RGB -> float tensor (3, H, W) in [0, 1]; masks -> float tensor (1, H, W) in {0, 1}."""

    def __call__(self, image, generator=None):
        array = np.array(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)

    def pair(self, image, mask, generator=None):
        foreground = np.array(mask.convert("L"), dtype=np.uint8) >= MASK_THRESHOLD
        return self(image), torch.from_numpy(foreground).float().unsqueeze(0)


class Normalize(Transform):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if not (
            isinstance(mean, (tuple, list)) and len(mean) == 3 and isinstance(std, (tuple, list)) and len(std) == 3
        ):
            raise ValueError(f"Normalize: mean and std must hold 3 values (R, G, B), got {mean!r} and {std!r}")
        self.mean = tuple(check_real("Normalize", "mean", value, -math.inf) for value in mean)
        self.std = tuple(check_real("Normalize", "std", value, 0, low_open=True) for value in std)

    def __call__(self, tensor, generator=None):
        mean = torch.tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor - mean) / std


class RandomErasing(Transform):
    """timm-style random erasing on a normalised tensor (timm 0.4.9 defaults, as DPM trains).

    With probability ``probability`` erase ``count`` rectangles (count uniform in 1..max_count),
    each of area U(area) * image area / count and log-uniform aspect ratio in ``aspect``, trying up
    to ``attempts`` times per rectangle to fit it inside the image. ``mode``: ``"pixel"`` fills with
    per-pixel N(0, 1) noise, ``"rand"`` with one N(0, 1) value per channel, ``"const"`` with 0.
    ``noise_std`` scales the noise per channel (1: timm's, for data normalised to about unit spread).
    """

    def __init__(
        self,
        probability: float = 0.5,
        area: tuple[float, float] = (0.02, 1 / 3),
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
        mode: str = "pixel",
        max_count: int = 1,
        attempts: int = 10,
        noise_std: Sequence[float] = (1.0, 1.0, 1.0),
    ):
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"RandomErasing: mode must be 'pixel', 'rand' or 'const', got {mode!r}")
        self.probability = check_real("RandomErasing", "probability", probability, 0, 1)
        self.area, self.aspect = (_checked_range(name, value) for name, value in (("area", area), ("aspect", aspect)))
        if self.area[1] > 1:
            raise ValueError(f"RandomErasing: area must be a range of shares of the image within (0, 1], got {area!r}")
        self.mode = mode
        self.max_count = check_int("RandomErasing", "max_count", max_count, 1)
        self.attempts = check_int("RandomErasing", "attempts", attempts, 1)
        if not (isinstance(noise_std, (tuple, list)) and len(noise_std) == 3):
            raise ValueError(f"RandomErasing: noise_std must hold 3 values (R, G, B), got {quote(noise_std)}")
        self.noise_std = tuple(check_real("RandomErasing", "noise_std", v, 0, low_open=True) for v in noise_std)

    def __call__(self, tensor, generator=None):
        if self.noise_std != (1.0, 1.0, 1.0) and tensor.shape[0] != 3:  # else a raw broadcast error, sometimes
            raise ValueError(f"RandomErasing: noise_std holds 3 values (R, G, B), the tensor {tuple(tensor.shape)} not")
        if torch.rand((), generator=generator).item() >= self.probability:
            return tensor
        tensor = tensor.clone()
        channels, height, width = tensor.shape
        count = _randint(generator, 1, self.max_count)
        log_aspect = (math.log(self.aspect[0]), math.log(self.aspect[1]))
        for _ in range(count):
            for _ in range(self.attempts):
                target_area = _uniform(generator, *self.area) * height * width / count
                aspect = math.exp(_uniform(generator, *log_aspect))
                box_h = int(round(math.sqrt(target_area * aspect)))
                box_w = int(round(math.sqrt(target_area / aspect)))
                if box_w < width and box_h < height:
                    top = _randint(generator, 0, height - box_h)
                    left = _randint(generator, 0, width - box_w)
                    tensor[:, top : top + box_h, left : left + box_w] = self._fill(
                        channels, box_h, box_w, tensor.dtype, generator
                    )
                    break
        return tensor

    def _fill(self, channels, height, width, dtype, generator) -> torch.Tensor:
        if self.mode == "const":
            return torch.zeros((channels, 1, 1), dtype=dtype)
        size = (channels, height, width) if self.mode == "pixel" else (channels, 1, 1)
        noise = torch.randn(size, generator=generator, dtype=dtype)
        return (
            noise
            if self.noise_std == (1.0, 1.0, 1.0)
            else noise * torch.tensor(self.noise_std, dtype=dtype).view(-1, 1, 1)
        )


def _checked_range(name: str, value) -> tuple[float, float]:
    """RandomErasing's (low, high) of an area share or an aspect ratio: 0 < low <= high."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"RandomErasing: {name} must be a (low, high) pair, got {value!r}")
    low = check_real("RandomErasing", f"{name}[0]", value[0], 0, low_open=True)
    return low, check_real("RandomErasing", f"{name}[1]", value[1], low, why=f" ({name}[0])")


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MaskReID's masked input from a normalised image and its {0, 1} mask.

    The paper fills the background with the mean pixel: mask * x + (1 - mask) * mean, which after
    normalisation is simply mask * normalised(x).
    """
    return image * mask


# ---------------------------------------------------------------------------------------------
# recipes


def dpm_train_transforms(
    size: tuple[int, int] = (256, 128),
    padding: int = 10,
    flip: float = 0.5,
    erasing: float = 0.5,
    color_jitter: bool = False,
    mean: Sequence[float] = DPM_MEAN,
    std: Sequence[float] = DPM_STD,
) -> Compose:
    """DPM's training pipeline; ``color_jitter`` is its Occluded-REID setting."""
    erasing = check_real("dpm_train_transforms", "erasing", erasing, 0, 1, why=" (a probability)")
    steps: list[Transform] = [Resize(size, "bicubic")]
    if check_flag("dpm_train_transforms", "color_jitter", color_jitter):
        steps.append(ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.2))
    steps += [RandomHorizontalFlip(flip), Pad(padding), RandomCrop(size), ToTensor(), Normalize(mean, std)]
    if erasing > 0:
        steps.append(RandomErasing(probability=erasing, mode="pixel", max_count=1))
    return Compose(steps)


def dpm_test_transforms(size: tuple[int, int] = (256, 128), mean=DPM_MEAN, std=DPM_STD) -> Compose:
    return Compose([Resize(size, "bilinear"), ToTensor(), Normalize(mean, std)])


def maskreid_train_transforms(
    resize: tuple[int, int] = (160, 64),
    crop: tuple[int, int] = (144, 56),
    flip: float = 0.5,
    erasing: float = 0.0,
    mean: Sequence[float] = MASKREID_MEAN,
    std: Sequence[float] = MASKREID_STD,
) -> Compose:
    """DGD's pipeline used by MaskReID; random erasing (off by default) is not in the paper."""
    erasing = check_real("maskreid_train_transforms", "erasing", erasing, 0, 1, why=" (a probability)")
    _check_crop_fits("maskreid_train_transforms", resize, crop)
    steps: list[Transform] = [
        Resize(resize, "bilinear"),
        RandomCrop(crop),
        RandomHorizontalFlip(flip),
        ToTensor(),
        Normalize(mean, std),
    ]
    if erasing > 0:  # DPM's noise in grey levels (N(0, 1) at its std 0.5: 127.5), whatever this pipeline's scale
        noise_std = tuple(dpm / own for dpm, own in zip(DPM_STD, std))
        steps.append(RandomErasing(probability=erasing, mode="pixel", noise_std=noise_std))
    return Compose(steps)


def maskreid_test_transforms(
    resize: tuple[int, int] = (160, 64), crop: tuple[int, int] = (144, 56), mean=MASKREID_MEAN, std=MASKREID_STD
) -> Compose:
    _check_crop_fits("maskreid_test_transforms", resize, crop)
    return Compose([Resize(resize, "bilinear"), CenterCrop(crop), ToTensor(), Normalize(mean, std)])


def _check_crop_fits(owner: str, resize, crop) -> None:
    """A crop within the resized image: a larger one failed at the first image, inside the data loader."""
    if all(isinstance(v, (tuple, list)) and len(v) == 2 for v in (resize, crop)) and (
        crop[0] > resize[0] or crop[1] > resize[1]
    ):
        raise ValueError(f"{owner}: crop {tuple(crop)} must fit in resize {tuple(resize)} (height, width)")


_RECIPES = {
    "dpm": (dpm_train_transforms, dpm_test_transforms),
    "maskreid": (maskreid_train_transforms, maskreid_test_transforms),
}


def build_transforms(recipe: str, train: bool, **options) -> Compose:
    """``build_transforms("dpm", train=True, color_jitter=True)`` and the like."""
    if not isinstance(recipe, str) or recipe not in _RECIPES:
        raise ValueError(f"unknown transform recipe {recipe!r}; available: {sorted(_RECIPES)}")
    build = _RECIPES[recipe][0 if check_flag("build_transforms", "train", train) else 1]
    check_known_options(f"build_transforms: {build.__name__}", options, inspect.signature(build).parameters)
    return build(**options)
