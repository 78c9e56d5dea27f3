"""load_pretrained with tiny fake checkpoints in each layout. Key lists are written out here from
the layouts themselves (timm 0.4 ViT, official DPM §1.3, torchvision ResNet-50), not from our
modules, so a renamed parameter on our side fails these tests."""

import math
import re

import numpy as np
import pytest
import torch

from dpm_ops.models import WeightsError, build_model, load_pretrained, resize_pos_embed
from dpm_ops.models.weights import infer_grid, trained_state_dict

C, DEPTH, CAMERAS, CLASSES = 32, 4, 3, 6
TINY_VIT = dict(embed_dim=C, depth=DEPTH, num_heads=4)
TINY_DPM = dict(TINY_VIT, mask_tap_blocks=(0, 1, 2, 3))


def random_state(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(17)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


def vit_shapes(prefix, num_tokens, dim=C, depth=DEPTH):
    shapes = {
        f"{prefix}cls_token": (1, 1, dim),
        f"{prefix}pos_embed": (1, num_tokens, dim),
        f"{prefix}patch_embed.proj.weight": (dim, 3, 16, 16),
        f"{prefix}patch_embed.proj.bias": (dim,),
        f"{prefix}norm.weight": (dim,),
        f"{prefix}norm.bias": (dim,),
    }
    for i in range(depth):
        block = f"{prefix}blocks.{i}."
        shapes.update(
            {
                block + "norm1.weight": (dim,),
                block + "norm1.bias": (dim,),
                block + "attn.qkv.weight": (3 * dim, dim),
                block + "attn.qkv.bias": (3 * dim,),
                block + "attn.proj.weight": (dim, dim),
                block + "attn.proj.bias": (dim,),
                block + "norm2.weight": (dim,),
                block + "norm2.bias": (dim,),
                block + "mlp.fc1.weight": (4 * dim, dim),
                block + "mlp.fc1.bias": (4 * dim,),
                block + "mlp.fc2.weight": (dim, 4 * dim),
                block + "mlp.fc2.bias": (dim,),
            }
        )
    return shapes


def bn_shapes(prefix, channels):
    return {f"{prefix}{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}num_batches_tracked": ()
    }


def timm_checkpoint(dim=C, depth=DEPTH):
    """timm's ViT-B/16 layout (jx_vit_base_p16_224: 224 x 224's 14 x 14 grid, an ImageNet head) at width
    `dim` and `depth` blocks."""
    shapes = vit_shapes("", 1 + 14 * 14, dim, depth) | {"head.weight": (1000, dim), "head.bias": (1000,)}
    return random_state(shapes)


def official_dpm_checkpoint(num_tokens=1 + 22 * 11, cameras=CAMERAS):
    shapes = vit_shapes("base.", num_tokens) | {"base.sie_embed": (cameras, 1, C)}
    for index, (c_in, c_out) in zip((0, 2, 4), ((4 * C, 2 * C), (2 * C, C), (C, C))):
        shapes |= {f"base.ConvLayer.{index}.0.weight": (c_out, c_in, 3, 3), f"base.ConvLayer.{index}.0.bias": (c_out,)}
        shapes |= bn_shapes(f"base.ConvLayer.{index}.1.", c_out)
    shapes |= {
        "base.attfc.weight": (C, C),
        "base.attfc.bias": (C,),
        "base.fc.weight": (1000, C),
        "base.fc.bias": (1000,),
        "classifier.weight": (CLASSES, C),
    }
    shapes |= bn_shapes("bottleneck.", C)
    return random_state(shapes, seed=1)


def torchvision_resnet_checkpoint(width=8):
    shapes = {"conv1.weight": (width, 3, 7, 7)} | bn_shapes("bn1.", width)
    in_channels = width
    for stage in range(1, 5):
        planes = width * 2 ** (stage - 1)
        block = f"layer{stage}.0."
        shapes |= {
            block + "conv1.weight": (planes, in_channels, 1, 1),
            block + "conv2.weight": (planes, planes, 3, 3),
            block + "conv3.weight": (4 * planes, planes, 1, 1),
            block + "downsample.0.weight": (4 * planes, in_channels, 1, 1),
        }
        for bn, channels in (("bn1.", planes), ("bn2.", planes), ("bn3.", 4 * planes), ("downsample.1.", 4 * planes)):
            shapes |= bn_shapes(block + bn, channels)
        in_channels = 4 * planes
    shapes |= {"fc.weight": (1000, in_channels), "fc.bias": (1000,)}
    return random_state(shapes, seed=2)


def bilinear_reference(grid, out_h, out_w):
    """PyTorch's align_corners=False bilinear, written out: src = (dst + 0.5)·in/out − 0.5, floored at 0."""
    in_h, in_w, _ = grid.shape

    def taps(out_size, in_size):
        result = []
        for dst in range(out_size):
            src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
            low = int(math.floor(src))
            high = min(low + 1, in_size - 1)
            result.append((low, high, src - low))
        return result

    out = np.zeros((out_h, out_w, grid.shape[2]))
    for y, (y0, y1, ly) in enumerate(taps(out_h, in_h)):
        for x, (x0, x1, lx) in enumerate(taps(out_w, in_w)):
            out[y, x] = (1 - ly) * ((1 - lx) * grid[y0, x0] + lx * grid[y0, x1]) + ly * (
                (1 - lx) * grid[y1, x0] + lx * grid[y1, x1]
            )
    return out


def test_pos_embed_resize_matches_written_out_bilinear():
    pos_embed = torch.randn(1, 1 + 14 * 14, 5, dtype=torch.float64)
    resized = resize_pos_embed(pos_embed, (22, 11))
    assert resized.shape == (1, 1 + 242, 5)
    torch.testing.assert_close(resized[:, 0], pos_embed[:, 0])  # CLS slot kept
    expected = bilinear_reference(pos_embed[0, 1:].reshape(14, 14, 5).numpy(), 22, 11)
    np.testing.assert_allclose(resized[0, 1:].reshape(22, 11, 5).numpy(), expected, atol=1e-12)
    # a 2:1 source grid (an official stride-12 checkpoint, 21x10) is recognised too
    official = torch.randn(1, 1 + 210, 5, dtype=torch.float64)
    expected = bilinear_reference(official[0, 1:].reshape(21, 10, 5).numpy(), 22, 11)
    np.testing.assert_allclose(
        resize_pos_embed(official, (22, 11))[0, 1:].reshape(22, 11, 5).numpy(), expected, atol=1e-12
    )


def test_source_grid_is_square_or_two_to_one_and_anything_else_is_refused():
    grids = {196: (14, 14), 1: (1, 1), 128: (16, 8), 50: (10, 5), 210: (21, 10), 242: (22, 11), 264: (24, 11)}
    assert {n: infer_grid(n) for n in grids} == grids
    for num_patches in (7, 15, 192):  # 7x1, 5x3, 24x8 (3:1): no square and no 2:1 grid
        with pytest.raises(
            ValueError, match=f"cannot infer the patch grid of a {num_patches}-token position embedding"
        ):
            resize_pos_embed(torch.zeros(1, 1 + num_patches, 4), (16, 8))


def test_pos_embed_resize_of_a_half_precision_file_interpolates_in_float32():
    """A bf16 / fp16 file keeps its dtype, and the interpolation runs in float32 (one rounding,
    at the end), as a float32 copy of the file would give."""
    source = torch.randn(1, 1 + 14 * 14, 8)
    for dtype in (torch.bfloat16, torch.float16):
        half = source.to(dtype)
        resized = resize_pos_embed(half, (22, 11))
        assert resized.dtype == dtype and torch.equal(resized[:, 0], half[:, 0])
        assert torch.equal(resized, resize_pos_embed(half.float(), (22, 11)).to(dtype))


@pytest.mark.parametrize("model_name", ["dpm", "vit_baseline"])
def test_timm_vit_checkpoint(tmp_path, model_name):
    checkpoint = timm_checkpoint()
    path = tmp_path / "jx_vit_tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in checkpoint.items()}}, path)
    torch.manual_seed(0)
    options = TINY_DPM if model_name == "dpm" else TINY_VIT
    model = build_model(model_name, CLASSES, CAMERAS, stride=11, **options)
    sie_before = model.backbone.sie_embed.detach().clone()
    report = load_pretrained(model, path)
    assert report.layout == "timm_vit"
    assert report.dropped == ["head.bias", "head.weight"]
    assert report.unexpected == []
    assert len(report.loaded) == len(checkpoint) - 2
    assert "backbone.sie_embed" in report.missing and "classifier.weight" in report.missing
    assert all(not key.startswith("backbone.") or key == "backbone.sie_embed" for key in report.missing)
    backbone = model.backbone
    torch.testing.assert_close(backbone.blocks[3].mlp.fc2.weight, checkpoint["blocks.3.mlp.fc2.weight"])
    torch.testing.assert_close(backbone.blocks[0].attn.qkv.bias, checkpoint["blocks.0.attn.qkv.bias"])
    torch.testing.assert_close(backbone.patch_embed.proj.weight, checkpoint["patch_embed.proj.weight"])
    torch.testing.assert_close(backbone.pos_embed, resize_pos_embed(checkpoint["pos_embed"], (22, 11)))
    torch.testing.assert_close(backbone.sie_embed, sie_before)  # keeps its init
    if model_name == "dpm":
        assert torch.all(model.mask_generator.attfc.weight == 0)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("patch_embed.proj.weight", torch.zeros(C, 100), f"shape ({C}, 100) is no ({C}, 3, 16, 16) kernel"),
        ("pos_embed", torch.zeros(2, 1 + 14 * 14, C), f"shape (2, 197, {C}) cannot be resized"),  # two embeddings
        ("pos_embed", torch.zeros(1, 1, C), f"shape (1, 1, {C}) cannot be resized"),  # the CLS slot alone
        ("cls_token", torch.zeros(1, 1, C).to_sparse(), "entry 'cls_token' holds a sparse tensor"),
    ],
)
def test_malformed_timm_tensors_are_weights_errors(key, value, needle):
    """torch's RuntimeError (a reshape, an interpolation to size 0) or NotImplementedError (a sparse tensor's
    finiteness) came out of these, naming no key."""
    checkpoint = {**timm_checkpoint(), key: value}
    model = build_model("vit_baseline", CLASSES, CAMERAS, stride=12, **TINY_VIT)
    with pytest.raises(WeightsError) as info:
        load_pretrained(model, checkpoint)
    assert needle in str(info.value), str(info.value)
    with pytest.raises(WeightsError, match="^model must be a torch.nn.Module .*, got NoneType$"):
        load_pretrained(None, checkpoint)


def test_timm_checkpoint_with_flat_patch_weight():
    checkpoint = timm_checkpoint()
    checkpoint["patch_embed.proj.weight"] = checkpoint["patch_embed.proj.weight"].reshape(C, -1)
    model = build_model("vit_baseline", CLASSES, CAMERAS, stride=12, **TINY_VIT)
    load_pretrained(model, checkpoint)
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight.flatten(1), checkpoint["patch_embed.proj.weight"])
    assert model.backbone.pos_embed.shape == (1, 1 + 21 * 10, C)


def test_timm_layout_is_recognised_without_cls_token_and_distillation_keys_are_dropped():
    # a DeiT-style distilled file: dist_token / head_dist are dropped like head; a file without
    # cls_token (a pooled ViT) is still timm's, by its first block
    checkpoint = timm_checkpoint()
    checkpoint["dist_token"] = torch.zeros(1, 1, C)
    checkpoint["head_dist.weight"] = torch.zeros(10, C)
    del checkpoint["cls_token"]
    model = build_model("vit_baseline", CLASSES, CAMERAS, stride=11, **TINY_VIT)
    report = load_pretrained(model, checkpoint, partial=True)
    assert report.layout == "timm_vit" and report.unexpected == []
    assert report.dropped == ["dist_token", "head.bias", "head.weight", "head_dist.weight"]
    assert "backbone.cls_token" in report.missing


def test_classifiers_are_never_required_of_a_pretrained_file():
    # MaskReID (neither a ViT nor the ResNet-50 trunk): every tensor but the classifier's
    torch.manual_seed(0)
    source = build_model("maskreid", CLASSES, stem_channels=4, base_width=4)
    backbone = {k: v for k, v in source.state_dict().items() if "classifier." not in k}
    assert len(backbone) < len(source.state_dict())
    report = load_pretrained(build_model("maskreid", CLASSES, stem_channels=4, base_width=4), backbone)
    assert report.missing and all("classifier." in key for key in report.missing)


@pytest.mark.parametrize("model_name", ["maskreid", "dpm"])
def test_a_classifier_of_other_classes_is_left_out_and_any_other_shape_refused(model_name):
    """A run's weights start one on another set (MaskReID's JSTL softmax stage, then Market-1501's): its classifier
    of the first set's identities is dropped, as torchreid's and fast-reid's loaders skip it; a trunk of another
    shape is still an error."""
    options = dict(stem_channels=4, base_width=4) if model_name == "maskreid" else dict(stride=11, **TINY_DPM)
    torch.manual_seed(0)
    first = build_model(model_name, CLASSES + 3, CAMERAS, **options).state_dict()
    model = build_model(model_name, CLASSES, CAMERAS, **options)
    report = load_pretrained(model, first)
    heads = sorted(key for key in first if ".classifier." in f".{key}")
    assert heads and report.dropped == heads and report.missing == heads and report.unexpected == []
    assert all(torch.equal(model.state_dict()[key], first[key]) for key in report.loaded)
    trunk = next(key for key in first if first[key].dim() == 4)
    with pytest.raises(WeightsError, match=f"checkpoint key '{re.escape(trunk)}' -> model key .* does not match"):
        load_pretrained(model, {**first, trunk: first[trunk][:1]})


def test_official_dpm_checkpoint(tmp_path):
    checkpoint = official_dpm_checkpoint()
    path = tmp_path / "transformer_150.pth"
    torch.save({f"module.{k}": v for k, v in checkpoint.items()}, path)
    model = build_model("dpm", CLASSES, CAMERAS, stride=11, **TINY_DPM)
    report = load_pretrained(model, path)
    assert report.layout == "dpm_official"
    assert report.missing == [] and report.unexpected == []
    assert report.dropped == ["base.fc.bias", "base.fc.weight"]
    expected_pairs = {
        "base.ConvLayer.0.0.weight": model.mask_generator.conv_stack[0][0].weight,
        "base.ConvLayer.2.1.running_var": model.mask_generator.conv_stack[2][1].running_var,
        "base.ConvLayer.4.1.num_batches_tracked": model.mask_generator.conv_stack[4][1].num_batches_tracked,
        "base.attfc.weight": model.mask_generator.attfc.weight,
        "base.sie_embed": model.backbone.sie_embed,
        "base.pos_embed": model.backbone.pos_embed,
        "base.blocks.2.attn.proj.weight": model.backbone.blocks[2].attn.proj.weight,
        "classifier.weight": model.classifier.weight,
        "bottleneck.running_mean": model.bottleneck.running_mean,
        "bottleneck.bias": model.bottleneck.bias,
    }
    for key, tensor in expected_pairs.items():
        torch.testing.assert_close(tensor, checkpoint[key], msg=key)
    assert not model.bottleneck.bias.requires_grad  # still frozen after loading
    model.eval()
    with torch.no_grad():
        feature, mask = model(torch.randn(1, 3, 256, 128), cam_label=torch.tensor([1]))
    assert feature.shape == (1, C) and not torch.all(mask == 0.5)


def test_official_stride12_checkpoint_into_stride11_model_resizes_pos_embed():
    checkpoint = official_dpm_checkpoint(num_tokens=1 + 21 * 10)
    model = build_model("dpm", CLASSES, CAMERAS, stride=11, **TINY_DPM)
    load_pretrained(model, checkpoint)
    torch.testing.assert_close(model.backbone.pos_embed, resize_pos_embed(checkpoint["base.pos_embed"], (22, 11)))


def test_a_position_embedding_of_no_known_grid_names_the_file_and_key():
    model = build_model("dpm", CLASSES, CAMERAS, stride=11, **TINY_DPM)
    with pytest.raises(WeightsError, match=r"'base\.pos_embed': cannot infer the patch grid of a 192-token"):
        load_pretrained(model, official_dpm_checkpoint(num_tokens=1 + 24 * 8))


def test_shape_mismatch_names_the_key():
    """A model for another set (its classes, its cameras) starts from the official weights without their classifier
    and camera embedding; a tensor of the network itself of another shape is refused, named."""
    model = build_model("dpm", CLASSES + 1, 8, stride=11, **TINY_DPM)  # 8 cameras, checkpoint has 3
    report = load_pretrained(model, official_dpm_checkpoint())
    assert report.dropped == ["base.fc.bias", "base.fc.weight", "base.sie_embed", "classifier.weight"]
    checkpoint = {**official_dpm_checkpoint(), "bottleneck.weight": torch.ones(C + 1)}
    with pytest.raises(ValueError, match=r"'bottleneck\.weight' -> model key 'bottleneck\.weight': shape"):
        load_pretrained(model, checkpoint)
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_pretrained(model, torchvision_resnet_checkpoint())


def test_layouts_that_do_not_fit_are_refused():
    maskreid = build_model("maskreid_resnet50", 4, layers=(1, 1, 1, 1), width=8)
    with pytest.raises(WeightsError, match="a dpm_official checkpoint cannot be loaded into MaskReIDResNet50"):
        load_pretrained(maskreid, official_dpm_checkpoint())
    # a whole trained model is native or official DPM; ImageNet backbones start a training instead
    for layout, checkpoint in (
        ("timm_vit", timm_checkpoint()),
        ("torchvision_resnet50", torchvision_resnet_checkpoint()),
    ):
        with pytest.raises(WeightsError, match=f"holds {layout} ImageNet backbone weights"):
            trained_state_dict(checkpoint, "f.pth")
    wide = timm_checkpoint()
    wide["pos_embed"] = torch.zeros(1, 1 + 14 * 14, C + 1)
    model = build_model("vit_baseline", CLASSES, CAMERAS, stride=11, **TINY_VIT)
    with pytest.raises(WeightsError, match="'pos_embed' -> 'backbone.pos_embed': shape .* cannot be resized"):
        load_pretrained(model, wide)


def test_a_key_with_two_targets_is_unexpected_once():
    checkpoint = torchvision_resnet_checkpoint()
    checkpoint["conv1.extra"] = torch.zeros(1)  # -> trunk.conv1.extra and masked_stem.conv1.extra, neither exists
    model = build_model("maskreid_resnet50", 4, layers=(1, 1, 1, 1), width=8)
    assert load_pretrained(model, checkpoint).unexpected == ["conv1.extra"]


def test_torchvision_resnet50_checkpoint(tmp_path):
    checkpoint = torchvision_resnet_checkpoint()
    path = tmp_path / "resnet50.pth"
    torch.save(checkpoint, path)
    model = build_model("maskreid_resnet50", 4, layers=(1, 1, 1, 1), width=8)
    report = load_pretrained(model, path)
    assert report.layout == "torchvision_resnet50"
    assert report.dropped == ["fc.bias", "fc.weight"] and report.unexpected == []
    assert {k for k in report.missing if not k.startswith("head.")} == {"stream_fuse.weight"}
    assert "masked_stem.conv1.weight" in report.loaded and "trunk.layer4.0.downsample.0.weight" in report.loaded
    for key, tensor in checkpoint.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(model.trunk.state_dict()[key], tensor, msg=key)
    for key in ("conv1.weight", "bn1.running_mean", "bn1.weight"):
        torch.testing.assert_close(model.masked_stem.state_dict()[key], checkpoint[key])


def test_torchvision_resnet50_file_without_batch_counters(tmp_path):
    # torchvision's ImageNet ResNet-50 files hold no num_batches_tracked: they were "backbone tensors
    # left at their init", so the real file needed partial=True
    checkpoint = {k: v for k, v in torchvision_resnet_checkpoint().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet50-19c8e357.pth"
    torch.save(checkpoint, path)
    model = build_model("maskreid_resnet50", 4, layers=(1, 1, 1, 1), width=8)
    assert "trunk.layer4.0.downsample.0.weight" in load_pretrained(model, path).loaded


def test_native_round_trip_for_every_model(tmp_path):
    builds = {
        "dpm": dict(TINY_DPM),
        "vit_baseline": dict(TINY_VIT),
        "maskreid": dict(stem_channels=4, base_width=4),
        "maskreid_resnet50": dict(layers=(1, 1, 1, 1), width=8),
    }
    for name, options in builds.items():
        torch.manual_seed(0)
        source = build_model(name, CLASSES, CAMERAS, **options)
        path = tmp_path / f"{name}.pth"
        torch.save(source.state_dict(), path)
        torch.manual_seed(1)
        target = build_model(name, CLASSES, CAMERAS, **options)
        report = load_pretrained(target, path)
        assert report.layout == "native" and report.missing == [] and report.unexpected == []
        for key, tensor in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[key], tensor, msg=f"{name}: {key}")


def _write_pickled_tensor(path):
    torch.save(torch.zeros(3), path)


@pytest.mark.parametrize(
    "kind, write, needle",
    [
        (
            "random bytes",
            lambda p: p.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
            "is not a PyTorch file written by torch.save",
        ),
        ("empty", lambda p: p.write_bytes(b""), "is not a PyTorch file written by torch.save"),
        ("text", lambda p: p.write_text("hello, weights\n"), "is not a PyTorch file written by torch.save"),
        ("pickled tensor", _write_pickled_tensor, "holds a Tensor, not a state dict"),
        (
            "non-tensor entry",
            lambda p: torch.save({"cls_token": torch.zeros(1), "epoch": 3}, p),
            "entry 'epoch' holds a int, not a tensor",
        ),
        # load_state_dict took these silently: NaN weights, bool / integer ones cast to 0. / 1.
        (
            "NaN entry",
            lambda p: torch.save({"cls_token": torch.full((1, 1, 8), float("nan"))}, p),
            "'cls_token' holds NaN",
        ),
        ("bool entry", lambda p: torch.save({"cls_token": torch.ones(1, 1, 8) > 0}, p), "holds torch.bool values, not"),
        ("meta entry", lambda p: torch.save({"cls_token": torch.zeros(1, device="meta")}, p), "holds a meta tensor"),
        ("non-string key", lambda p: torch.save({3: torch.zeros(1)}, p), "key 3 is a int, not a name"),
        (  # one of the two was kept silently once 'module.' was stripped
            "wrapped and plain",
            lambda p: torch.save({"module.cls_token": torch.zeros(1, 1, 8), "cls_token": torch.ones(1, 1, 8)}, p),
            "holds both 'module.cls_token' and 'cls_token'",
        ),
    ],
)
def test_unusable_files_are_one_weights_error_naming_the_file(tmp_path, kind, write, needle):
    path = tmp_path / "weights.pth"
    write(path)
    model = build_model("vit_baseline", CLASSES, CAMERAS, stride=12, **TINY_VIT)
    with pytest.raises(WeightsError) as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and needle in message and str(path) in message, (kind, message)
    assert "\n" not in message


def test_missing_file_and_wrong_source_type():
    model = build_model("vit_baseline", CLASSES, CAMERAS, stride=12, **TINY_VIT)
    with pytest.raises(WeightsError, match="pretrained weights not found: nowhere.pth"):
        load_pretrained(model, "nowhere.pth")
    with pytest.raises(WeightsError, match="a .pth path or a state dict, got int"):
        load_pretrained(model, 3)


def test_partial_must_be_a_bool():
    model = build_model("vit_baseline", CLASSES, CAMERAS, stride=12, **TINY_VIT)
    with pytest.raises(WeightsError, match="^partial must be True or False, got 'no'$"):  # "no" read as true
        load_pretrained(model, {"cls_token": torch.zeros(1, 1, 8)}, partial="no")


def test_loading_nothing_is_an_error_even_when_partial():
    model = build_model("vit_baseline", CLASSES, CAMERAS, stride=12, **TINY_VIT)
    unrelated = {"encoder.layer.0.weight": torch.zeros(2, 2)}  # another model's state dict
    for partial in (False, True):
        with pytest.raises(WeightsError, match="no tensor fits ViTBaseline .*'encoder.layer.0.weight'"):
            load_pretrained(model, unrelated, partial=partial)


def test_partial_backbone_needs_partial_true():
    checkpoint = {k: v for k, v in timm_checkpoint().items() if not k.startswith("blocks.3.")}
    model = build_model("vit_baseline", CLASSES, CAMERAS, stride=12, **TINY_VIT)
    with pytest.raises(
        WeightsError,
        match=r"leaves 12 backbone tensors of ViTBaseline at their init .*"
        r"'backbone.blocks.3.norm1.weight'.*pretrained_partial",
    ):
        load_pretrained(model, checkpoint)
    report = load_pretrained(model, checkpoint, partial=True)
    assert "backbone.blocks.3.norm1.weight" in report.missing
    torch.testing.assert_close(model.backbone.blocks[2].mlp.fc1.weight, checkpoint["blocks.2.mlp.fc1.weight"])
    resnet = build_model("maskreid_resnet50", 4, layers=(1, 1, 1, 1), width=8)
    no_layer4 = {k: v for k, v in torchvision_resnet_checkpoint().items() if not k.startswith("layer4.")}
    with pytest.raises(WeightsError, match="backbone tensors of MaskReIDResNet50 .*'trunk.layer4"):
        load_pretrained(resnet, no_layer4)
