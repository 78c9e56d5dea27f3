"""Models that deploy: ONNX export of the test-time forward (features of images: dpm_ops.feature_files).

    from dpm_ops.export import export_onnx
    export_onnx(model, "dpm.onnx", check=True)            # checked by onnxruntime at two batch sizes

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
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np
import torch

from dpm_ops._backend import forced_backend
from dpm_ops.engine.checkpoint import TEMPORARY_SUFFIX, _fsync_dir, atomic_write, naming
from dpm_ops.engine.extraction import _check_image_size
from dpm_ops.engine.recipes import RECIPES, get_recipe, recipe_name_of
from dpm_ops.evaluation._inputs import check_count
from dpm_ops.ops._checks import check_flag as _check_flag
from dpm_ops.ops._checks import check_int_list, is_integer, quote

# Opset 18 is the one torch's ONNX function library (torchlib) is written in, so the graph needs no
# pass through onnx's version converter (which a lower opset would; LayerNormalization needs 17
# anyway), and onnxruntime runs it since 1.14. 23 is the newest the torch 2.13 exporter emits.
DEFAULT_OPSET = 18
OPSETS = range(18, 24)
# protobuf cannot serialise a model over 2 GB: larger weights go to an external data file
_PROTOBUF_LIMIT = 2 * 1024**3


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
    kind = recipe_name_of(model)
    if kind is None:
        classes = [recipe.model_class.__name__ for recipe in RECIPES.values()]
        raise ExportError(
            f"model must be a {', '.join(classes[:-1])} or {classes[-1]} (a recipe's model_class, "
            f"dpm_ops.models.build_model), got {type(model).__name__}"
        )
    return kind


def model_input_size(model: torch.nn.Module, kind: str, image_size) -> tuple[int, int]:
    """(height, width) the model of recipe ``kind`` takes: the ViTs' own, MaskReID's ``image_size`` or test crop."""
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


def check_output_path(path, argument: str, suffix: str, inputs=None) -> Path:
    """``path`` as a Path, if it is a file path ending in ``suffix`` (".onnx", ".npz", ".json": a file of
    another kind, a checkpoint or an image, is never replaced) whose folder exists or can be made (it is
    made) and is none of the command's ``inputs`` ({argument: path}: writing it would destroy what the
    command reads); an :class:`ExportError` naming ``argument`` otherwise. Cheap: call it before long work."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ExportError(f"{argument} must be a file path ending in {suffix}, got {path!r}")
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise ExportError(f"{argument} {path} is a directory; give a file name ending in {suffix}")
    if path.suffix.lower() != suffix:
        raise ExportError(f"{argument} {path}: must be a file name ending in {suffix}")
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


# The example batch only traces the graph (its batch axis stays dynamic): beyond this it is just memory.
MAX_EXAMPLE_BATCH = 256


T = TypeVar("T")


def as_export_error(check: Callable[..., T], *args) -> T:
    """``check(*args)`` (a shared check of dpm_ops.ops._checks), its ValueError raised as an ExportError."""
    try:
        return check(*args)
    except ValueError as error:
        raise ExportError(str(error)) from None


def check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    """`value`, or an ExportError naming `name` (the argument as the caller spelt it: batch, --batch)."""
    return as_export_error(check_count, name, value, low, high)


def check_flag(name: str, value) -> bool:
    """`value` as a bool, or an ExportError naming `name`: a string such as "no" would read as true."""
    return as_export_error(_check_flag, None, name, value)


def check_rtol(rtol) -> float:
    """`rtol` (check_onnx's tolerance), or an ExportError: checked before an export, not after it."""
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ExportError(f"rtol must be a positive number, got {quote(rtol)}")
    return rtol


def check_opset(name: str, opset) -> int:
    """`opset`, or an ExportError naming `name` unless it is an integer of OPSETS (18.0 passed ``in range``, then
    failed inside torch's exporter and left it failing every later export of the process)."""
    if not is_integer(opset) or int(opset) not in OPSETS:
        raise ExportError(f"{name} must be an integer in {OPSETS.start}..{OPSETS.stop - 1}, got {quote(opset)}")
    return int(opset)


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
    size = model_input_size(model, kind, image_size)
    check_int("batch", batch, 2, MAX_EXAMPLE_BATCH)
    check_opset("opset", opset)
    check = check_flag("check", check)
    rtol = check_rtol(rtol)  # before the export: a bad tolerance would only be found after it, beside the file
    path = check_output_path(path, "path", ".onnx")
    check_export_modules(check)
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
        with torch.no_grad(), forced_backend("reference"), _quiet_exporter(), _model_errors_as_export_errors():
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
    result = ExportResult(path, kind, input_names, output_names, int(opset), size)
    # Written and checked beside `path`, then moved into place: a failed check leaves the file that was there (it
    # was replaced by the graph that failed), and the weights of a model past 2 GB, in <name>.data beside it, move
    # with the file that names them.
    with _staging(path) as folder, naming(path, folder / path.name):  # a write error named the hidden staged file
        staged = folder / path.name
        if weight_bytes > _PROTOBUF_LIMIT:
            program.save(str(staged), external_data=True)
        else:
            atomic_write(staged, lambda handle: handle.write(program.model_proto.SerializeToString()))
        if check:
            # the export's batch and another (the batch axis is dynamic), both within MAX_EXAMPLE_BATCH
            result.checked_batches = (batch, batch + 1) if batch < MAX_EXAMPLE_BATCH else (batch - 1, batch)
            result.max_relative_error = check_onnx(
                model, staged, batch_sizes=result.checked_batches, rtol=rtol, image_size=size
            )
        for name in sorted(os.listdir(folder), key=lambda name: name == path.name):  # the file naming the rest last
            os.replace(folder / name, path.parent / name)
    _fsync_dir(path.parent)
    return result


@contextlib.contextmanager
def _staging(path: Path):
    """A temporary folder beside ``path`` (on its file system: the moves out of it are renames), removed on exit."""
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _model_errors_as_export_errors():
    """The model's own ValueError for its input (a MaskReID image below its 2 x 2 pixels), which torch.export
    wraps in an error of its own (a 176-line traceback from the CLI), as an ExportError."""
    try:
        yield
    except Exception as error:
        cause = error
        while cause is not None and not isinstance(cause, ValueError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or isinstance(error, ValueError):
            raise
        raise ExportError(f"the model refused the example inputs: {cause}") from error


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


def check_export_modules(check: bool, check_name: str = "check=True") -> None:
    """ImportError unless the optional modules are there: onnxscript (torch's exporter imports it), onnxruntime
    for the check (`check_name`: what turns it on); found before the long part."""
    _require("onnxscript", "the ONNX export")
    if check:
        _require("onnxruntime", check_name)


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
    """Run the ONNX file in onnxruntime (CPU) on random inputs at each of ``batch_sizes`` (1 to
    MAX_EXAMPLE_BATCH) and compare every output with ``model``'s eval forward (its default, fused
    backend). Returns, per output, the largest ``max|onnx - torch| / max|torch|``; raises
    :class:`OnnxCheckError` above ``rtol``, an :class:`ExportError` naming ``path`` for a file that is
    missing, not an ONNX model, or whose inputs or outputs are not those the model's export has."""
    rtol = check_rtol(rtol)
    batch_sizes = as_export_error(check_int_list, None, "batch_sizes", batch_sizes, 1, MAX_EXAMPLE_BATCH)
    seed = check_int("seed", seed, 0, 2**63 - 1)  # seed + batch stays within torch's seeds (< 2^64)
    ort = _require("onnxruntime", "check_onnx")
    kind = model_kind(model)
    size = model_input_size(model, kind, image_size)
    session = _open_session(ort, path)
    input_names = _check_session(session, path, model, kind, size, batch_sizes)
    output_names = [node.name for node in session.get_outputs()]
    errors = dict.fromkeys(output_names, 0.0)
    was_training = model.training
    model.eval()
    try:
        for batch in batch_sizes:
            inputs = tuple(_example_inputs(model, kind, size, batch, seed + batch).values())
            with torch.no_grad():
                expected = [t.float().cpu().numpy() for t in _as_tuple(model(*inputs))]
            _check_output_shapes(session, path, expected)
            try:
                got = session.run(None, {name: t.cpu().numpy() for name, t in zip(input_names, inputs)})
            except Exception as error:  # onnxruntime's (no common base): e.g. camera ids past the file's embedding
                raise ExportError(f"path {path}: onnxruntime cannot run it on the model's inputs ({error})") from None
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


_ONNX_TYPES = {torch.float32: "tensor(float)", torch.int64: "tensor(int64)"}


def _open_session(ort, path):
    """An onnxruntime CPU session of the file ``path``, or an ExportError naming it."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ExportError(f"path must be the path of an ONNX file (export_onnx), got {quote(path)}")
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ExportError(f"path {path}: {'is a folder' if path.is_dir() else 'not found'}; give an ONNX file")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base but Exception
        raise ExportError(f"path {path}: not an ONNX model onnxruntime can load ({error})") from None


def _check_session(session, path, model, kind: str, size, batch_sizes) -> list[str]:
    """The file's input names, if its inputs (names, types, image size) and output names are those
    export_onnx gives ``model``: another model's file is the caller's mistake (an ExportError), not
    the export's (OnnxCheckError), and onnxruntime's own error would name neither."""
    example = get_recipe(kind).export_inputs(model, size, 1, torch.Generator().manual_seed(0))
    wanted = {name: ["batch", *tensor.shape[1:]] for name, tensor in example.items()}
    inputs = session.get_inputs()
    names = [node.name for node in inputs]
    outputs = [node.name for node in session.get_outputs()]
    expected_outputs = list(get_recipe(kind).export_outputs)
    mismatch = f"path {path}: not an export of this model ({kind}"
    if names != list(wanted):
        raise ExportError(f"{mismatch}): the file takes inputs {names}, the model {list(wanted)}")
    if outputs != expected_outputs:
        raise ExportError(f"{mismatch}): the file gives outputs {outputs}, the model {expected_outputs}")
    for node, tensor in zip(inputs, example.values()):
        dims = list(node.shape)
        if (
            len(dims) != tensor.dim()
            or (isinstance(dims[0], int) and set(batch_sizes) != {dims[0]})  # a batch axis fixed at another size
            or any(isinstance(d, int) and d != w for d, w in zip(dims[1:], tensor.shape[1:]))
            or node.type != _ONNX_TYPES.get(tensor.dtype, node.type)
        ):
            raise ExportError(
                f"{mismatch} at image size {tuple(size)}): input {node.name!r} is {node.type} {dims}, "
                f"the model's {_ONNX_TYPES.get(tensor.dtype, tensor.dtype)} {wanted[node.name]}"
            )
    return names


def _check_output_shapes(session, path, expected) -> None:
    """Each output's fixed sizes (its width) are those of the model's: else another model's file."""
    for node, want in zip(session.get_outputs(), expected):
        dims = list(node.shape)
        if len(dims) != want.ndim or any(isinstance(d, int) and d != w for d, w in zip(dims[1:], want.shape[1:])):
            raise ExportError(
                f"path {path}: not an export of this model: output {node.name!r} is {dims}, "
                f"the model's {['batch', *want.shape[1:]]}"
            )


# The extraction API lived here until it moved to dpm_ops.feature_files: the old names still work for one release.
_MOVED = ("find_images", "extract_folder", "extract_images", "image_cameras", "save_features_npz", "IMAGE_EXTENSIONS")


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"dpm_ops.export.{name} moved to dpm_ops.feature_files.{name}", DeprecationWarning, stacklevel=2)
    from . import feature_files

    return getattr(feature_files, name)
