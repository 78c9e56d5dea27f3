"""Loading pretrained weights from files on disk (nothing is downloaded).

Layouts recognised (after unwrapping a ``'model'`` / ``'state_dict'`` entry and stripping
``'module.'``):

* ``timm_vit``: a timm / JAX-ported ViT-B/16 (e.g. ``jx_vit_base_p16_224-80ecf9dd.pth``) into the
  ``backbone`` of DPM or the ViT baseline. Keys containing ``head`` or ``dist`` are dropped (the
  official rule), a 2-D ``patch_embed.proj.weight`` is reshaped to a conv kernel, and ``pos_embed``
  is resized to the model's patch grid (below).
* ``dpm_official``: an official DPM checkpoint (``base.* / classifier / bottleneck``): ``base.ConvLayer``
  and ``base.attfc`` go to ``mask_generator``, the rest of ``base`` to ``backbone``; the unused
  1000-way ``base.fc`` is dropped.
* ``torchvision_resnet50``: into ``MaskReIDResNet50``: ``fc`` dropped, everything under ``trunk``,
  and ``conv1`` / ``bn1`` also into the masked stream's stem.
* ``native``: a state dict of the model itself (e.g. a run's ``final.pt``, to start another from).

In every layout, a classifier of another number of classes or an SIE camera embedding of another number of cameras
(another training set's identities or cameras) is dropped, as torchreid's and fast-reid's loaders skip them.

:func:`trained_state_dict` reads a whole trained model (``native`` or ``dpm_official``) for evaluation.

Every problem raises :class:`WeightsError` (a ``ValueError``) naming the file: missing, not a
PyTorch weights file, not a state dict, a tensor of the wrong shape, a layout that does not fit
the model, and a file that fills fewer tensors than the model's backbone needs (:func:`backbone_keys`)
unless ``partial=True`` (config ``model.pretrained_partial: true``). Loading nothing at all is
always an error.

``pos_embed`` resize (TransReID's ``resize_pos_embed``): the CLS slot is kept; the source grid
(square, else TransReID's 2:1 rule) is resized to ``(num_y, num_x)`` with bilinear interpolation,
``align_corners=False``, no antialias.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from typing import Callable, NamedTuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpm_ops.ops._checks import first_line

from ._checks import MAX_IMAGE_SIDE, check_int_list
from .resnet import MaskReIDResNet50
from .vit import ViTReID

StateDict = dict[str, torch.Tensor]


class WeightsError(ValueError):
    """Pretrained weights that cannot be loaded into the model; the message names the file."""


class LoadReport(NamedTuple):
    layout: str
    loaded: list[str]  # model keys filled from the checkpoint
    missing: list[str]  # model keys the checkpoint did not provide (they keep their init)
    unexpected: list[str]  # checkpoint keys with no place in the model
    dropped: list[str]  # checkpoint keys discarded on purpose (classification heads)


def infer_grid(num_patches: int) -> tuple[int, int]:
    """Square grid if ``num_patches`` is a square, else TransReID's 2:1 rule: a height of 2w to 2w + 2
    for width w (16x8, 21x10, 22x11). Any other count is refused: its grid is ambiguous (7 tokens
    are 7x1 or 1x7), and reading it wrongly would interpolate a scrambled embedding."""
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    width = math.isqrt(num_patches // 2)
    if width and num_patches % width == 0 and 2 * width <= num_patches // width <= 2 * width + 2:
        return num_patches // width, width
    raise ValueError(f"cannot infer the patch grid of a {num_patches}-token position embedding")


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + N_src, C) -> (1, 1 + num_y·num_x, C), CLS slot kept, interpolated in at least float32 (an
    integer embedding was truncated). A ValueError for anything else (they were raw torch errors, or a 2-D
    embedding read as one of fewer tokens)."""
    if not (
        isinstance(pos_embed, torch.Tensor)
        and pos_embed.dim() == 3
        and pos_embed.shape[0] == 1
        and pos_embed.shape[1] >= 2
        and pos_embed.is_floating_point()
    ):
        got = f"{pos_embed.dtype} {tuple(pos_embed.shape)}" if isinstance(pos_embed, torch.Tensor) else type(pos_embed)
        raise ValueError(f"resize_pos_embed: pos_embed must be a (1, 1 + N, C) floating-point tensor, got {got}")
    grid_size = check_int_list("resize_pos_embed", "grid_size", grid_size, 1, MAX_IMAGE_SIDE, length=2)
    cls_slot, grid = pos_embed[:, :1], pos_embed[:, 1:]
    source_grid = infer_grid(grid.shape[1])
    dim = grid.shape[2]
    grid = grid.to(torch.promote_types(grid.dtype, torch.float32)).reshape(1, *source_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([cls_slot, grid], dim=1)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (since torch 1.6); older files are one pickle stream


def check_archive(path: Union[str, os.PathLike]) -> None:
    """A WeightsError naming ``path`` when torch.save's archive is cut short, its index cannot be read, or a
    record cannot be read or differs from the CRC-32 written with it: torch.load checks no CRC, and a flipped bit
    in a tensor (or in a record's header: torch then read from a shifted offset) loaded as a wrong weight without
    a word. Reads the file once more; records saved without a CRC (0, under
    ``torch.serialization.set_crc32_options(False)``) and files of the older format have nothing to check."""
    with open(path, "rb") as handle:
        if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return
    damaged = f"{os.fspath(path)} is damaged"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError):
        raise WeightsError(
            f"{os.fspath(path)} is cut short: its archive has no readable end (a copy or a write that did not "
            "finish, or damage there)"
        ) from None
    except Exception as error:  # a damaged index reads as anything (a name's encoding, a version field)
        raise WeightsError(f"{damaged}: its archive's index cannot be read ({type(error).__name__})") from None
    with archive:
        for record in archive.infolist():
            if record.CRC == 0:
                continue
            try:
                with archive.open(record) as data:
                    while data.read(1 << 24):  # the CRC is compared at the record's end
                        pass
            except Exception as error:  # a CRC mismatch (zipfile.BadZipFile), or a header that does not read
                raise WeightsError(
                    f"{damaged}: record {record.filename} does not read back as torch.save wrote it "
                    f"({first_line(error)}); the file changed after it was written (a disk or copy error)"
                ) from None


def read_torch_file(path: Union[str, os.PathLike], *, weights_only: bool = True, map_location="cpu"):
    """``torch.load`` after :func:`check_archive`; a file that is not one torch wrote, or one damaged since,
    raises WeightsError naming it."""
    check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(error))
        if refused is None:
            raise WeightsError(
                f"{os.fspath(path)} is not a PyTorch file written by torch.save (torch.load: UnpicklingError)"
            ) from error
        raise WeightsError(
            f"{os.fspath(path)} holds a Python object ({refused.group(1) or refused.group(2)}) that is not read: only tensors, numbers, "
            "strings and containers are (torch.load with weights_only=True; unpickling anything else could run "
            "code from the file)"
        ) from error
    except Exception as error:  # the unpickler fails on foreign bytes in many ways (KeyError on text, ...)
        raise WeightsError(
            f"{os.fspath(path)} is not a PyTorch file written by torch.save (torch.load: {type(error).__name__})"
        ) from error


def _read_state_dict(source: Union[str, os.PathLike, StateDict], name: str) -> StateDict:
    if isinstance(source, dict):
        state = source
    elif not isinstance(source, (str, os.PathLike)):
        raise WeightsError(f"source must be a .pth path or a state dict, got {type(source).__name__}")
    else:
        if not os.path.isfile(source):
            raise WeightsError(f"pretrained weights not found: {name}")
        state = read_torch_file(source)
    if not isinstance(state, dict):
        raise WeightsError(f"{name} holds a {type(state).__name__}, not a state dict (tensor names -> tensors)")
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    for key, value in state.items():
        if not isinstance(key, str):
            raise WeightsError(f"{name} is not a state dict: key {key!r} is a {type(key).__name__}, not a name")
        if not isinstance(value, torch.Tensor) or value.is_meta or value.layout != torch.strided:
            what = (
                f"a {'meta' if value.is_meta else 'sparse'} tensor"
                if isinstance(value, torch.Tensor)
                else f"a {type(value).__name__}"
            )
            raise WeightsError(f"{name} is not a state dict: entry {key!r} holds {what}, not a tensor")
        # load_state_dict would cast an integer, bool or complex tensor into a float parameter without a word
        if not value.is_floating_point() and not key.endswith("num_batches_tracked"):
            raise WeightsError(f"{name}: entry {key!r} holds {value.dtype} values, not floating-point weights")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise WeightsError(f"{name}: entry {key!r} holds NaN or inf values")
    unwrapped = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    if len(unwrapped) < len(state):  # one of a pair was dropped, silently
        both = next(k for k in state if k.startswith("module.") and k[len("module.") :] in state)
        raise WeightsError(
            f"{name} holds both {both!r} and {both[len('module.') :]!r}: a DDP wrapper's 'module.' prefix and the "
            "plain name of the same tensor; keep one of them"
        )
    return unwrapped


def backbone_keys(model: nn.Module) -> list[str]:
    """The tensors a pretrained file must fill unless a partial load is asked for: a ViT backbone
    without its SIE camera embedding (ImageNet weights have none), the ResNet-50 trunk, else every
    tensor outside the classifiers. BatchNorm's num_batches_tracked counters are no weights (older
    torchvision files, e.g. ResNet-50's ImageNet ones, have none), so they are never required."""
    own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if isinstance(getattr(model, "backbone", None), ViTReID):
        return [k for k in own if k.startswith("backbone.") and k != "backbone.sie_embed"]
    if isinstance(model, MaskReIDResNet50):
        return [k for k in own if k.startswith("trunk.")]
    return [k for k in own if not _is_classifier(k)]


def _pos_embed_for(backbone: nn.Module, tensor: torch.Tensor, where: str, target: str) -> torch.Tensor:
    """A checkpoint's position embedding resized to ``backbone``'s patch grid: one embedding (leading 1) of the CLS
    slot and at least one patch token, of the model's width; anything else a WeightsError naming ``where``."""
    width = backbone.pos_embed.shape[-1]
    if tensor.dim() != 3 or tensor.shape[0] != 1 or tensor.shape[1] < 2 or tensor.shape[-1] != width:
        raise WeightsError(
            f"{where} -> {target!r}: shape {tuple(tensor.shape)} cannot be resized to {tuple(backbone.pos_embed.shape)}"
        )
    try:
        return resize_pos_embed(tensor, backbone.grid_size)
    except ValueError as error:
        raise WeightsError(f"{where}: {error}") from error


def _is_classifier(key: str) -> bool:
    """A tensor of a classifier (DPM's and the ViT baseline's ``classifier``, MaskReID's ``head.classifier``)."""
    return ".classifier." in f".{key}"


def _of_the_training_set(key: str) -> bool:
    """A model tensor sized by its training set: the classifier (one row per identity), the SIE camera embedding."""
    return _is_classifier(key) or key.endswith("sie_embed")


def _detect_layout(state: StateDict) -> str:
    if any(k.startswith("base.") for k in state):
        return "dpm_official"
    if "cls_token" in state or "blocks.0.attn.qkv.weight" in state:
        return "timm_vit"
    if "layer1.0.conv1.weight" in state:
        return "torchvision_resnet50"
    return "native"


# Each mapper turns one checkpoint key into the model keys it fills; [] means dropped on purpose.
def _timm_targets(key: str) -> list[str]:
    return [] if "head" in key or "dist" in key else [f"backbone.{key}"]


def _dpm_official_targets(key: str) -> list[str]:
    renames = (
        ("base.ConvLayer.", "mask_generator.conv_stack."),
        ("base.attfc.", "mask_generator.attfc."),
        ("base.", "backbone."),
    )
    if key.startswith("base.fc."):
        return []
    for old, new in renames:
        if key.startswith(old):
            return [new + key[len(old) :]]
    return [key]


def _torchvision_targets(key: str) -> list[str]:
    if key.startswith("fc."):
        return []
    if key.startswith(("conv1.", "bn1.")):
        return [f"trunk.{key}", f"masked_stem.{key}"]
    return [f"trunk.{key}"]


_MAPPERS: dict[str, Callable[[str], list[str]]] = {
    "timm_vit": _timm_targets,
    "dpm_official": _dpm_official_targets,
    "torchvision_resnet50": _torchvision_targets,
    "native": lambda key: [key],
}


def trained_state_dict(source: Union[str, os.PathLike, StateDict], name: str | None = None) -> StateDict:
    """A whole trained model's tensors under the model's own key names: a ``native`` state dict
    (``torch.save(model.state_dict())`` of a dpm_ops model, e.g. in one's own training script) or an
    official DPM / TransReID release (``dpm_official``, e.g. ``transformer_150.pth``). An ImageNet
    backbone file (timm ViT, torchvision ResNet-50) is a WeightsError naming ``name`` (default: the
    path): it holds no re-ID head, so it starts a training (model.pretrained) instead."""
    name = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the state dict")
    if not isinstance(source, (str, os.PathLike, dict)):  # what a torch file held
        raise WeightsError(f"{name} holds a {type(source).__name__}, not a state dict (tensor names -> tensors)")
    state = _read_state_dict(source, name)
    layout = _detect_layout(state)
    if layout not in ("native", "dpm_official"):
        raise WeightsError(
            f"{name} holds {layout} ImageNet backbone weights, not a trained re-ID model: "
            "train from it with model.pretrained"
        )
    return {target: tensor for key, tensor in state.items() for target in _MAPPERS[layout](key)}


def _unflattened_kernel(name: str, key: str, tensor: torch.Tensor, kernel: torch.Size) -> torch.Tensor:
    """A JAX-style flat patch kernel as the conv's; a WeightsError when it holds another number of weights."""
    if tensor.numel() != kernel.numel():
        raise WeightsError(f"{name}: checkpoint key {key!r}: shape {tuple(tensor.shape)} is no {tuple(kernel)} kernel")
    return tensor.reshape(kernel)


def load_pretrained(
    model: nn.Module, source: Union[str, os.PathLike, StateDict], *, partial: bool = False
) -> LoadReport:
    """Load ``source`` (a ``.pth`` path or an already loaded state dict) into ``model``.

    Raises :class:`WeightsError` (a ValueError) naming the file: unreadable, not a state dict, a
    key of the wrong shape, a layout that does not fit the model, nothing loaded, or (unless
    ``partial``) part of the backbone left unfilled. Other missing and unexpected keys are
    reported, not raised.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the state dict"
    if not isinstance(model, nn.Module):
        raise WeightsError(f"model must be a torch.nn.Module (a dpm_ops.models model), got {type(model).__name__}")
    if not isinstance(partial, bool):  # "no" would read as true
        raise WeightsError(f"partial must be True or False, got {partial!r}")
    state = _read_state_dict(source, name)
    layout = _detect_layout(state)
    backbone = getattr(model, "backbone", None)
    is_vit = isinstance(backbone, ViTReID)
    fits = {
        "timm_vit": is_vit,
        "dpm_official": is_vit,
        "torchvision_resnet50": isinstance(model, MaskReIDResNet50),
        "native": True,
    }
    if not fits[layout]:
        raise WeightsError(f"{name}: a {layout} checkpoint cannot be loaded into {type(model).__name__}")

    own = model.state_dict()
    to_load: StateDict = {}
    unexpected, dropped = [], []
    for key, tensor in state.items():
        if layout == "timm_vit" and key == "patch_embed.proj.weight" and tensor.dim() == 2:
            tensor = _unflattened_kernel(name, key, tensor, own["backbone.patch_embed.proj.weight"].shape)
        targets = _MAPPERS[layout](key)
        if not targets:
            dropped.append(key)
        for target in targets:
            if target not in own:
                unexpected.append(key)
                continue
            if is_vit and target == "backbone.pos_embed" and tensor.shape != own[target].shape:
                tensor = _pos_embed_for(backbone, tensor, f"{name}: checkpoint key {key!r}", target)
            if tensor.shape != own[target].shape and _of_the_training_set(target):
                dropped.append(key)  # another training set's identities or cameras (as the peers skip them)
                continue
            if tensor.shape != own[target].shape:
                raise WeightsError(
                    f"{name}: checkpoint key {key!r} -> model key {target!r}: shape "
                    f"{tuple(tensor.shape)} does not match the model's {tuple(own[target].shape)}"
                )
            to_load[target] = tensor
    if not to_load:
        raise WeightsError(
            f"{name}: no tensor fits {type(model).__name__} (layout {layout}, "
            f"{len(state)} tensors, e.g. {next(iter(state), 'none')!r}): weights of another model?"
        )
    unfilled = [key for key in backbone_keys(model) if key not in to_load]
    if unfilled and not partial:
        raise WeightsError(
            f"{name}: fills {len(to_load)} tensors but leaves {len(unfilled)} backbone tensors of "
            f"{type(model).__name__} at their init (e.g. {unfilled[0]!r}); ask for a partial load "
            "(partial=True, config model.pretrained_partial: true) if that is intended"
        )
    model.load_state_dict(to_load, strict=False)
    return LoadReport(
        layout, sorted(to_load), sorted(set(own) - set(to_load)), sorted(set(unexpected)), sorted(dropped)
    )
