"""ONNX export (onnxruntime against PyTorch at two batch sizes, no dpm_ops op in the graph) and
features of a folder of images (the .npz feeds evaluate_rank), through the Python API, the README's
snippets and the dpm-reid command."""

import ast
import contextlib
import inspect
import io
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from benchmarks.reference import peers
from conftest import readme_python_blocks
from dpm_ops import _backend
from dpm_ops.cli import main
from dpm_ops.data import DatasetError, DatasetNotFoundError
from dpm_ops.engine import RECIPES, load_config
from dpm_ops.engine.checkpoint import make_checkpoint, save_checkpoint
from dpm_ops.engine.evaluator import evaluate_model
from dpm_ops.engine.extraction import eval_transform
from dpm_ops.engine.builders import build_model_from_args, model_arguments
from dpm_ops.engine.splits import load_splits
from dpm_ops.compat.torchreid import FeatureExtractor
from dpm_ops.data.image_io import read_image, read_mask
from dpm_ops.data.masks import mask_path_for
from dpm_ops.export import ExportError, OnnxCheckError, check_onnx, export_onnx, model_kind
from dpm_ops.feature_files import extract_folder, extract_images, find_images, save_features_npz
from dpm_ops.models import MODEL_NAMES, build_model
from dpm_ops.ops import masked_arccos_distance
from engine_utils import TINY_VIT, synth_argv, tiny_config, write_config
from test_cli import assert_one_line_error

VIT_SIZE = (64, 32)
MASKREID_SIZE = (36, 16)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """A fresh model's DPM mask is constant (zero attfc) and its BN statistics are the identity:
    random ones make every output depend on every part of the graph."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
        attfc = getattr(getattr(model, "mask_generator", None), "attfc", None)
        if attfc is not None:
            attfc.weight.copy_(0.5 * torch.randn(attfc.weight.shape, generator=generator))
    return model.eval()


def tiny_model(name: str):
    """(model, input size): the named architecture at test size, 3 cameras for the ViT models; its weights
    drawn from seed 0 (from the worker's global generator they depended on the tests run before)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _tiny_model(name)


def _tiny_model(name: str):
    if name == "maskreid":
        return randomise(build_model(name, 0, stem_channels=4, base_width=4, embed_dim=16)), MASKREID_SIZE
    if name == "maskreid_resnet50":
        return randomise(build_model(name, 0, layers=(1, 1, 1, 1), width=8, embed_dim=16)), VIT_SIZE
    options = dict(TINY_VIT, img_size=VIT_SIZE, **({"mask_tap_blocks": (0, 1)} if name == "dpm" else {}))
    return randomise(build_model(name, 5, 3, **options)), VIT_SIZE


def inputs_for(name: str, size, batch: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=generator)
    if name.startswith("maskreid"):
        return {"raw": images, "masked": images * (torch.rand(batch, 1, *size, generator=generator) > 0.5)}
    return {"images": images, "camids": torch.randint(0, 3, (batch,), generator=generator)}


def assert_standard_onnx(path: Path, opset: int = 18) -> None:
    """Only standard ONNX operators (no dpm_ops custom op, no leftover function) and the weights
    inside the file."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert not [node.op_type for node in model.graph.node if "dpm" in node.op_type.lower()]
    assert not model.functions
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in model.graph.initializer)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    assert os.listdir(path.parent) == [path.name]  # no external data file


def assert_onnxruntime_matches(path: Path, model: nn.Module, name: str, size) -> None:
    """Independently of check_onnx: the names, and other batch sizes than the check's, against
    PyTorch's eval forward on its default (fused) backend."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected_inputs = ["raw", "masked"] if name.startswith("maskreid") else ["images", "camids"]
    assert [node.name for node in session.get_inputs()] == expected_inputs
    expected_outputs = ["feature", "mask"] if name == "dpm" else ["feature"]
    assert [node.name for node in session.get_outputs()] == expected_outputs
    for batch in (1, 5):
        inputs = inputs_for(name, size, batch, seed=batch)
        with torch.no_grad():
            want = model(*inputs.values())
        want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
        got = session.run(None, {key: value.numpy() for key, value in inputs.items()})
        for have, reference in zip(got, want):
            assert have.shape == reference.shape and have.shape[0] == batch
            assert np.abs(have - reference).max() <= 1e-4 * np.abs(reference).max()
    if name == "dpm":
        assert np.ptp(got[1]) > 0.1  # a mask that varies: a wrong mask would show


# DPM is exported through the command (dpm_export below); the others through the API, one at the
# newest opset the exporter emits.
API_EXPORTS = [("vit_baseline", 18), ("maskreid", 18), ("maskreid_resnet50", 23)]


def test_every_model_name_has_an_export_test():
    assert sorted(["dpm", *(name for name, _ in API_EXPORTS)]) == sorted(MODEL_NAMES)


@pytest.mark.parametrize("name, opset", API_EXPORTS)
def test_export_matches_onnxruntime_at_two_batch_sizes(tmp_path, name, opset):
    model, size = tiny_model(name)
    model.train()  # the eval forward is exported and checked, and the model's mode given back
    path = tmp_path / "model.onnx"
    result = export_onnx(model, path, image_size=size, opset=opset, check=True)
    assert model.training
    model.eval()
    assert result.checked_batches == (2, 3) and max(result.max_relative_error.values()) <= 1e-4
    assert_standard_onnx(path, opset)
    assert_onnxruntime_matches(path, model, name, size)
    other, _ = tiny_model(name)  # the same architecture with other weights: the check must see it
    nn.init.normal_(next(other.parameters()))
    with pytest.raises(OnnxCheckError, match="differ from PyTorch's"):
        check_onnx(other, path, image_size=size)
    with pytest.raises(ExportError, match="rtol must be a positive number"):
        check_onnx(model, path, image_size=size, rtol=0)


@pytest.mark.skipif(not _backend.backends()["cpp"][0], reason="needs the compiled C++ backend")
def test_forced_backend_overrides_the_environment_and_is_restored(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")
    with _backend.forced_backend("reference"):
        assert _backend.resolve(None, cpu) == "reference"
        assert _backend.resolve("cpp", cpu) == "cpp"  # an explicit backend= still wins
    assert _backend.resolve(None, cpu) == "cpp"
    with pytest.raises(KeyError), _backend.forced_backend("reference"):
        raise KeyError("restored after an error too")
    assert _backend.resolve(None, cpu) == "cpp"
    with pytest.raises(ValueError, match="backend must be one of"), _backend.forced_backend("onnx"):
        pass
    report = _backend.backends()
    report["cpp"] = (False, "edited by a caller")
    assert _backend.backends()["cpp"][0]  # a copy: a caller's edit does not change what runs


def test_export_bad_input(tmp_path, monkeypatch):
    model, _ = tiny_model("vit_baseline")
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="model must be a DPM"):
        export_onnx(nn.Linear(2, 2), path)
    with pytest.raises(ExportError, match=r"batch must be an integer in \[2, 256\]"):
        export_onnx(model, path, batch=1)
    with pytest.raises(ExportError, match="opset must be an integer in 18..23"):
        export_onnx(model, path, opset=11)
    with pytest.raises(ExportError, match="differs from the model's input size"):
        export_onnx(model, path, image_size=(128, 64))
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(model, tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="cannot create its folder"):
        export_onnx(model, tmp_path / "file" / "m.onnx")
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda folder, mode: mode != os.W_OK)  # root may write anywhere
        with pytest.raises(ExportError, match="its folder is not writable"):
            export_onnx(model, path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="needs onnxruntime"):
        export_onnx(model, path, check=True)
    assert not path.exists()  # every check ran before the export


def test_model_kind_is_the_nearest_recipe_in_the_class_hierarchy(monkeypatch):
    # A new recipe whose model class extends DPM's owns its models; a plain DPM stays "dpm".
    model, _ = tiny_model("dpm")

    class DPMVariant(type(model)):
        pass

    monkeypatch.setitem(RECIPES, "dpm_variant", SimpleNamespace(model_class=DPMVariant))
    assert model_kind(model) == "dpm"
    model.__class__ = DPMVariant
    assert model_kind(model) == "dpm_variant"


def test_check_onnx_reports_the_largest_relative_error_over_its_batches(tmp_path, monkeypatch):
    # onnxruntime's session replaced by one returning PyTorch's outputs times (1 + error[batch]):
    # check_onnx reports the worst batch's error relative to the output's scale, and refuses a
    # file whose inputs or output shapes are not the model's.
    model, size = tiny_model("vit_baseline")
    error = {2: 1e-5, 3: 2e-6}
    session = {"inputs": ["images", "camids"], "trim": 0}

    class PerturbedSession:
        def __init__(self, path, providers):
            pass

        def get_inputs(self):
            shapes = {"images": ["batch", 3, *size], "camids": ["batch"]}
            types = {"images": "tensor(float)", "camids": "tensor(int64)"}
            return [SimpleNamespace(name=name, shape=shapes[name], type=types[name]) for name in session["inputs"]]

        def get_outputs(self):
            return [SimpleNamespace(name="feature", shape=["batch", 32])]

        def run(self, output_names, feeds):
            with torch.no_grad():
                feature = model(*(torch.from_numpy(value) for value in feeds.values())).numpy()
            return [feature[:, : feature.shape[1] - session["trim"]] * (1 + error[len(feature)])]

    monkeypatch.setattr(ort, "InferenceSession", PerturbedSession)
    with torch.no_grad():
        scale = model(*inputs_for("vit_baseline", size, 2, seed=0).values()).abs().max().item()
    assert not 0.5 < scale < 2  # so an absolute error would not pass for the relative one
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")  # check_onnx refuses a missing file before onnxruntime opens it
    errors = check_onnx(model, onnx_file, batch_sizes=(2, 3), image_size=size)
    assert errors.keys() == {"feature"} and errors["feature"] == pytest.approx(1e-5, rel=2e-2)
    with pytest.raises(OnnxCheckError, match=r"rtol=5e-06: feature \S+$") as raised:
        check_onnx(model, onnx_file, batch_sizes=(2, 3), rtol=5e-6, image_size=size)
    # the worst batch's error (the float32 outputs' rounding moves its third digit)
    assert float(str(raised.value).rsplit(" ", 1)[1]) == pytest.approx(1e-5, rel=2e-2)
    with pytest.raises(ExportError, match="rtol must be a positive number"):
        check_onnx(model, onnx_file, rtol=True, image_size=size)
    session["trim"] = 1
    with pytest.raises(OnnxCheckError, match=r"output 'feature': onnxruntime gives shape \(2, 31\)"):
        check_onnx(model, onnx_file, image_size=size)
    session["inputs"] = ["images"]
    with pytest.raises(ExportError, match=r"the file takes inputs \['images'\], the model \['images', 'camids'\]"):
        check_onnx(model, onnx_file, image_size=size)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """The tiny synthetic set without its junk (pid -1) images, which the dataset loader drops."""
    root = tmp_path_factory.mktemp("export") / "set"
    assert main(synth_argv(root)) == 0
    for junk in root.glob("*/-1_*"):
        junk.unlink()
    return root


def checkpointed(tmp_path, root, name: str):
    """(config file, checkpoint of a freshly built model, model): built as `dpm-reid train` builds it."""
    config_path = write_config(tmp_path / f"{name}.yaml", tiny_config(root, name))
    config = load_config(str(config_path), [])
    args = model_arguments(config, load_splits(config))
    model = randomise(build_model_from_args(name, args))
    weights = tmp_path / f"{name}.pt"
    save_checkpoint(weights, make_checkpoint(name, args, config, model.state_dict()))
    return config_path, weights, model


@pytest.mark.parametrize("name", ["dpm", "vit_baseline", "maskreid"])
def test_extracted_npz_evaluates_as_the_evaluator_does(tmp_path, tiny_set, monkeypatch, name):
    # MaskReID: extract reads the masks from the <folder>_seg mirror, the evaluator from the dataset's
    _, _, model = checkpointed(tmp_path, tiny_set, name)
    size = MASKREID_SIZE if name == "maskreid" else VIT_SIZE
    for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        features = extract_folder(model, tiny_set / folder, image_size=size, progress=False)
        save_features_npz(tmp_path / f"{split}.npz", features, model)
    query = np.load(tmp_path / "query.npz")
    assert list(query["paths"]) == sorted(p.name for p in (tiny_set / "query").iterdir())
    assert ("masks" in query.files) == (name == "dpm")
    assert query["pids"][0] == int(query["paths"][0].split("_")[0])
    namespace = {}
    monkeypatch.chdir(tmp_path)
    exec(readme_python_blocks("Deploy (ONNX)")[1], namespace)  # the README's evaluate_rank snippet, as written
    splits = load_splits(load_config(str(tmp_path / f"{name}.yaml"), []))
    expected = evaluate_model(model, splits, model_name=name, image_size=size, progress=False, pictures=False)
    result = namespace["result"]
    assert 100 * result.mAP == pytest.approx(expected["all"]["mAP"], abs=1e-4)
    assert [100 * float(v) for v in result.cmc[:10]] == pytest.approx(expected["all"]["cmc"][:10], abs=1e-4)


def test_extract_maskreid_reads_the_seg_tree_and_names_bad_files(tmp_path, tiny_set):
    model, _ = tiny_model("maskreid")
    features = extract_folder(model, tiny_set / "query", image_size=MASKREID_SIZE, progress=False)
    assert features.features.shape == (len(list((tiny_set / "query").iterdir())), 16)
    assert torch.allclose(features.features.norm(dim=1), torch.ones(len(features)))

    copy = tmp_path / "query"
    shutil.copytree(tiny_set / "query", copy)
    shutil.copytree(tiny_set / "query_seg", tmp_path / "query_seg")
    victim = sorted((tmp_path / "query_seg").iterdir())[0]
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match=victim.name):
        extract_folder(model, copy, image_size=MASKREID_SIZE, progress=False)

    dpm, _ = tiny_model("dpm")
    bad = sorted(copy.iterdir())[3]
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=f"unreadable image: .*{bad.name}"):
        extract_folder(dpm, copy, progress=False)
    (tmp_path / "anonymous").mkdir()
    shutil.copy(sorted(copy.iterdir())[0], tmp_path / "anonymous" / "person.jpg")
    with pytest.raises(ExportError, match="person.jpg names no camera"):
        extract_folder(dpm, tmp_path / "anonymous", progress=False)
    assert extract_folder(dpm, tmp_path / "anonymous", camid=2, progress=False).camids.tolist() == [2]
    with pytest.raises(ExportError, match="out of range"):
        extract_folder(dpm, tmp_path / "anonymous", camid=3, progress=False)


def test_extract_folder_cameras_come_from_names_or_camid(tmp_path, tiny_set):
    dpm, _ = tiny_model("dpm")
    source = sorted((tiny_set / "query").iterdir())[0]
    folder = tmp_path / "named"
    folder.mkdir()
    shutil.copy(source, folder / "0007_c2s1_000001_00.jpg")
    found = extract_folder(dpm, folder, progress=False)
    assert found.pids.tolist() == [7] and found.camids.tolist() == [1]  # c2: camera 1, 0-based
    assert extract_folder(dpm, folder, camid=0, progress=False).camids.tolist() == [0]  # camid wins over names
    with pytest.raises(ExportError, match="camid must be an integer >= 0"):
        extract_folder(dpm, folder, camid=-1, progress=False)
    with pytest.raises(ExportError, match="num_workers must be an integer in \\[0, 1024\\]"):
        extract_folder(dpm, folder, num_workers=-1, progress=False)
    shutil.copy(source, folder / "0008_c0s1_000001_00.jpg")  # Market cameras count from 1: c0 is none
    with pytest.raises(
        ExportError, match=r"0008_c0s1_000001_00.jpg names camera c0 \(Market-style cameras count from c1\)"
    ):
        extract_folder(dpm, folder, progress=False)


def test_extract_folder_names_a_bad_file_before_running_the_model(tmp_path, tiny_set):
    # An unreadable image or mask is named up front, not after the model has run on the others.
    model, _ = tiny_model("maskreid")
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    for folder in ("query", "query_seg"):
        shutil.copytree(tiny_set / folder, tmp_path / folder)
    options = dict(image_size=MASKREID_SIZE, batch_size=1, progress=False)
    for folder, kind in (("query_seg", "mask"), ("query", "image")):
        victim = sorted((tmp_path / folder).iterdir())[-1]
        victim.write_bytes(b"garbage")
        with pytest.raises(DatasetError, match=f"unreadable {kind}: .*{victim.name}"):
            extract_folder(model, tmp_path / "query", **options)
        assert not forwards
        shutil.copy(tiny_set / folder / victim.name, victim)
    extract_folder(model, tmp_path / "query", **options)
    assert forwards  # the hook sees the model's forward


def test_extract_images_from_paths_arrays_and_pil_images_is_extract_folder(tiny_set):
    # A tracker's crops: the same images as a folder's, given as paths, RGB arrays or PIL images,
    # with the cameras the names hold, give the folder's features and masks bit for bit.
    model, _ = tiny_model("dpm")
    folder = extract_folder(model, tiny_set / "query", progress=False)
    paths = [str(tiny_set / "query" / name) for name in folder.paths]
    cameras = folder.camids.tolist()
    arrays = [np.asarray(read_image(path)) for path in paths]
    for images in (paths, arrays, [read_image(path) for path in paths]):
        found = extract_images(model, images, camids=cameras)
        assert torch.equal(found.features, folder.features) and torch.equal(found.masks, folder.masks)
        assert found.camids.tolist() == cameras and found.pids.tolist() == [-1] * len(paths)
    assert extract_images(model, arrays, camids=torch.tensor(cameras)).paths[:2] == ["images[0]", "images[1]"]
    for one_camera in (torch.tensor(2), np.array(2), np.int64(2)):  # 0-d tensors and arrays are one int
        assert extract_images(model, arrays[:2], camids=one_camera).camids.tolist() == [2, 2]
    stacked = extract_images(model, np.stack(arrays[:3]), camids=cameras[:3])  # (N, H, W, 3): N images
    assert torch.equal(stacked.features, folder.features[:3])
    one = extract_images(model, arrays[3], camids=cameras[3], normalize=False)  # one image, as it comes
    assert torch.allclose(F.normalize(one.features), folder.features[3:4], atol=1e-6)
    grey = arrays[0][..., 0]  # (H, W) grey: read as RGB
    assert torch.equal(
        extract_images(model, [grey], camids=0).features,
        extract_images(model, [np.repeat(grey[..., None], 3, axis=2)], camids=0).features,
    )


def test_extract_images_maskreid_takes_masks_as_paths_or_arrays(tiny_set):
    model, _ = tiny_model("maskreid")
    folder = extract_folder(model, tiny_set / "query", image_size=MASKREID_SIZE, progress=False)
    paths = [str(tiny_set / "query" / name) for name in folder.paths]
    mask_paths = [mask_path_for(path, str(tiny_set)) for path in paths]
    for masks in (mask_paths, [np.asarray(read_mask(path)) > 0 for path in mask_paths]):
        found = extract_images(model, paths, masks=masks, image_size=MASKREID_SIZE)
        assert torch.equal(found.features, folder.features)
    # one image with its one mask, as they come (not lists)
    one = extract_images(model, paths[1], masks=np.asarray(read_mask(mask_paths[1])) > 0, image_size=MASKREID_SIZE)
    torch.testing.assert_close(one.features, folder.features[1:2], rtol=0, atol=1e-6)  # batch of one


def test_extract_images_bad_input(tiny_set):
    dpm, _ = tiny_model("dpm")
    maskreid, _ = tiny_model("maskreid")
    crop = np.zeros((20, 10, 3), np.uint8)
    cases = [
        (dict(model=dpm, images=[crop]), "camids: the model has a camera embedding"),
        (dict(model=dpm, images=[crop, crop], camids=[0]), r"one per image \(2\)"),
        (dict(model=dpm, images=[crop], camids=[True]), "camids must be"),
        (dict(model=dpm, images=[crop], camids=-1), "camids must be an integer >= 0"),
        (dict(model=dpm, images=[crop], camids=[-1]), "camids must be one integer >= 0, or one per image"),
        (dict(model=dpm, images=[crop], camids=True), "camids must be one integer >= 0, or one per image"),
        (dict(model=dpm, images=[crop], camids=1.5), "camids must be one integer >= 0, or one per image"),
        (dict(model=dpm, images=[crop], camids="1"), "camids must be one integer >= 0, or one per image"),
        (dict(model=dpm, images=[crop], camids=0, batch_size=0), "batch_size must be an integer >= 1"),
        (dict(model=dpm, images=[crop], camids=3), r"camera 3 of images\[0\] is out of range .* 3 camera"),
        (dict(model=dpm, images=[crop.astype(np.float32)], camids=0), r"images\[0\]: image arrays must be"),
        (dict(model=dpm, images=[crop[..., :2]], camids=0), r"\(H, W\) or \(H, W, 3\) of uint8"),
        (dict(model=dpm, images=[torch.zeros(3, 20, 10)], camids=0), "must be an image path, a PIL image or a uint8"),
        (dict(model=dpm, images=7, camids=0), "images must be a list, got int"),
        (dict(model=dpm, images=[crop], camids=0, masks=[crop[..., 0]]), "masks: dpm takes no mask"),
        (dict(model=dpm, images=[str(tiny_set / "missing.jpg")], camids=0), "image not found: .*missing.jpg"),
        (dict(model=maskreid, images=[crop]), "masks: maskreid needs each image's foreground mask"),
        (dict(model=maskreid, images=[crop], masks=[]), r"one per image \(1\), got 0"),
        (
            dict(model=maskreid, images=[crop], masks=[np.zeros((20, 11), bool)]),
            r"masks\[0\] is 11x20 but its image is 10x20",
        ),
        (dict(model=maskreid, images=[crop], masks=[np.zeros((20, 10), np.int64)]), "bool or uint8"),
        (  # a 0 / 1 uint8 label map was all background (thresholded at 128), silently
            dict(model=maskreid, images=[crop], masks=[np.eye(20, 10, dtype=np.uint8)]),
            r"mask masks\[0\] holds values 0\.\.1: a label image\?",
        ),
        # a 0 x 0 PIL image gave a feature, an empty list a (0, 0) array, a bad amp_dtype ran without autocast
        (dict(model=dpm, images=[Image.new("RGB", (0, 0))], camids=0), r"images\[0\] is an empty image \(0 x 0"),
        (dict(model=dpm, images=[], camids=0), "images: no image given"),
        (dict(model=dpm, images=[crop], camids=0, amp_dtype=torch.int32), "amp_dtype must be None, torch.float16"),
        (dict(model=dpm, images=[crop], camids=0, amp_dtype="bf16"), "amp_dtype must be None, torch.float16"),
        (dict(model=dpm, images=[crop], camids=0, device="cuda:x"), "device must be a torch.device or a name"),
    ]
    for arguments, needle in cases:
        with pytest.raises(ValueError, match=needle):
            extract_images(arguments.pop("model"), arguments.pop("images"), **arguments)


def test_feature_extractor_is_torchreids(tmp_path, tiny_set, capsys):
    # torchreid's FeatureExtractor (its installed file, read without importing torchvision): the same
    # parameters in the same order; called as it is, on paths, arrays or a preprocessed tensor.
    source = Path(peers.package_dir("torchreid") or pytest.skip(peers.missing_reason("torchreid")))
    tree = ast.parse((source / "reid/utils/feature_extractor.py").read_text())
    theirs = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    assert [a.arg for a in theirs.args.args] == list(inspect.signature(FeatureExtractor.__init__).parameters)
    config, weights, model = checkpointed(tmp_path, tiny_set, "dpm")
    extractor = FeatureExtractor(model_name=str(config), model_path=str(weights), device="cpu")
    assert capsys.readouterr().out.startswith("Model: dpm")
    # torchreid's image_size is a (height, width) sequence or one int for both (an int was a TypeError);
    # the ViT's position embedding fixes its size (64, 32): 64 is refused at construction
    with pytest.raises(ValueError, match=r"image_size \(64, 64\) differs from the model's input size \(64, 32\)"):
        FeatureExtractor(str(config), str(weights), image_size=64, device="cpu", verbose=False)
    # checked at construction, not at the first call
    for size, needle in (
        ("x", r"image_size must be 2 integers >= 1 \(height, width\), got 'x'"),
        (0, "got \\(0, 0\\)"),
    ):
        with pytest.raises(ValueError, match=needle):
            FeatureExtractor(str(config), str(weights), image_size=size, device="cpu", verbose=False)
    with pytest.raises(ValueError, match=r"image_size \(128, 64\) differs from the model's input size"):
        FeatureExtractor(str(config), str(weights), image_size=(128, 64), device="cpu", verbose=False)
    paths = sorted(str(p) for p in (tiny_set / "query").iterdir())[:5]
    expected = extract_images(model, paths, camids=1, normalize=False).features
    features = extractor(paths, camids=1)
    assert torch.equal(features, expected) and features.device.type == "cpu"
    assert torch.equal(extractor(paths[2], camids=1), expected[2:3])
    assert torch.equal(extractor(np.asarray(read_image(paths[2])), camids=1), expected[2:3])
    transform = eval_transform("dpm", VIT_SIZE)
    batch = torch.stack([transform(read_image(path)) for path in paths])
    torch.testing.assert_close(extractor(batch, camids=1), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(extractor(batch[0], camids=[1]), expected[:1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="camids: the model has a camera embedding"):
        extractor(batch)
    with pytest.raises(ValueError, match=r"a tensor must be \(B, 3, H, W\)"):
        extractor(batch[:, :1])
    with pytest.raises(ValueError, match=r"^input: no image given \(a tensor of shape \(0, 3, 64, 32\)\)"):
        extractor(batch[:0], camids=0)  # not blamed on camids
    with pytest.raises(ValueError, match=r"^input must be an image path, .* tensor, got dict"):
        extractor({"a": 1}, camids=0)  # not its keys read as images
    with pytest.raises(ValueError, match="pixel_mean: dpm_ops models normalise images as their test transforms"):
        FeatureExtractor(str(config), str(weights), pixel_mean=[0.485, 0.456, 0.406], device="cpu")
    # torchreid's defaults ("") meant ImageNet weights; "" read as the default config and the folder "."
    with pytest.raises(ValueError, match=r"^model_name: name a config, built-in \(dpm-reid configs lists them\)"):
        FeatureExtractor(model_path=str(weights), device="cpu")
    with pytest.raises(ValueError, match=r"^model_path: name the trained weights .* no ImageNet-initialised model"):
        FeatureExtractor(str(config), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            FeatureExtractor(str(config), str(weights))  # torchreid's default device


def query_images_and_masks(root, count: int):
    """The paths of the set's first ``count`` query images and of their masks."""
    paths = [str(path) for path in sorted((root / "query").iterdir())[:count]]
    return paths, [mask_path_for(path, str(root)) for path in paths]


def test_feature_extractor_maskreid_tensor_input_takes_masks(tmp_path, tiny_set):
    config, weights, model = checkpointed(tmp_path, tiny_set, "maskreid")
    extractor = FeatureExtractor(str(config), str(weights), device="cpu", verbose=False)
    paths, masks = query_images_and_masks(tiny_set, 4)
    expected = extractor(paths, masks=masks)
    size = tuple(load_config(str(config), [])["input"]["size"])
    transform = eval_transform("maskreid", size)
    pairs = [transform.pair(read_image(p), read_mask(m)) for p, m in zip(paths, masks)]
    images, foreground = (torch.stack(part) for part in zip(*pairs))
    torch.testing.assert_close(extractor(images, masks=foreground), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="masks: maskreid needs the"):
        extractor(images)
    torch.testing.assert_close(extractor(images[0], masks=foreground[0].bool()), expected[:1], rtol=0, atol=1e-6)
    # 0 / 255 masks multiplied the images by 255; a wrong shape or type was a raw torch error
    shape = tuple(foreground.shape)
    for masks, needle in (
        (foreground * 255, r"masks: values must be 0 \(background\) or 1 \(foreground\)"),
        (
            foreground[:, 0],
            rf"masks: expected a \({shape[0]}, 1, {shape[2]}, {shape[3]}\) tensor .*, got \({shape[0]}, ",
        ),
        (foreground[:3], r"masks: expected a \(4, 1, "),
        ("a.png", r"masks: with a tensor input, a \(4, 1, .* tensor of 0 / 1 values, got str"),
    ):
        with pytest.raises(ValueError, match=needle):
            extractor(images, masks=masks)


def test_feature_extractor_takes_its_image_size(tmp_path, tiny_set):
    # image_size (torchreid's argument) replaces the config's input.size in the test transforms
    config, weights, model = checkpointed(tmp_path, tiny_set, "maskreid")
    paths, masks = query_images_and_masks(tiny_set, 3)
    size = (44, 20)
    assert size != tuple(load_config(str(config), [])["input"]["size"])
    extractor = FeatureExtractor(str(config), str(weights), image_size=size, device="cpu", verbose=False)
    expected = extract_images(model, paths, masks=masks, image_size=size, normalize=False).features
    assert torch.equal(extractor(paths, masks=masks), expected)
    default = FeatureExtractor(str(config), str(weights), device="cpu", verbose=False)(paths, masks=masks)
    assert not torch.allclose(default, expected)
    assert FeatureExtractor(str(config), str(weights), image_size=44, device="cpu", verbose=False).image_size == (
        44,
        44,
    )


def test_find_images_is_recursive_sorted_and_by_extension(tmp_path):
    for name in ("b/2.JPG", "b/1.png", "a.jpeg", "c/d/e.webp", "notes.txt", "b/x.npy", "f.jpg/g.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert find_images(tmp_path) == ["a.jpeg", "b/1.png", "b/2.JPG", "c/d/e.webp", "f.jpg/g.png"]  # no folder
    with pytest.raises(DatasetNotFoundError, match="images folder not found"):
        find_images(tmp_path / "missing")
    with pytest.raises(
        DatasetError, match=r"^images folder .*notes.txt is a file, not a folder \(extract_images takes"
    ):
        find_images(tmp_path / "notes.txt")
    (tmp_path / "c" / "d" / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        find_images(tmp_path / "c" / "d" / "empty")


@pytest.fixture(scope="module")
def dpm_export(tmp_path_factory, tiny_set):
    """(model, dpm.onnx, printed output): `dpm-reid export` of a DPM checkpoint, run once."""
    folder = tmp_path_factory.mktemp("dpm_export")
    config, weights, model = checkpointed(folder, tiny_set, "dpm")
    out = folder / "deploy" / "dpm.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            main(["export", "--config", str(config), "--weights", str(weights), "--out", str(out), "--batch", "3"]) == 0
        )
    return model, out, printed.getvalue()


def test_cli_export_dpm(dpm_export):
    model, path, printed = dpm_export
    assert "inputs images, camids -> outputs feature, mask" in printed and "batch 3 and 4" in printed
    assert_standard_onnx(path)
    assert_onnxruntime_matches(path, model, "dpm", VIT_SIZE)


def test_readme_dpm_distance_from_onnx_outputs_matches_the_evaluator(dpm_export, monkeypatch):
    model, path, _ = dpm_export
    query, gallery = inputs_for("dpm", VIT_SIZE, 3, seed=1), inputs_for("dpm", VIT_SIZE, 7, seed=2)
    namespace = {
        "q_images": query["images"].numpy(),
        "q_camids": query["camids"].numpy(),
        "g_images": gallery["images"].numpy(),
        "g_camids": gallery["camids"].numpy(),
    }
    monkeypatch.chdir(path.parent)
    exec(readme_python_blocks("Deploy (ONNX)")[0], namespace)
    with torch.no_grad():
        (qf, qm), (gf, _) = model(*query.values()), model(*gallery.values())
    # the evaluator: L2-normalised features, then the query-masked arccos
    expected = masked_arccos_distance(F.normalize(qf, dim=1), qm, F.normalize(gf, dim=1)).numpy()
    assert namespace["distmat"].shape == (3, 7)
    np.testing.assert_allclose(namespace["distmat"], expected, atol=1e-4)


def test_cli_extract(tmp_path, tiny_set):
    config, weights, model = checkpointed(tmp_path, tiny_set, "dpm")
    npz = tmp_path / "new" / "folder" / "query.npz"
    assert (
        main(
            [
                "extract",
                "--config",
                str(config),
                "--weights",
                str(weights),
                "--images",
                str(tiny_set / "query"),
                "--out",
                str(npz),
            ]
        )
        == 0
    )
    saved = np.load(npz)
    expected = extract_folder(model, tiny_set / "query", progress=False)
    np.testing.assert_allclose(saved["features"], expected.features.numpy(), atol=1e-6)
    np.testing.assert_allclose(saved["masks"], expected.masks.numpy(), atol=1e-6)
    assert str(saved["model"]) == "dpm" and str(saved["distance"]) == "masked_arccos"


def test_cli_maskreid_at_the_configs_input_size(tmp_path, tiny_set, capsys, monkeypatch):
    # MaskReID takes any input size: the config's, not its 144x56 default; --camera sets every
    # image's camera over the names'; --no-check needs no onnxruntime.
    config, weights, model = checkpointed(tmp_path, tiny_set, "maskreid")
    common = ["--config", str(config), "--weights", str(weights)]
    npz = tmp_path / "query.npz"
    assert main(["extract", *common, "--images", str(tiny_set / "query"), "--out", str(npz), "--camera", "2"]) == 0
    saved = np.load(npz)
    expected = extract_folder(model, tiny_set / "query", image_size=MASKREID_SIZE, progress=False)
    np.testing.assert_allclose(saved["features"], expected.features.numpy(), atol=1e-6)
    assert saved["camids"].tolist() == [2] * len(expected)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    capsys.readouterr()
    assert main(["export", *common, "--out", str(tmp_path / "m.onnx"), "--no-check"]) == 0
    printed = capsys.readouterr().out
    assert "images 36x16" in printed and "onnxruntime matches" not in printed


def test_cli_export_and_extract_errors_are_one_line(tmp_path, tiny_set, capsys, monkeypatch):
    config, weights, _ = checkpointed(tmp_path, tiny_set, "dpm")
    baseline = write_config(tmp_path / "baseline.yaml", tiny_config(tiny_set, "vit_baseline"))
    (tmp_path / "file").write_text("")
    common = ["--config", str(config), "--weights", str(weights)]

    def export(*argv):
        return main(["export", *argv])

    assert_one_line_error(
        capsys,
        export("--config", str(config), "--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.onnx")),
        "checkpoint not found",
        "none.pt",
    )
    assert_one_line_error(
        capsys,
        export("--config", str(baseline), "--weights", str(weights), "--out", str(tmp_path / "m.onnx")),
        "holds a 'dpm' model, not 'vit_baseline'",
    )
    assert_one_line_error(capsys, export(*common, "--out", str(tmp_path)), "--out", "is a directory")
    assert_one_line_error(
        capsys, export(*common, "--out", str(tmp_path / "file" / "m.onnx")), "--out", "cannot create its folder"
    )
    assert_one_line_error(capsys, export(*common, "--out", str(tmp_path / "m.onnx"), "--opset", "9"), "opset")
    # taken and left out of the graph, whose features then differed from extract's with the same config
    assert_one_line_error(
        capsys, export(*common, "--out", str(tmp_path / "m.onnx"), "eval.flip=true"), "eval.flip: the ONNX graph"
    )
    assert_one_line_error(
        capsys, export(*common, "--out", str(tmp_path / "m.onnx"), "input.size=[96,48]"), str(weights), "input.size"
    )
    dropped = tmp_path / "dropped.pt"
    state = torch.load(weights, weights_only=False)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, dropped)
    assert_one_line_error(
        capsys,
        main(
            [
                "extract",
                "--config",
                str(config),
                "--weights",
                str(dropped),
                "--images",
                str(tiny_set / "query"),
                "--out",
                str(tmp_path / "f.npz"),
            ]
        ),
        str(dropped),
        "missing",
    )
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "onnxruntime", None)
        assert_one_line_error(
            capsys,
            export(*common, "--out", str(tmp_path / "m.onnx")),
            "the check of the exported file (--no-check leaves it out) needs onnxruntime",
        )

    def extract(images, out=tmp_path / "f.npz"):
        return main(["extract", *common, "--images", str(images), "--out", str(out)])

    (tmp_path / "empty").mkdir()
    assert_one_line_error(capsys, extract(tmp_path / "empty"), "no images", "empty")
    assert_one_line_error(capsys, extract(tmp_path / "missing"), "images folder not found", "missing")
    assert_one_line_error(
        capsys, extract(tiny_set / "query", tmp_path / "file" / "f.npz"), "--out", "cannot create its folder"
    )
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_set / "query", corrupt)
    victim = sorted(corrupt.iterdir())[5]
    victim.write_bytes(b"garbage")
    assert_one_line_error(capsys, extract(corrupt), "unreadable image", victim.name)
    assert not (tmp_path / "f.npz").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("path", [None, ""])
def test_export_path_must_be_a_file_path(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # was: a file literally named "None" written here
    model = build_model("vit_baseline", num_classes=3, **TINY_VIT)
    with pytest.raises(ExportError, match="path must be a file path"):
        export_onnx(model, path, check=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_feature_extractor_on_cuda_follows_the_cpu(tmp_path, tiny_set):
    # The tracker's GPU path: features on the device, equal to the CPU's within the kernels' rounding.
    config, weights, _ = checkpointed(tmp_path, tiny_set, "dpm")
    paths = sorted(str(p) for p in (tiny_set / "query").iterdir())[:6]
    on_cpu = FeatureExtractor(str(config), str(weights), device="cpu", verbose=False)(paths, camids=0)
    on_gpu = FeatureExtractor(str(config), str(weights), device="cuda", verbose=False)(paths, camids=0)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)


def test_the_largest_batch_exports_and_checks(tmp_path):
    """--batch 256, the most the help gives: the check ran batches (256, 257) and refused its own second size."""
    from dpm_ops.export import MAX_EXAMPLE_BATCH

    model, size = tiny_model("maskreid")
    result = export_onnx(model, tmp_path / "model.onnx", image_size=size, batch=MAX_EXAMPLE_BATCH, check=True)
    assert result.checked_batches == (MAX_EXAMPLE_BATCH - 1, MAX_EXAMPLE_BATCH)


_FULL_DISK_EXPORT = """
import sys
sys.path.insert(0, "tests")
from test_export import tiny_model
from dpm_ops.export import export_onnx
model, size = tiny_model("vit_baseline")
try:
    export_onnx(model, sys.argv[1], image_size=size, check=False)
except OSError as error:
    print(error.filename)
"""


def test_a_failed_export_write_names_the_output_and_keeps_the_earlier_file(tmp_path):
    """A full disk named the hidden staged file (<out>.XXXX.tmp/<name>), a path the user never gave."""
    from engine_utils import run_with_file_size_limit

    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    result = run_with_file_size_limit([sys.executable, "-c", _FULL_DISK_EXPORT, str(out)], 16_384)
    assert result.returncode == 0 and result.stdout.strip() == str(out), result.stdout + result.stderr[-3000:]
    assert out.read_bytes() == b"an earlier export" and os.listdir(tmp_path) == ["model.onnx"]
