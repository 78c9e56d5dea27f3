"""DPM and the ViT baseline (spec dpm.md §1-§7): shapes, counts, inits, quirks, gradients, compile.

Most tests use a tiny width/depth at the real 256x128 input, so the patch grids are the real ones
(22x11 at stride 11, 21x10 at stride 12); the full ViT-B/16 is built on the meta device for
parameter counts and once for real for one shape check.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from dpm_ops.losses import DPMLoss, MaskedArcFaceLoss
from dpm_ops.models import DPM, ViTBaseline, ViTReID, build_model
from dpm_ops.models.factory import MODEL_NAMES
from dpm_ops.models.param_groups import sgd_param_groups

COMPILE_BACKEND = os.environ.get("DPM_OPS_COMPILE_BACKEND", "aot_eager")
TINY = dict(embed_dim=32, depth=4, num_heads=4, mask_tap_blocks=(0, 1, 2, 3))
NUM_CLASSES, NUM_CAMERAS = 6, 3
GRIDS = {11: (22, 11), 12: (21, 10)}


def tiny_dpm(stride=11, **options):
    torch.manual_seed(0)
    return build_model("dpm", NUM_CLASSES, NUM_CAMERAS, stride=stride, **{**TINY, **options})


def batch(size=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 256, 128, generator=generator)
    cams = torch.arange(size) % NUM_CAMERAS
    labels = torch.arange(size) // 2 % NUM_CLASSES  # pairs of identities, as a P x K batch
    return images, cams, labels


def capture_bn_feature(model):
    """Forward hook on the BNNeck: the BN feature the classifier sees."""
    captured = {}
    model.bottleneck.register_forward_hook(lambda module, args, out: captured.__setitem__("f_bn", out))
    return captured


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("stride", [11, 12])
def test_train_and_eval_shapes(stride):
    model = tiny_dpm(stride)
    num_y, num_x = GRIDS[stride]
    assert model.backbone.grid_size == (num_y, num_x)
    assert model.backbone.pos_embed.shape == (1, 1 + num_y * num_x, 32)
    images, cams, labels = batch(4)
    out = model(images, cam_label=cams, labels=labels)
    assert out.plain_logits.shape == (4, NUM_CLASSES)
    assert out.masked_logits.shape == (4, NUM_CLASSES)
    assert out.feature.shape == (4, 32)
    assert out.mask.shape == (4, 32)
    assert out.hem_logits.shape == (4, 4, num_y * num_x)
    model.eval()
    with torch.no_grad():
        eval_out = model(images[:1], cam_label=cams[:1])  # batch 1: the official squeeze() broke here
    assert len(eval_out) == 2
    assert eval_out.feature.shape == (1, 32) and eval_out.mask.shape == (1, 32)


def test_neck_feat_selects_the_eval_feature():
    """ "before" (official) returns the pre-BN CLS feature, "after" its BNNeck output; same mask."""
    images, cams, _ = batch(3)
    before = tiny_dpm(neck_feat="before").eval()
    after = tiny_dpm(neck_feat="after").eval()
    captured = capture_bn_feature(after)
    with torch.no_grad():
        out_before, out_after = before(images, cam_label=cams), after(images, cam_label=cams)
    torch.testing.assert_close(out_after.feature, captured["f_bn"])
    torch.testing.assert_close(after.bottleneck(out_before.feature), out_after.feature)
    torch.testing.assert_close(out_before.mask, out_after.mask)
    with pytest.raises(ValueError, match="neck_feat"):
        tiny_dpm(neck_feat="middle")


@pytest.mark.parametrize("stride", [11, 12])
def test_mask_generator_train_mode_batch_of_one(stride):
    """flatten(1), not squeeze(): a single image keeps its batch dimension in train mode too."""
    model = tiny_dpm(stride)
    images, cams, _ = batch(1)
    features = model.backbone.forward_features(images, cams, model.mask_tap_blocks)
    assert model.mask_generator(features.tapped_tokens).shape == (1, 32)


def test_full_vit_b16_eval_shape():
    torch.manual_seed(0)
    model = build_model("dpm", 702, 8).eval()
    with torch.no_grad():
        feature, mask = model(torch.randn(1, 3, 256, 128), cam_label=torch.tensor([7]))
    assert feature.shape == (1, 768) and mask.shape == (1, 768)
    assert torch.all(mask == 0.5)


# ---------------------------------------------------------------- parameter counts (spec §9)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "stride,cameras,classes,test_time,total",
    [
        (11, 8, 702, 144_832_512, 145_373_184),  # Occluded-Duke
        (12, 8, 702, 144_807_936, 145_348_608),  # DukeMTMC-reID
        (12, 6, 751, 144_806_400, 145_384_704),  # Market-1501 / Occluded-REID
    ],
)
def test_full_parameter_counts(stride, cameras, classes, test_time, total):
    with torch.device("meta"):
        model = build_model("dpm", classes, cameras, stride=stride)
    assert count(model.backbone) + count(model.mask_generator) == test_time
    assert count(model) == total
    assert count(model.mask_generator.conv_stack) == 58_401_792
    assert count(model.mask_generator.attfc) == 590_592
    assert count(model.bottleneck) == 1_536
    assert count(model.classifier) == classes * 768
    assert not any(p.shape[0] == 1000 for p in model.parameters())  # no dead 1000-way fc


def test_occluded_duke_backbone_components():
    with torch.device("meta"):
        model = build_model("dpm", 702, 8)
    backbone = model.backbone
    assert count(backbone) == 85_840_128
    assert count(backbone.patch_embed) == 590_592
    assert backbone.pos_embed.numel() == 186_624 and backbone.sie_embed.numel() == 6_144
    assert all(count(block) == 7_087_872 for block in backbone.blocks)


def test_vit_baseline_count_and_outputs():
    with torch.device("meta"):
        full = build_model("vit_baseline", 702, 8)
    assert count(full) == 85_840_128 + 1_536 + 702 * 768
    torch.manual_seed(0)
    model = build_model(
        "vit_baseline", NUM_CLASSES, NUM_CAMERAS, **{k: v for k, v in TINY.items() if k != "mask_tap_blocks"}
    )
    assert not hasattr(model, "mask_generator")
    images, cams, labels = batch(4)
    out = model(images, cam_label=cams, labels=labels)
    assert out.logits.shape == (4, NUM_CLASSES) and out.feature.shape == (4, 32)
    assert model.classifier.bias is None
    assert abs(model.classifier.weight.std().item() - 0.001) < 0.0005
    model.eval()
    with torch.no_grad():
        assert model(images[:1], cam_label=cams[:1]).shape == (1, 32)


# ---------------------------------------------------------------- inits (spec §1.2, §3, §5)


def test_initialisation_rules():
    model = tiny_dpm()
    backbone = model.backbone
    assert torch.all(model.mask_generator.attfc.weight == 0) and torch.all(model.mask_generator.attfc.bias == 0)
    # the conv stack keeps PyTorch's defaults: kaiming_uniform(a=√5) -> |w| <= 1/sqrt(fan_in), nonzero bias
    conv = model.mask_generator.conv_stack[0][0]
    assert conv.weight.abs().max() <= 1 / math.sqrt(conv.weight[0].numel())
    assert conv.bias.abs().sum() > 0
    bn = model.mask_generator.conv_stack[0][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    # classifier: xavier_uniform, no bias
    weight = model.classifier.weight
    bound = math.sqrt(6 / (NUM_CLASSES + 32))
    assert model.classifier.bias is None
    assert weight.abs().max() <= bound and weight.abs().max() > 0.8 * bound
    # BNNeck: weight 1, bias 0 and frozen
    assert torch.all(model.bottleneck.weight == 1) and torch.all(model.bottleneck.bias == 0)
    assert not model.bottleneck.bias.requires_grad and model.bottleneck.weight.requires_grad
    # ViT: trunc_normal(.02) Linear weights, zero biases, LN (1, 0) with eps 1e-6, qkv bias
    fc1 = backbone.blocks[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02) < 0.002 and torch.all(fc1.bias == 0)
    assert backbone.blocks[0].attn.qkv.bias is not None
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert torch.all(backbone.norm.weight == 1) and torch.all(backbone.norm.bias == 0)
    proj = backbone.patch_embed.proj
    assert proj.kernel_size == (16, 16) and proj.stride == (11, 11)
    assert abs(proj.weight.std().item() - math.sqrt(2 / (16 * 16 * 32))) < 0.001
    for token in (backbone.cls_token, backbone.pos_embed, backbone.sie_embed):
        assert token.abs().sum() > 0 and token.abs().max() < 0.2


def test_drop_path_rates_and_sie_coefficient():
    with torch.device("meta"):
        model = build_model("dpm", 702, 8)
    rates = [block.drop_path.drop_prob for block in model.backbone.blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])
    assert model.backbone.sie_coef == 3.0
    assert model.backbone.sie_embed.shape == (8, 1, 768)
    assert model.mask_tap_blocks == (1, 3, 9, 11)
    assert model.arcface_scale == 30.0 and model.arcface_margin == 0.5 and not model.easy_margin


def test_no_camera_embedding_for_one_camera_or_none():
    """TransReID builds the SIE only for more than one camera."""
    for cameras in (0, 1):
        with torch.device("meta"):
            model = build_model("dpm", 702, cameras)
        assert model.backbone.sie_embed is None
        assert count(model.backbone) == 85_840_128 - 6_144


def test_camera_embedding_is_added_to_every_token():
    model = tiny_dpm()
    images, _, _ = batch(1)
    backbone = model.backbone
    with torch.no_grad():
        delta = backbone.embed(images, torch.tensor([2])) - backbone.embed(images, torch.tensor([0]))
    expected = 3.0 * (backbone.sie_embed[2] - backbone.sie_embed[0])  # (1, C), CLS token included
    torch.testing.assert_close(delta, expected.expand_as(delta[0]).unsqueeze(0))
    with pytest.raises(ValueError, match=r"^this model has a camera embedding: pass cam_label \(0-based camera ids\)$"):
        model(torch.cat([images, images]))  # two: a train-mode batch


def test_camera_ids_that_do_not_fit_the_batch_or_the_model_are_refused():
    # An id outside [0, cameras) was an IndexError (on CUDA a device-side assert that ends the process),
    # -1 too (indexing took it for the last camera); one id for a batch of two was broadcast to both.
    model = tiny_dpm().eval()
    images, _, _ = batch(2)
    last = NUM_CAMERAS - 1
    for cam_label, message in (
        (torch.tensor([0, -1]), rf"cam_label must lie in \[0, {last}\] \(the model's {NUM_CAMERAS} cameras\), got -1"),
        (torch.tensor([NUM_CAMERAS, 0]), rf"cam_label must lie in \[0, {last}\].*, got {NUM_CAMERAS}"),
        (torch.tensor([0]), r"cam_label must have shape \(2,\), one camera id per image, got \(1,\)"),
        (torch.tensor([[0, 1]]), r"cam_label must have shape \(2,\), one camera id per image, got \(1, 2\)"),
        (
            torch.tensor([0.0, 1.0]),
            r"cam_label must be an int64 \(or int32\) tensor of 0-based camera ids, got torch.float32",
        ),
        (1, r"cam_label must be an int64 \(or int32\) tensor of 0-based camera ids, got int"),
        (torch.tensor([0, 1], device="meta"), r"cam_label must be on the images' device cpu, got meta"),
    ):
        with pytest.raises(ValueError, match=message):
            model(images, cam_label)
    model(images, torch.tensor([0, last], dtype=torch.int32))
    assert model(images[:0], torch.zeros(0, dtype=torch.long)).feature.shape == (0, TINY["embed_dim"])


def test_labels_that_do_not_fit_the_batch_or_the_classes_name_dpm_forward():
    """They were reported by the ArcFace logits that read them (arcface_logits: labels must ...)."""
    model = tiny_dpm(loss_inputs=False).train()
    images, cams, labels = batch(2)
    for bad, message in (
        (torch.tensor([0, NUM_CLASSES]), rf"labels must lie in \[0, K = {NUM_CLASSES}\)"),
        (torch.tensor([0.0, 1.0]), "labels must be int64, got torch.float32"),
        (torch.tensor([0]), r"labels must be 1-D of length B = 2, got \(1,\)"),
        ([0, 1], "labels must be a torch.Tensor, got list"),
    ):
        with pytest.raises(ValueError, match=rf"^DPM.forward: {message}"):
            model(images, cams, bad)
    assert model(images, cams, labels).masked_logits.shape == (2, NUM_CLASSES)


def test_images_that_are_no_batch_of_rgb_pixels_are_refused():
    model = tiny_dpm().eval()
    images, cams, _ = batch(2)
    for bad, message in (
        (images[0], r"images must have shape \(B, 3, H, W\) \(a batch of RGB images\), got \(3, 256, 128\)"),
        (images[:, :1], r"images must have shape \(B, 3, H, W\).*, got \(2, 1, 256, 128\)"),
        (images.to(torch.uint8), r"images must be floating-point \(normalised pixels.*, got torch.uint8"),
        (images[..., :64], r"images: expected images of size \(256, 128\), got \(256, 64\)"),
        (images.numpy(), r"images must be a torch.Tensor of shape \(B, 3, H, W\), got ndarray"),
        (images.double(), r"images must be torch.float32 \(the model's dtype\) outside autocast, got torch.float64"),
    ):
        with pytest.raises(ValueError, match=message):
            model(bad, cams)


@pytest.mark.parametrize("name", ["dpm", "vit_baseline"])
def test_non_finite_images_are_refused_before_any_statistic_moves(name):
    """A NaN pixel in train mode was refused by the mask pooling after three BatchNorm layers had taken it
    into their running statistics (every later call failed, clean images too); the ViT baseline took it
    silently (NaN logits, a NaN BNNeck)."""
    options = {k: v for k, v in TINY.items() if name == "dpm" or k != "mask_tap_blocks"}
    model = build_model(name, NUM_CLASSES, NUM_CAMERAS, **options).train()
    images, cams, labels = batch(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^images contains non-finite values \(NaN or inf\)$"):
        model(images, cams, labels) if name == "dpm" else model(images, cams)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["dpm", "vit_baseline", "maskreid"])
def test_images_far_past_normalised_pixels_are_refused_before_any_statistic_moves(name):
    """Finite images of 1e20 overflowed the LayerNorm / BatchNorm statistics: DPM failed in its mask pooling
    after its BatchNorms had taken NaN statistics (every later eval call failed, on clean images too), the ViT
    baseline returned NaN features without an error."""
    if name == "maskreid":
        model, what = build_model(name, NUM_CLASSES, stem_channels=4, base_width=8, embed_dim=16).train(), "raw"
        raw = torch.randn(4, 3, 144, 56)
        call = lambda scale: model(raw * scale, raw * scale)  # noqa: E731
    else:
        options = {k: v for k, v in TINY.items() if name == "dpm" or k != "mask_tap_blocks"}
        model = build_model(name, NUM_CLASSES, NUM_CAMERAS, **options).train()
        (images, cams, _), what = batch(4), "images"
        call = lambda scale: model(images * scale, cams)  # noqa: E731
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=rf"{what} holds values up to .*e\+20: expected normalised pixels, \|value\| <= 1e\+06"
    ):
        call(1e20)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    call(255.0)  # raw 0-255 pixels are taken


def test_options_that_overflow_float32_are_refused():
    """sie_coef = 1e39 gave NaN features (the ViT baseline) or NaN BatchNorm statistics (DPM), arcface_scale = 1e39
    infinite logits and a NaN loss."""
    options = {k: v for k, v in TINY.items() if k != "mask_tap_blocks"}
    with pytest.raises(ValueError, match=r"^vit_baseline: sie_coef must be a finite number in \[0, 1e\+06\]"):
        build_model("vit_baseline", NUM_CLASSES, NUM_CAMERAS, sie_coef=1e39, **options)
    with pytest.raises(ValueError, match=r"^dpm: arcface_scale must be a finite number in \(0, 1e\+06\], got 1e\+39"):
        build_model("dpm", NUM_CLASSES, NUM_CAMERAS, arcface_scale=1e39, **TINY)


def test_forward_features_options():
    """An iterator of tap_blocks was used up by the range check: no tapped tokens, silently; a tensor, a string
    or an int were raw KeyError / TypeErrors; return_cls_logits="no" read as true."""
    vit = ViTReID(**{k: v for k, v in TINY.items() if k != "mask_tap_blocks"}).eval()
    images = batch(2)[0]
    for bad in (iter([0, 1]), torch.tensor([0]), "01", 0):
        with pytest.raises(ValueError, match="tap_blocks must be a list or tuple of block indices"):
            vit.forward_features(images, tap_blocks=bad)
    with pytest.raises(ValueError, match=r"tap_blocks must be a non-empty list of integers in \[0, 3\], got \[0, 5\]"):
        vit.forward_features(images, tap_blocks=[0, 5])
    with pytest.raises(ValueError, match="return_cls_logits must be True or False, got 'no'"):
        vit.forward_features(images, return_cls_logits="no")
    assert len(vit.forward_features(images, tap_blocks=[0, 1]).tapped_tokens) == 2


def test_meta_and_autocast_images():
    """A meta forward of a model with cameras failed reading the camera ids' values (NotImplementedError); under
    autocast, float64 images reached the convolution (RuntimeError: Input type (double) and bias type ...)."""
    model = build_model(
        "vit_baseline", NUM_CLASSES, NUM_CAMERAS, **{k: v for k, v in TINY.items() if k != "mask_tap_blocks"}
    )
    images, cams, _ = batch(2)
    meta = model.to("meta").eval()(images.to("meta"), cams.to("meta"))
    assert meta.is_meta and meta.shape == (2, TINY["embed_dim"])
    model = model.to_empty(device="cpu").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(
            ValueError, match="images must be torch.float32 .* or float32: autocast leaves float64 as is"
        ):
            model(images.double(), cams)
        assert model(images, cams).shape == (2, TINY["embed_dim"])


# ---------------------------------------------------------------- attention, HEM logits, mask taps


def explicit_attention(attn, x):
    """softmax(q kᵀ · scale) v, the official explicit attention; also returns the full logits."""
    batch_size, tokens, dim = x.shape
    qkv = attn.qkv(x).reshape(batch_size, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1) * (dim // attn.num_heads) ** -0.5
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch_size, tokens, dim)
    return attn.proj(out), logits


def test_sdpa_attention_and_hem_logits_match_explicit_attention():
    model = tiny_dpm().eval()
    images, cams, _ = batch(2)
    backbone = model.backbone
    with torch.no_grad():
        features = backbone.forward_features(images, cams, return_cls_logits=True)
        x = backbone.embed(images, cams)
        for block in backbone.blocks:
            attn_out, logits = explicit_attention(block.attn, block.norm1(x))
            x = x + attn_out
            x = x + block.mlp(block.norm2(x))
    torch.testing.assert_close(features.cls_feature, backbone.norm(x)[:, 0], atol=1e-5, rtol=1e-5)
    # last block, CLS query row, patch keys only, pre-softmax and already scaled
    torch.testing.assert_close(features.cls_logits, logits[:, :, 0, 1:], atol=1e-5, rtol=1e-5)


def test_mask_generator_reads_pre_ln_tokens_row_major():
    model = tiny_dpm(12).eval()
    torch.nn.init.normal_(model.mask_generator.attfc.weight, std=0.5)
    images, cams, _ = batch(2)
    backbone, generator = model.backbone, model.mask_generator
    num_y, num_x = GRIDS[12]
    with torch.no_grad():
        x = backbone.embed(images, cams)
        grids = []
        for block in backbone.blocks:
            x = x + explicit_attention(block.attn, block.norm1(x))[0]
            x = x + block.mlp(block.norm2(x))
            # token n sits at (n // num_x, n % num_x)
            grids.append(x[:, 1:].reshape(2, num_y, num_x, -1).permute(0, 3, 1, 2))
        z = torch.cat(grids, 1)  # tap order: blocks 0, 1, 2, 3
        stack = generator.conv_stack
        z = F.max_pool2d(stack[0](z), 2)  # 21x10 -> 10x5
        z = F.max_pool2d(stack[2](z), 2)  # -> 5x2
        expected = torch.sigmoid(generator.attfc(stack[4](z).amax((2, 3))))
        _, mask = model(images, cam_label=cams)
    torch.testing.assert_close(mask, expected, atol=1e-5, rtol=1e-5)
    assert (mask - 0.5).abs().max() > 1e-3  # the check above is not trivially 0.5 == 0.5


# ---------------------------------------------------------------- classifier: shared weight, zero-init mask


def test_zero_init_mask_makes_masked_cosine_the_plain_cosine():
    model = tiny_dpm()
    captured = capture_bn_feature(model)
    images, cams, labels = batch(4)
    out = model(images, cam_label=cams)  # no labels: masked_logits = s · cos, no margin
    assert torch.all(out.mask == 0.5)
    f_bn, weight = captured["f_bn"], model.classifier.weight
    plain_cosine = F.normalize(f_bn, dim=1) @ F.normalize(weight, dim=1).t()
    torch.testing.assert_close(out.masked_logits, 30.0 * plain_cosine, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.plain_logits, f_bn @ weight.t())  # same W, unnormalised, no bias


def test_arcface_margin_only_on_target_logit():
    model = tiny_dpm()
    torch.nn.init.normal_(model.mask_generator.attfc.weight, std=0.5)
    images, cams, labels = batch(4)
    torch.manual_seed(5)
    without = model(images, cam_label=cams)
    torch.manual_seed(5)  # same drop-path draws
    with_margin = model(images, cam_label=cams, labels=labels)
    target = F.one_hot(labels, NUM_CLASSES).bool()
    torch.testing.assert_close(with_margin.masked_logits[~target], without.masked_logits[~target])
    cos = (without.masked_logits[target] / 30.0).double()
    expected = 30.0 * torch.cos(torch.arccos(cos) + 0.5)  # all targets here have θ < π − m
    assert torch.all(cos > math.cos(math.pi - 0.5))
    torch.testing.assert_close(with_margin.masked_logits[target].double(), expected, atol=1e-4, rtol=1e-5)


def test_model_logits_agree_with_masked_arcface_loss():
    model = tiny_dpm()
    torch.nn.init.normal_(model.mask_generator.attfc.weight, std=0.5)
    captured = capture_bn_feature(model)
    images, cams, labels = batch(4)
    out = model(images, cam_label=cams, labels=labels)
    from_logits = 0.5 * F.cross_entropy(out.plain_logits, labels) + 0.5 * F.cross_entropy(out.masked_logits, labels)
    from_features = MaskedArcFaceLoss()(captured["f_bn"], out.mask, model.classifier.weight, labels)
    torch.testing.assert_close(from_logits, from_features)


def test_bf16_autocast_train_step_keeps_the_classifier_math_in_fp32():
    model = tiny_dpm()
    torch.nn.init.normal_(model.mask_generator.attfc.weight, std=0.02)
    images, cams, labels = batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, cam_label=cams, labels=labels)
        loss = DPMLoss()(out, labels)
    assert out.plain_logits.dtype == torch.bfloat16 and out.masked_logits.dtype == torch.float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- the two optimisers (spec §7.1)


def parameter_snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(model, before):
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


def test_param_groups_follow_spec():
    model = tiny_dpm()
    groups = model.optimizer_param_groups()
    mask_ids = {id(p) for p in model.mask_generator.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    main_ids = {id(p) for g in groups.main for p in g["params"]}
    mask_group_ids = {id(p) for g in groups.mask_generator for p in g["params"]}
    assert mask_group_ids == mask_ids  # conv stack + attfc, BN affine parameters included
    assert main_ids == trainable - mask_ids
    assert id(model.bottleneck.bias) not in main_ids | mask_group_ids  # frozen
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups.main + groups.mask_generator:
        assert group["weight_decay"] == 1e-4  # biases, norms, tokens and SIE included
        is_bias = group["name"] == "biases"
        assert group["lr"] == pytest.approx(0.016 if is_bias else 0.008)
        assert all(names[id(p)].endswith(".bias") == is_bias for p in group["params"])
    # the official make_optimizer decays the mask generator's weights by WEIGHT_DECAY_BIAS too
    split = model.optimizer_param_groups(weight_decay=1e-4, weight_decay_bias=0.0)
    assert [g["weight_decay"] for g in split.main] == [1e-4, 0.0]
    assert [g["weight_decay"] for g in split.mask_generator] == [0.0, 0.0]
    with torch.device("meta"):
        full = build_model("dpm", 702, 8)
    full_groups = full.optimizer_param_groups()
    assert sum(p.numel() for g in full_groups.main for p in g["params"]) == 145_373_184 - 768 - 58_992_384
    assert sum(p.numel() for g in full_groups.mask_generator for p in g["params"]) == 58_992_384


@pytest.mark.parametrize("loss_inputs", [False, True])
def test_train_feature_is_the_pre_bn_cls_feature(loss_inputs):
    model = tiny_dpm(drop_path_rate=0.0, loss_inputs=loss_inputs)  # no random draws: one forward = another
    images, cams, labels = batch(4)
    out = model(images, cam_label=cams, labels=labels)
    torch.testing.assert_close(out.feature, model.backbone(images, cams))  # the triplet loss's input


def test_sgd_param_groups_split_on_the_last_name_and_take_the_bias_decay():
    named = [(name, torch.nn.Parameter(torch.zeros(1))) for name in ("bias_proj.weight", "head.bias", "pos_bias")]
    weights, biases = sgd_param_groups(named, base_lr=0.01, weight_decay=1e-4, weight_decay_bias=0.0)
    assert [id(p) for p in weights["params"]] == [id(named[0][1]), id(named[2][1])]  # only ".bias" is a bias
    assert [id(p) for p in biases["params"]] == [id(named[1][1])]
    assert (weights["weight_decay"], biases["weight_decay"]) == (1e-4, 0.0)
    assert (weights["lr"], biases["lr"]) == pytest.approx((0.01, 0.02))


def test_two_pass_training_gradients_and_steps():
    model = tiny_dpm()
    criterion = DPMLoss()
    images, cams, labels = batch(4)
    mask_names = {f"mask_generator.{n}" for n, _ in model.mask_generator.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    # With the zero-initialised attfc, nothing flows back through it at the first step.
    out = model(images, cam_label=cams, labels=labels)
    criterion(out, labels).backward()
    conv_grads = [p.grad for p in model.mask_generator.conv_stack.parameters()]
    assert all(g is not None and torch.all(g == 0) for g in conv_grads)
    assert model.mask_generator.attfc.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)

    torch.nn.init.normal_(model.mask_generator.attfc.weight, std=0.02)  # a trained attfc
    groups = model.optimizer_param_groups()
    optimizer = torch.optim.SGD(groups.main, momentum=0.9)
    mask_optimizer = torch.optim.SGD(groups.mask_generator, momentum=0.9)

    # Pass 1: the loss reaches backbone, classifier, BNNeck weight and mask generator...
    optimizer.zero_grad()
    out = model(images, cam_label=cams, labels=labels)
    # ... the mask itself carries gradient into the backbone (taps are pre-LN block outputs) ...
    (mask_grad,) = torch.autograd.grad(out.mask.sum(), model.backbone.blocks[0].mlp.fc2.weight, retain_graph=True)
    assert mask_grad.abs().sum() > 0
    criterion(out, labels).backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    assert reached == trainable
    # Only the conv biases feeding a train-mode BN may see a zero gradient (BN removes the mean).
    zero = {n for n in reached if model.get_parameter(n).grad.abs().sum() == 0}
    assert zero <= {f"mask_generator.conv_stack.{i}.0.bias" for i in (0, 2, 4)}
    # ... but only the first optimizer steps.
    before = parameter_snapshot(model)
    optimizer.step()
    assert changed(model, before) == trainable - mask_names

    # Pass 2: a fresh forward with the updated backbone; only the mask generator steps.
    mask_optimizer.zero_grad()
    out = model(images, cam_label=cams, labels=labels)
    criterion(out, labels).backward()
    before = parameter_snapshot(model)
    mask_optimizer.step()
    assert changed(model, before) == mask_names


# ---------------------------------------------------------------- build_model, errors, compile


def test_build_model_names_and_errors():
    assert isinstance(tiny_dpm(), DPM)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transreid", 10)
    with pytest.raises(ValueError, match="mask_tap_blocks"):
        build_model("dpm", 10, 2, embed_dim=32, depth=4, num_heads=4)  # default taps need 12 blocks
    with pytest.raises(ValueError, match="image"):
        tiny_dpm()(torch.randn(2, 3, 128, 64), cam_label=torch.tensor([0, 1]))
    assert isinstance(build_model("vit_baseline", 10, 2, embed_dim=32, depth=1, num_heads=4), ViTBaseline)
    for name in MODEL_NAMES:  # Python's TypeError before, on some models only after allocating
        with pytest.raises(ValueError, match=r"takes no option 'bogus'; its options: .*embed_dim"):
            build_model(name, 10, 2, bogus=1)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(train):
    torch._dynamo.reset()
    model = tiny_dpm(drop_path_rate=0.0)
    torch.nn.init.normal_(model.mask_generator.attfc.weight, std=0.02)
    model.train(train)
    compiled = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)
    images, cams, labels = batch(4)
    expected = model(images, cam_label=cams, labels=labels)
    actual = compiled(images, cam_label=cams, labels=labels)
    assert type(actual) is type(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    if train:
        DPMLoss()(actual, labels).backward()
        assert model.mask_generator.attfc.weight.grad.abs().sum() > 0
        assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- constructor options

# Out-of-range options of the ViT backbone (DPM and the ViT baseline): each was a traceback (after
# the data loaded, some mid-training) or silently trained nonsense before the constructors checked.
BAD_VIT_OPTIONS = [
    ("depth", -1),
    ("depth", 0),
    ("depth", True),  # a flag is no count
    ("embed_dim", 32.0),  # an integer option takes integers only
    ("num_heads", 0),  # ZeroDivisionError
    ("num_heads", -2),  # RuntimeError at the first step
    ("num_heads", 5),  # does not divide embed_dim = 32
    ("stride", 0),
    ("stride", 17),  # > patch_size: pixels between patches never seen
    ("patch_size", 0),
    ("embed_dim", 0),
    ("drop_path_rate", 5.0),  # bernoulli's RuntimeError mid-training
    ("drop_path_rate", -0.5),
    ("drop_path_rate", 1.0),  # keep rate 0: a division by zero
    ("in_chans", 1),  # the images are RGB
    ("norm_eps", -1.0),  # NaN
    ("norm_eps", 0.0),
    ("mlp_ratio", 0.0),  # an MLP without hidden units
    ("mlp_ratio", -1.0),
    ("img_size", (8, 128)),  # shorter than a patch
    ("img_size", (256,)),
    ("sie_coef", -1.0),
    ("sie_coef", math.nan),
    ("qkv_bias", "yes"),
]
BAD_DPM_OPTIONS = [
    ("mask_tap_blocks", ()),  # torch.cat of nothing
    ("mask_tap_blocks", (0, 0)),
    ("mask_tap_blocks", (0, 4)),  # depth 4: blocks 0..3
    ("mask_tap_blocks", (-1,)),
    ("mask_tap_blocks", (0, True)),
    ("arcface_margin", 10.0),
    ("arcface_margin", -3.0),
    ("arcface_margin", math.pi / 2),  # cos(theta + m) <= 0 for every angle: no target can win
    ("arcface_scale", -1.0),
    ("arcface_scale", 0.0),
    ("easy_margin", 1),
    ("loss_inputs", None),
    ("neck_feat", "middle"),
]
VIT_OPTIONS = {k: v for k, v in TINY.items() if k != "mask_tap_blocks"}


@pytest.mark.parametrize(
    "model_name,option,value",
    [("dpm", *case) for case in BAD_VIT_OPTIONS + BAD_DPM_OPTIONS]
    + [("vit_baseline", *case) for case in BAD_VIT_OPTIONS],
)
def test_out_of_range_options_are_refused_by_name(model_name, option, value):
    options = TINY if model_name == "dpm" else VIT_OPTIONS
    with pytest.raises(ValueError, match=rf"^{model_name}: {option} must be "):
        build_model(model_name, NUM_CLASSES, NUM_CAMERAS, **{**options, option: value})


@pytest.mark.parametrize("model_name", ["dpm", "vit_baseline"])
def test_out_of_range_class_and_camera_counts_are_refused(model_name):
    options = TINY if model_name == "dpm" else VIT_OPTIONS
    with pytest.raises(ValueError, match=rf"^{model_name}: num_classes must be an integer >= 1"):
        build_model(model_name, 0, NUM_CAMERAS, **options)
    with pytest.raises(ValueError, match=rf"^{model_name}: num_cameras must be an integer >= 0"):
        build_model(model_name, NUM_CLASSES, -1, **options)


def test_dpm_refuses_a_patch_grid_too_small_for_the_mask_generator():
    with pytest.raises(ValueError, match=r"^dpm: img_size \(48, 128\) .* 3x8 patch grid; .* at least 4x4"):
        tiny_dpm(stride=16, img_size=(48, 128))


def test_options_are_checked_before_anything_is_built(monkeypatch):
    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *args, **kwargs: built.append(type(self)))
    for name in ("dpm", "vit_baseline"):
        with pytest.raises(ValueError, match="num_heads"):
            build_model(name, NUM_CLASSES, NUM_CAMERAS, **{**VIT_OPTIONS, "num_heads": 0})
    assert built == []


def test_edge_values_inside_the_ranges_build():
    model = tiny_dpm(
        stride=16, arcface_margin=0.0, drop_path_rate=0.0, sie_coef=0.0, mask_tap_blocks=[3, 0], mlp_ratio=1 / 32
    )
    assert model.mask_tap_blocks == (3, 0) and len(model.backbone.blocks[0].mlp.fc1.weight) == 1
    assert build_model("dpm", 1, 0, **{**TINY, "depth": 1, "mask_tap_blocks": (0,)}).backbone.sie_embed is None


def test_defaults_and_shipped_configurations_build():
    """Every built-in config's model options (the paper's recipes and the synthetic ones), at its
    input size as the engine passes it, and each class's defaults: on the meta device, no memory."""
    from dpm_ops.engine.config import available_configs, load_config

    shipped = [load_config(name) for name in available_configs()]
    shipped = [(c["model"]["name"], {"img_size": c["input"]["size"], **c["model"]["options"]}) for c in shipped]
    shipped = [(name, options) for name, options in shipped if name in ("dpm", "vit_baseline")]
    assert {name for name, _ in shipped} == {"dpm", "vit_baseline"}
    with torch.device("meta"):
        for name, options in [("dpm", {}), ("vit_baseline", {})] + shipped:
            assert build_model(name, 702, 8, **options).backbone.grid_size[0] > 0


def test_engine_reports_a_bad_option_as_one_config_line():
    from dpm_ops.engine.builders import build_model_from_args
    from dpm_ops.engine.config import ConfigError

    args = {"num_classes": NUM_CLASSES, "num_cameras": NUM_CAMERAS, "options": {**TINY, "stride": 0}}
    with pytest.raises(ConfigError, match=r"^config key model.options: dpm: stride must be an integer in \[1, 16\]"):
        build_model_from_args("dpm", args)
    with pytest.raises(ConfigError, match=r"^checkpoint run/final.pt: model_args: dpm: stride must be") as info:
        build_model_from_args("dpm", args, source="checkpoint run/final.pt: model_args")
    assert "\n" not in str(info.value)


def test_a_model_too_large_for_memory_is_one_config_line(monkeypatch):
    """Options each in range whose product does not fit (depth 10^12) failed in the allocator with a traceback."""
    from dpm_ops.engine.builders import build_model_from_args
    from dpm_ops.engine.config import ConfigError
    from dpm_ops.engine.recipes import get_recipe

    def allocator_refuses(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 TiB\nmore advice")

    monkeypatch.setattr(type(get_recipe("dpm")), "build", allocator_refuses)
    args = {"num_classes": NUM_CLASSES, "num_cameras": NUM_CAMERAS, "options": {**TINY, "depth": 10**12}}
    with pytest.raises(
        ConfigError,
        match=r"^config key model.options: model dpm of these options does not fit in "
        r"memory \(CUDA out of memory. Tried to allocate 3.50 TiB\)$",
    ):
        build_model_from_args("dpm", args)


# Sizes past which a model took minutes to build or got the process OOM-killed (depth 10^9 built blocks until
# it was), refused by the option checks before anything is built: nn.Module.__init__ is stubbed, so a check
# that let one through fails at once instead of allocating.
HUGE_VIT_OPTIONS = [
    (dict(depth=10**9), r"depth must be an integer in \[1, 64\], got 1000000000$"),
    (dict(depth=65), r"depth must be an integer in \[1, 64\]"),
    (dict(embed_dim=16385), r"embed_dim must be an integer in \[1, 16384\]"),
    (dict(mlp_ratio=65.0), r"mlp_ratio must be a finite number in \[0.03125, 64\]"),
    (dict(img_size=(4097, 128)), r"img_size must be 2 integers in \[16, 4096\]"),
    (dict(patch_size=4097), r"patch_size must be an integer in \[1, 4096\]"),
    (dict(stride=1), r"img_size \(256, 128\) at patch_size 16, stride 1 gives 241x113 = 27233 patches; at most 16384"),
    (
        dict(embed_dim=4096, depth=24, num_heads=16),
        r"embed_dim = 4096, depth = 24, mlp_ratio = 4, patch_size = 16, 22x11 patches and 3 cameras: about 4.84e\+09 "
        r"weights, "
        r"more than the 2e\+09 a model may have$",
    ),
    (
        dict(embed_dim=768, num_heads=12, patch_size=4096, stride=4096, img_size=(4096, 4096)),
        r"embed_dim = 768, depth = 4, mlp_ratio = 4, patch_size = 4096, 1x1 patches and 3 cameras: about 3.87e\+10",
    ),
]


@pytest.mark.parametrize("model_name", ["dpm", "vit_baseline"])
@pytest.mark.parametrize("options, message", HUGE_VIT_OPTIONS)
def test_sizes_past_the_bounds_are_refused_before_anything_is_built(monkeypatch, model_name, options, message):
    from dpm_ops.engine.builders import build_model_from_args
    from dpm_ops.engine.config import ConfigError

    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *args, **kwargs: built.append(type(self)))
    options = {**(TINY if model_name == "dpm" else VIT_OPTIONS), **options}
    with pytest.raises(ValueError, match=rf"^{model_name}: {message}"):
        build_model(model_name, NUM_CLASSES, NUM_CAMERAS, **options)
    args = {"num_classes": NUM_CLASSES, "num_cameras": NUM_CAMERAS, "options": options}  # a checkpoint's model_args
    with pytest.raises(ConfigError, match=rf"^checkpoint run/final.pt: model_args: {model_name}: {message}"):
        build_model_from_args(model_name, args, source="checkpoint run/final.pt: model_args")
    assert built == []


@pytest.mark.parametrize("model_name", ["dpm", "vit_baseline", "maskreid"])
def test_a_classifier_or_camera_embedding_past_the_bound_is_refused_before_anything_is_built(monkeypatch, model_name):
    """10^8 classes or cameras allocated (and zeroed) 12.8 GB before anything said no."""
    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *args, **kwargs: built.append(type(self)))
    options = {"dpm": TINY, "vit_baseline": VIT_OPTIONS, "maskreid": {}}[model_name]
    with pytest.raises(
        ValueError, match=rf"^{model_name}: a classifier of num_classes = 1000000000 at width \d+: about"
    ):
        build_model(model_name, 10**9, 0, **options)
    if model_name != "maskreid":  # a CNN: no camera embedding
        with pytest.raises(ValueError, match=rf"^{model_name}: embed_dim = .* and 100000000 cameras: about 3.2e\+09"):
            build_model(model_name, NUM_CLASSES, 10**8, **options)
    assert built == []


def test_the_largest_vits_are_within_the_bounds():
    from dpm_ops.models.vit import checked_vit_options

    checked_vit_options("vit", embed_dim=1664, depth=48, num_heads=16, mlp_ratio=64 / 13)  # ViT-G/14: 1.8 B weights
    checked_vit_options("vit", img_size=(4096, 4096), patch_size=32, stride=32, depth=64)  # 128 x 128 patches


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_dpm_recipe_weighs_its_summed_hem_term_by_the_processes(monkeypatch, world_size):
    """HEM is summed over the batch and DDP averages the ranks' gradients: on two processes each rank's half
    weighed half as much as in one process of the whole batch (the mean-reduced terms were unchanged)."""
    from dpm_ops.engine import distributed, load_config
    from dpm_ops.engine.recipes import dpm as dpm_recipe
    from dpm_ops.engine.recipes import get_recipe

    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(world_size=world_size))
    made = []
    monkeypatch.setattr(
        dpm_recipe, "DPMLoss", lambda *weights, **options: made.append(DPMLoss(*weights, **options)) or made[-1]
    )
    config = load_config("synthetic_dpm")
    get_recipe("dpm").build_stages(tiny_dpm(), config, {"pk": 4})
    (criterion,) = made
    assert criterion.hem_weight == pytest.approx(config["loss"]["hem_weight"] * world_size)
    assert (criterion.id_weight, criterion.triplet_weight) == (
        config["loss"]["id_weight"],
        config["loss"]["triplet_weight"],
    )
