"""Bad input to check_onnx, export_onnx, extract_images and the feature files: an ExportError naming the
argument, before the long work, never onnxruntime's or Python's own error nor a mislabelled result."""

import numpy as np
import pytest
import torch

from dpm_ops.engine.extraction import FeatureSet
from dpm_ops.export import ExportError, check_onnx, export_onnx
from dpm_ops.feature_files import extract_images, load_features_npz, save_features_npz
from dpm_ops.models import build_model

VIT = dict(embed_dim=48, depth=2, num_heads=4, img_size=(64, 64), stride=16)


def dpm(cameras: int = 2, **options):
    return build_model("dpm", 5, cameras, **{**VIT, "mask_tap_blocks": (0, 1), **options}).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(DPM with 2 cameras, its ONNX file)."""
    model = dpm()
    path = tmp_path_factory.mktemp("onnx") / "dpm.onnx"
    export_onnx(model, path)
    return model, path


def test_check_onnx_names_a_file_that_is_missing_or_not_onnx(exported, tmp_path):
    model, _ = exported
    (tmp_path / "garbage.pth").write_bytes(b"not a model")
    cases = [
        (tmp_path / "missing.onnx", "missing.onnx: not found"),
        (None, "must be the path of an ONNX file"),
        (tmp_path / "garbage.pth", "garbage.pth: not an ONNX model"),
        (tmp_path, "is a folder"),
    ]
    for path, needle in cases:
        with pytest.raises(ExportError, match=f"^path.*{needle}"):
            check_onnx(model, path)


def test_check_onnx_names_a_file_of_another_model(exported):
    # another image size, no camera embedding, another kind, another width: the caller's file, not the export
    _, path = exported
    cases = [
        (
            dpm(img_size=(128, 64)),
            r"image size \(128, 64\)\): input 'images' is tensor\(float\) \['batch', 3, 64, 64\]",
        ),
        (dpm(cameras=0), r"the file takes inputs \['images', 'camids'\], the model \['images'\]"),
        (
            build_model("vit_baseline", 5, 2, **VIT).eval(),
            r"gives outputs \['feature', 'mask'\], the model \['feature'\]",
        ),
        (dpm(embed_dim=32), r"output 'feature' is \['batch', 48\], the model's \['batch', 32\]"),
    ]
    for model, needle in cases:
        with pytest.raises(ExportError, match=f"^path {path}: not an export of this model.*{needle}"):
            check_onnx(model, path)


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(batch_sizes=2), r"batch_sizes must be a non-empty list of integers in \[1, 256\], got 2"),
        (dict(batch_sizes=()), r"batch_sizes must be a non-empty list .*, got \(\)"),
        (dict(batch_sizes=(10**9,)), r"batch_sizes must be .* in \[1, 256\], got \(1000000000,\)"),
        (dict(batch_sizes=(2, True)), r"batch_sizes must be"),
        (dict(seed="a"), r"seed must be an integer in \[0, 9223372036854775807\], got 'a'"),
        (dict(seed=-1), r"seed must be an integer"),
    ],
)
def test_check_onnx_checks_its_batch_sizes_and_seed(exported, options, needle):
    model, path = exported
    with pytest.raises(ExportError, match=needle):
        check_onnx(model, path, **options)


def test_export_checks_check_and_rtol_before_exporting(tmp_path):
    model = dpm()
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="check must be True or False, got 'no'"):
        export_onnx(model, path, check="no")
    for rtol in (-1, 0, float("nan"), "1e-4", True):
        with pytest.raises(ExportError, match="rtol must be a positive number"):
            export_onnx(model, path, check=True, rtol=rtol)
    assert not path.exists()  # refused before the export


@pytest.mark.parametrize("flag", ["normalize", "progress"])
def test_extract_images_flags_are_bools(flag):
    crop = np.zeros((64, 32, 3), dtype=np.uint8)
    with pytest.raises(ExportError, match=f"{flag} must be True or False, got 'no'"):
        extract_images(dpm(), [crop], camids=0, **{flag: "no"})


def feature_set(masks: bool) -> FeatureSet:
    features = torch.rand(3, 48)
    return FeatureSet(
        features, torch.rand(3, 48) if masks else None, torch.arange(3), torch.zeros(3).long(), list("abc")
    )


def test_save_features_npz_refuses_features_of_another_model(tmp_path):
    path = tmp_path / "g.npz"
    vit = build_model("vit_baseline", 5, 2, **VIT).eval()
    with pytest.raises(ExportError, match=r"features have channel masks .* but model is a vit_baseline model"):
        save_features_npz(path, feature_set(masks=True), vit)
    with pytest.raises(ExportError, match="features have no channel masks, but model is a dpm model"):
        save_features_npz(path, feature_set(masks=False), dpm())
    for features in (None, {"features": torch.rand(3, 48)}):
        with pytest.raises(ExportError, match=r"^features must be a FeatureSet \(extract_folder / extract_images\)"):
            save_features_npz(path, features, dpm())
    assert not path.exists()
    save_features_npz(path, feature_set(masks=True), dpm())
    assert load_features_npz(path).model == "dpm"


def test_load_features_npz_names_a_bad_path_and_int_paths(tmp_path):
    with pytest.raises(ExportError, match="^query must be the path of an .npz of dpm-reid extract, got None"):
        load_features_npz(None, "query")
    path = tmp_path / "g.npz"
    save_features_npz(path, feature_set(masks=True), dpm())
    arrays = dict(np.load(path))
    np.savez(path, **{**arrays, "paths": np.arange(3)})
    with pytest.raises(ExportError, match=r"paths must hold 3 names \(strings\), one per feature, got int64"):
        load_features_npz(path)


def test_a_failed_check_leaves_the_file_that_was_there(exported, tmp_path):
    """The graph was written over `path` before onnxruntime's check: a failed check left the failed graph in place
    of the earlier file. The weights of a model past 2 GB (<name>.data) move in with the file that names them."""
    from dpm_ops import export as export_module
    from dpm_ops.export import OnnxCheckError

    model, good = exported
    path = tmp_path / "dpm.onnx"
    path.write_bytes(good.read_bytes())
    other = dpm()
    with torch.no_grad():
        other.classifier.weight.add_(0.5)
        next(other.backbone.parameters()).add_(0.5)
    with pytest.raises(OnnxCheckError):
        export_onnx(other, path, check=True, rtol=1e-30)
    assert path.read_bytes() == good.read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == ["dpm.onnx"]
    (tmp_path / "ext.onnx.data").write_text("an earlier export's weights")
    original = export_module._PROTOBUF_LIMIT
    export_module._PROTOBUF_LIMIT = 0  # the external-data path, at the tiny model's size
    try:
        result = export_onnx(model, tmp_path / "ext.onnx", check=True)
    finally:
        export_module._PROTOBUF_LIMIT = original
    assert result.path == tmp_path / "ext.onnx" and (tmp_path / "ext.onnx.data").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpm.onnx", "ext.onnx", "ext.onnx.data"]
    check_onnx(model, tmp_path / "ext.onnx")


def test_export_refuses_a_float_opset_and_names_the_models_own_refusal(tmp_path):
    """opset=18.0 passed `in range(18, 24)`, failed inside torch's exporter, and every later export of the process
    failed too; a MaskReID input below 2 x 2 pixels was torch.export's 176-line traceback around the model's
    ValueError."""
    for opset in (18.0, True, "18"):
        with pytest.raises(ExportError, match=r"opset must be an integer in 18\.\.23, got"):
            export_onnx(dpm(), tmp_path / "m.onnx", opset=opset)
    maskreid = build_model("maskreid", 5, stem_channels=4, base_width=8, embed_dim=16).eval()
    with pytest.raises(
        ExportError, match="the model refused the example inputs: raw and masked images must be at least"
    ):
        export_onnx(maskreid, tmp_path / "m.onnx", image_size=(1, 1))
    assert not (tmp_path / "m.onnx").exists()


def test_extract_folder_and_rank_features_arguments(tmp_path, monkeypatch):
    """extract_folder forked num_workers=10**9 processes until the OOM killer ended it, read "" as the current
    folder and progress="no" as true; rank_features took k1 without rerank silently and max_rank 1..9 was an
    IndexError; an .npz array of pickled objects was called "not an .npz file"."""
    from dpm_ops.feature_files import extract_folder, rank_features

    model = dpm(cameras=0)
    for options, message in (
        (dict(num_workers=10**9), r"num_workers must be an integer in \[0, 1024\]"),
        (dict(progress="no"), "progress must be True or False, got 'no'"),
        (dict(flip="no"), "flip must be True or False, got 'no'"),
    ):
        with pytest.raises(ExportError, match=message):
            extract_folder(model, tmp_path, **options)
    monkeypatch.chdir(tmp_path)
    for folder in ("", None, b"x"):
        with pytest.raises(ExportError, match="folder must be the path of an image folder, got"):
            extract_folder(model, folder)
    path = tmp_path / "q.npz"
    save_features_npz(path, feature_set(masks=True), dpm())
    saved = load_features_npz(path)
    with pytest.raises(ValueError, match="k1 and k2 are re-ranking's: pass rerank=True"):
        rank_features(saved, saved, k1=5)
    with pytest.raises(ValueError, match=r"max_rank must be an integer >= 10 \(Rank-10 is reported\), got 1"):
        rank_features(saved, saved, max_rank=1)
    arrays = dict(np.load(path))
    arrays["paths"] = np.array(list(arrays["paths"]), dtype=object)
    np.savez(tmp_path / "objects.npz", **arrays)
    with pytest.raises(ExportError, match="array 'paths' holds pickled Python objects, which are not loaded"):
        load_features_npz(tmp_path / "objects.npz")
