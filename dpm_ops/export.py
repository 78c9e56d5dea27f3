"""Models that deploy: ONNX export of the test-time forward, and features of a folder or a list of images.

    from dpm_ops.export import export_onnx, extract_folder, extract_images, save_features_npz
    export_onnx(model, "dpm.onnx", check=True)            # checked by onnxruntime at two batch sizes
    features = extract_folder(model, "photos/")           # the model's test transforms, batched
    crops = extract_images(model, [crop0, crop1], camids=0)  # arrays, PIL images or paths
    save_features_npz("photos.npz", features, model)

The exported graph is the model's eval forward (``B`` is a dynamic axis), with the inputs and outputs
its recipe names (``Recipe.export_inputs`` / ``export_outputs``, :mod:`dpm_ops.engine.recipes`):

=========================  =====================================================  ==========================
model                      inputs                                                 outputs
=========================  =====================================================  ==========================
``dpm``                    ``images`` (B, 3, H, W) float32, ``camids`` (B,) int64  ``feature`` (B, C) pre-L2,
                           (only with a camera embedding, 0-based)                ``mask`` (B, C) in (0, 1)
``vit_baseline``           as DPM                                                 ``feature`` (B, C) pre-L2
``maskreid`` /             ``raw``, ``masked`` (B, 3, H, W) float32 (``masked`` =  ``feature`` (B, D), unit
``maskreid_resnet50``      raw * {0, 1} foreground mask, after normalisation)     length
=========================  =====================================================  ==========================

Images are normalised as the test transforms do (``dpm_ops.data.build_transforms(recipe,
train=False)``). The fused ``dpm_ops`` custom ops (hierarchical mask pooling in DPM's mask generator
and MaskReID's fusing layer) have no ONNX translation; the export runs the forward with the
plain-torch reference backend (:func:`dpm_ops._backend.forced_backend`), the same maths, so the
graph holds standard ONNX operators only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import numbers
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from dpm_ops._backend import forced_backend
from dpm_ops.data import DecodedImages, ImageDataset, ImageRecord, build_dataloader, mask_path_for
from dpm_ops.data.image_io import as_mask, as_rgb
from dpm_ops.data.assembly import _verify_readable
from dpm_ops.data.parsing import MARKET_NAME
from dpm_ops.data.errors import DatasetError, DatasetNotFoundError
from dpm_ops.engine.checkpoint import atomic_write
from dpm_ops.engine.extraction import FeatureSet, _check_image_size, eval_transform, extract_features
from dpm_ops.engine.scoring import resolve_distance
from dpm_ops.engine.recipes import RECIPES, get_recipe, model_cameras
from dpm_ops.evaluation._inputs import check_count

# Opset 18 is the one torch's ONNX function library (torchlib) is written in, so the graph needs no
# pass through onnx's version converter (which a lower opset would; LayerNormalization needs 17
# anyway), and onnxruntime runs it since 1.14. 23 is the newest the torch 2.13 exporter emits.
DEFAULT_OPSET = 18
OPSETS = range(18, 24)
# protobuf cannot serialise a model over 2 GB: larger weights go to an external data file
_PROTOBUF_LIMIT = 2 * 1024**3
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ExportError(ValueError):
    """Bad input to an export or extraction: names the argument and what was expected."""


class OnnxCheckError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


@dataclasses.dataclass
class ExportResult:
    path: Path
    model_name: str
    input_names: list[str]
    output_names: list[str]
    opset: int
    image_size: tuple[int, int]
    # per output, the largest max|onnx - torch| / max|torch| over the checked batches (None: not checked)
    max_relative_error: Optional[dict[str, float]] = None
    checked_batches: tuple[int, ...] = ()


def model_kind(model: torch.nn.Module) -> str:
    """The recipe name of ``model`` (:data:`dpm_ops.engine.RECIPES`): the recipe whose ``model_class``
    is nearest in ``model``'s class hierarchy."""
    mro = type(model).__mro__
    matches = [name for name, recipe in RECIPES.items() if recipe.model_class in mro]
    if not matches:
        classes = [recipe.model_class.__name__ for recipe in RECIPES.values()]
        raise ExportError(
            f"model must be a {', '.join(classes[:-1])} or {classes[-1]} (a recipe's model_class, "
            f"dpm_ops.models.build_model), got {type(model).__name__}"
        )
    return min(matches, key=lambda name: mro.index(RECIPES[name].model_class))


def _input_size(model: torch.nn.Module, kind: str, image_size) -> tuple[int, int]:
    try:
        return get_recipe(kind).export_input_size(model, _check_image_size(image_size))
    except ValueError as error:
        raise ExportError(str(error)) from error


def _example_inputs(model, kind: str, image_size, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """The recipe's named example inputs, on the model's device."""
    device = next(model.parameters()).device
    inputs = get_recipe(kind).export_inputs(model, image_size, batch, torch.Generator().manual_seed(seed))
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def check_output_path(path, argument: str = "path", suffix_hint: str = "a file name", inputs=None) -> Path:
    """``path`` as a Path, if it is a file path whose folder exists or can be made (it is made) and is
    none of the command's ``inputs`` ({argument: path}: writing it would destroy what the command reads);
    an :class:`ExportError` naming ``argument`` otherwise. Cheap: call it before long work."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ExportError(f"{argument} must be a file path ({suffix_hint}), got {path!r}")
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise ExportError(f"{argument} {path} is a directory; give {suffix_hint}")
    for name, source in (inputs or {}).items():
        source = Path(os.path.expanduser(str(source)))
        if path.is_file() and source.is_file() and os.path.samefile(path, source):
            raise ExportError(f"{argument} {path} is the {name} file this command reads; write to another file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"{argument} {path}: cannot create its folder ({error.strerror or error})") from error
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"{argument} {path}: its folder is not writable")
    return path


def check_int(name: str, value, low: int) -> int:
    """`value`, or an ExportError naming `name` (the argument as the caller spelt it: batch, --batch)."""
    try:
        return check_count(name, value, low)
    except ValueError as error:
        raise ExportError(str(error)) from None


def check_opset(name: str, opset) -> int:
    """`opset`, or an ExportError naming `name` unless it is one of OPSETS."""
    if opset not in OPSETS:
        raise ExportError(f"{name} must be in {OPSETS.start}..{OPSETS.stop - 1}, got {opset!r}")
    return opset


def export_onnx(
    model: torch.nn.Module,
    path,
    *,
    image_size: Optional[Sequence[int]] = None,
    batch: int = 2,
    opset: int = DEFAULT_OPSET,
    check: bool = False,
    rtol: float = 1e-4,
) -> ExportResult:
    """Export ``model``'s eval forward to the ONNX file ``path`` (weights inside it up to 2 GB) with a
    dynamic batch axis; the inputs and outputs are in the module docstring.

    ``image_size`` (height, width): MaskReID's input (default its 144x56 test crop); the ViT models'
    is their own. ``batch`` (>= 2: torch.export specialises a size-1 axis) is the example batch the
    graph is traced with. ``check=True`` runs the file in onnxruntime (CPU) at ``batch`` and
    ``batch + 1`` and compares with PyTorch's eval outputs (:func:`check_onnx`). The model's
    train / eval mode is restored after.
    """
    kind = model_kind(model)
    size = _input_size(model, kind, image_size)
    check_int("batch", batch, 2)
    check_opset("opset", opset)
    path = check_output_path(path, "path", "a file name, e.g. model.onnx")
    _require("onnxscript", "the ONNX export")  # torch's exporter imports it; fail before the long part
    if check:
        _require("onnxruntime", "check=True")
    named_example = _example_inputs(model, kind, size, batch, seed=0)
    input_names, output_names = list(named_example), list(get_recipe(kind).export_outputs)
    example = tuple(named_example.values())
    batch_axis = torch.export.Dim("batch", min=1)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    was_training = model.training
    model.eval()
    try:
        # The dynamo exporter (torch.export, non-strict; torch 2.13's default) rather than the deprecated
        # TorchScript one: it translates scaled_dot_product_attention and LayerNorm directly, and
        # torch.export proves the graph valid for every batch size (a shape guard on the batch is an
        # error at export time, not a graph silently specialised to the example batch).
        with torch.no_grad(), forced_backend("reference"), _quiet_exporter():
            program = torch.onnx.export(
                model,
                example,
                None,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=tuple({0: batch_axis} for _ in example),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    finally:
        model.train(was_training)
    if weight_bytes > _PROTOBUF_LIMIT:
        program.save(str(path), external_data=True)
    else:  # one self-contained file, written atomically
        atomic_write(path, lambda handle: handle.write(program.model_proto.SerializeToString()))
    result = ExportResult(path, kind, input_names, output_names, opset, size)
    if check:
        result.checked_batches = (batch, batch + 1)
        result.max_relative_error = check_onnx(
            model, path, batch_sizes=result.checked_batches, rtol=rtol, image_size=size
        )
    return result


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that concern torch, not the user: torchvision ops it cannot
    register (torchvision is not needed), a pytree deprecation inside torch.export, and that the two
    inputs share one batch axis (they do, by design)."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used", category=UserWarning)
            yield
    finally:
        registry_log.setLevel(level)


def _require(module: str, needed_for: str):
    """Import an optional dependency, or an ImportError that says what needs it and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{needed_for} needs {module} (pip install {module})") from error


def check_onnx(
    model: torch.nn.Module,
    path,
    *,
    batch_sizes: Sequence[int] = (2, 3),
    rtol: float = 1e-4,
    image_size: Optional[Sequence[int]] = None,
    seed: int = 1,
) -> dict[str, float]:
    """Run the ONNX file in onnxruntime (CPU) on random inputs at each of ``batch_sizes`` and compare
    every output with ``model``'s eval forward (its default, fused backend). Returns, per output, the
    largest ``max|onnx - torch| / max|torch|``; raises :class:`OnnxCheckError` above ``rtol``."""
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ExportError(f"rtol must be a positive number, got {rtol!r}")
    ort = _require("onnxruntime", "check_onnx")
    kind = model_kind(model)
    size = _input_size(model, kind, image_size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_names = [node.name for node in session.get_inputs()]
    output_names = [node.name for node in session.get_outputs()]
    errors = dict.fromkeys(output_names, 0.0)
    was_training = model.training
    model.eval()
    try:
        for batch in batch_sizes:
            inputs = tuple(
                _example_inputs(model, kind, size, check_int("batch_sizes", batch, 1), seed + batch).values()
            )
            if len(inputs) != len(input_names):
                raise OnnxCheckError(f"{path} takes inputs {input_names}, the model {len(inputs)}")
            with torch.no_grad():
                expected = [t.float().cpu().numpy() for t in _as_tuple(model(*inputs))]
            got = session.run(None, {name: t.cpu().numpy() for name, t in zip(input_names, inputs)})
            for name, want, have in zip(output_names, expected, got):
                if have.shape != want.shape:
                    raise OnnxCheckError(
                        f"output {name!r}: onnxruntime gives shape {have.shape}, PyTorch {want.shape} (batch {batch})"
                    )
                scale = max(float(np.abs(want).max()), np.finfo(np.float32).tiny)
                errors[name] = max(errors[name], float(np.abs(have - want).max()) / scale)
    finally:
        model.train(was_training)
    bad = {name: error for name, error in errors.items() if not error <= rtol}
    if bad:
        raise OnnxCheckError(
            f"onnxruntime's outputs differ from PyTorch's by more than rtol={rtol}: "
            + ", ".join(f"{name} {error:.2e}" for name, error in bad.items())
        )
    return errors


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
    progress: bool = True,
) -> FeatureSet:
    """Features of every image under ``folder`` (:func:`find_images`), with the model's test
    transforms and the evaluator's extraction (:func:`dpm_ops.engine.extraction.extract_features`):
    L2-normalised features, DPM's channel masks, in the order of the relative paths.

    ``pids`` / ``camids`` come from Market-style names (``0001_c2s1_...``: pid 1, camera 1), -1 where a
    name is not one. A model with a camera embedding needs every image's camera: from the names, or
    ``camid`` (0-based) for all of them. MaskReID reads each image's foreground mask from the
    ``<folder>_seg`` mirror tree (``.png``, the dataset layout of ``dpm_ops.data.masks``).
    ``image_size`` as in :func:`export_onnx`. ``device``: the model's by default.
    """
    kind = model_kind(model)
    size = _input_size(model, kind, image_size)
    check_int("batch_size", batch_size, 1)
    check_int("num_workers", num_workers, 0)
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
    features = _extract(model, kind, dataset, batch_size, num_workers, device, amp_dtype, progress, normalize=True)
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
    progress: bool = False,
) -> FeatureSet:
    """Features of images given one by one, e.g. a tracker's person crops, as :func:`extract_folder`
    computes a folder's. ``images``: a list of image paths, PIL images or (H, W, 3) RGB / (H, W) grey
    uint8 arrays (:func:`dpm_ops.data.image_io.as_rgb`), or one of them. ``camids``: each image's
    0-based camera, or one int for all (a model with a camera embedding needs them). ``masks``:
    MaskReID's foreground mask of each image (paths, PIL images or (H, W) bool / uint8 arrays of the
    image's size). ``normalize=False``: the eval forward's features as they are (not L2-normalised).
    The result's ``paths`` are the given paths, or ``images[i]``; its ``pids`` are -1.
    """
    kind = model_kind(model)
    size = _input_size(model, kind, image_size)
    check_int("batch_size", batch_size, 1)
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
    decoded = [as_rgb(image, name) for image, name in zip(images, names)]
    decoded_masks = None
    if masks is not None:
        decoded_masks = [as_mask(m, f"masks[{i}]", image.size) for i, (m, image) in enumerate(zip(masks, decoded))]
    records = [ImageRecord(name, -1, camera) for name, camera in zip(names, cameras)]
    dataset = DecodedImages(records, decoded, eval_transform(kind, size), masks=decoded_masks)
    return _extract(model, kind, dataset, batch_size, 0, device, amp_dtype, progress, normalize)


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


def _extract(model, kind: str, dataset, batch_size, num_workers, device, amp_dtype, progress, normalize) -> FeatureSet:
    """:func:`~dpm_ops.engine.extraction.extract_features` over ``dataset`` on ``device`` (default: the model's)."""
    try:
        device = torch.device(device) if device is not None else next(model.parameters()).device
    except (RuntimeError, TypeError):
        raise ExportError(
            f"device must be a torch.device or a name such as cpu, cuda, cuda:N, got {device!r}"
        ) from None
    loader = build_dataloader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    return extract_features(
        model,
        loader,
        model_name=kind,
        device=device,
        amp_dtype=amp_dtype,
        progress=progress,
        normalize=normalize,
        desc="extract",
    )


def save_features_npz(path, features: FeatureSet, model: torch.nn.Module) -> Path:
    """Write ``features`` (from :func:`extract_folder`) to an ``.npz`` (atomically): ``paths`` (N,) str,
    ``features`` (N, D) float32, ``masks`` (N, D) float32 (DPM only), ``pids`` / ``camids`` (N,) int64,
    ``model`` and ``distance`` (the model's test metric: "masked_arccos" for DPM, else "euclidean")."""
    kind = model_kind(model)
    path = check_output_path(path, "path", "a file name, e.g. features.npz")
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
