"""MaskReID (spec maskreid.md §3) and its ResNet-50 variant (§10 row 8)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from dpm_ops.models import MaskReID, MaskReIDResNet50, build_model

COMPILE_BACKEND = os.environ.get("DPM_OPS_COMPILE_BACKEND", "aot_eager")
TINY = dict(stem_channels=4, base_width=4)


def pair(size=2, height=144, width=56, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(size, 3, height, width, generator=generator),
        torch.randn(size, 3, height, width, generator=generator),
    )


def conv_bn_params(kernel, in_channels, out_channels):
    return kernel * kernel * in_channels * out_channels + out_channels + 2 * out_channels  # + bias + BN


def test_full_network_level_shapes_and_parameter_count():
    torch.manual_seed(0)
    model = build_model("maskreid", 0).eval()
    raw, masked = pair(2)
    with torch.no_grad():
        low, middle, high = model.levels(raw, masked)
        embedding = model(raw, masked)
    assert low.shape == (2, 384, 36, 14)
    assert middle.shape == (2, 768, 18, 7)
    assert high.shape == (2, 1536, 9, 4)
    assert embedding.shape == (2, 256)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(2))

    # Independent count from the spec's layer table: two 3-conv stems (32 ch), modules A and B.
    def module_a(c_in, c):
        return 4 * conv_bn_params(1, c_in, c) + 3 * conv_bn_params(3, c, c)

    def module_b(c_in, c):
        return 2 * conv_bn_params(1, c_in, c) + 3 * conv_bn_params(3, c, c)

    stem = conv_bn_params(3, 3, 32) + 2 * conv_bn_params(3, 32, 32)
    trunk = (
        module_a(64, 64)
        + module_b(256, 64)
        + module_a(384, 128)
        + module_b(512, 128)
        + module_a(768, 256)
        + module_b(1024, 256)
    )
    head = (384 + 768 + 1536) * 256 + 256 + 2 * 256  # FC 2688 -> 256, BN1d
    assert sum(p.numel() for p in model.parameters()) == 2 * stem + trunk + head == 7_076_608


def test_eval_descriptor_batch_of_one_and_train_outputs():
    torch.manual_seed(0)
    model = build_model("maskreid", 5, **TINY)
    raw, masked = pair(2)
    out = model(raw, masked)
    assert out.embedding.shape == (2, 256) and out.logits.shape == (2, 5)
    headless = build_model("maskreid", 0, **TINY)
    assert headless(raw, masked).logits is None
    model.eval()
    with torch.no_grad():
        single = model(raw[:1], masked[:1])
    assert single.shape == (1, 256)
    torch.testing.assert_close(single.norm(dim=1), torch.ones(1))
    with pytest.raises(ValueError, match="differ in shape"):
        model(raw, masked[:1])
    with pytest.raises(ValueError, match=r"^raw must have shape \(B, 3, H, W\) \(a batch of RGB images\), got \(3,"):
        model(raw[0], masked[0])
    with pytest.raises(ValueError, match=r"^masked must be floating-point \(normalised pixels.*, got torch.uint8"):
        model(raw, masked.to(torch.uint8))
    with pytest.raises(ValueError, match=r"^raw must be torch.float32 \(the model's dtype\) outside autocast"):
        model(raw.double(), masked.double())  # torch's error named neither argument nor dtype
    for size in ((1, 1), (1, 8), (8, 1)):  # a torch RuntimeError in the stem's pooling before
        with pytest.raises(ValueError, match=r"^raw and masked images must be at least 2 x 2 pixels, got \("):
            model(torch.rand(2, 3, *size), torch.rand(2, 3, *size))
    assert model(torch.rand(2, 3, 2, 2), torch.rand(2, 3, 2, 2)).shape == (2, 256)


def test_fusion_head_matches_hand_computation():
    torch.manual_seed(0)
    model = build_model("maskreid", 5, **TINY)
    raw, masked = pair(4)
    model(raw, masked)  # move the BN running statistics away from (0, 1)
    model.eval()
    head = model.head
    with torch.no_grad():
        levels = model.levels(raw, masked)
        z = torch.cat([level.mean((2, 3)) for level in levels], 1)
        f = (z @ head.fc.weight.t() + head.fc.bias - head.bn.running_mean) / torch.sqrt(
            head.bn.running_var + head.bn.eps
        ) * head.bn.weight + head.bn.bias
        expected = f / f.norm(dim=1, keepdim=True)
        torch.testing.assert_close(model(raw, masked), expected, atol=1e-5, rtol=1e-5)
    assert z.shape[1] == 6 * 4 + 12 * 4 + 24 * 4  # low 6w, middle 12w, high 24w channels


@pytest.mark.parametrize(
    "options,fused_dim",
    [
        (dict(skip="avg"), 168),
        (dict(skip="max"), 168),
        (dict(skip="conv_avg"), 168),
        (dict(level_norm="l2"), 168),
        (dict(level_norm="bn"), 168),
        (dict(fuse_levels=False), 96),  # MaskReID-M: the high level only
    ],
)
def test_skip_fusion_options(options, fused_dim):
    torch.manual_seed(0)
    model = build_model("maskreid", 3, **TINY, **options)
    assert model.head.fc.in_features == fused_dim
    raw, masked = pair(2)
    out = model(raw, masked)
    assert out.embedding.shape == (2, 256)
    # (a plain logits.sum() would be a per-sample constant gradient, which train-mode BN zeroes)
    F.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
    assert model.raw_stem[0][0].weight.grad.abs().sum() > 1e-6


def test_skip_operator_changes_the_pooling():
    torch.manual_seed(0)
    avg = build_model("maskreid", 0, **TINY).eval()
    torch.manual_seed(0)
    gmp = build_model("maskreid", 0, skip="max", **TINY).eval()
    raw, masked = pair(2)
    with torch.no_grad():
        levels = avg.levels(raw, masked)
        torch.testing.assert_close(gmp.head.pool_levels(levels), torch.cat([lv.amax((2, 3)) for lv in levels], 1))
        assert not torch.allclose(avg(raw, masked), gmp(raw, masked))
    with pytest.raises(ValueError, match="skip"):
        build_model("maskreid", 0, skip="attention")
    # maskreid.md: "1x1-conv -> GAP" on every skipped level (not the highest)
    torch.manual_seed(0)
    conv_avg = build_model("maskreid", 0, skip="conv_avg", **TINY).eval()
    assert [block[0].kernel_size for block in conv_avg.head.skip_convs] == [(1, 1), (1, 1)]
    with torch.no_grad():
        levels = conv_avg.levels(raw, masked)
        blocks = [block(level) for block, level in zip(conv_avg.head.skip_convs, levels)]
        expected = torch.cat([lv.mean((2, 3)) for lv in (*blocks, levels[-1])], 1)
        torch.testing.assert_close(conv_avg.head.pool_levels(levels), expected)


def test_inception_modules_written_out():
    torch.manual_seed(0)
    model = build_model("maskreid", 0, **TINY).eval()
    x = torch.randn(2, 24, 36, 14)  # input of inception 2a: 6w channels at w = 4
    a, b = model.inception_2a, model.inception_2b
    with torch.no_grad():
        branch4 = a.branch4[1](F.avg_pool2d(x, 3, 1, 1))  # pad counted, like Caffe's AVE pooling
        expected_a = torch.cat(
            [a.branch1(x), a.branch2[1](a.branch2[0](x)), a.branch3[2](a.branch3[1](a.branch3[0](x))), branch4], 1
        )
        torch.testing.assert_close(a(x), expected_a)
        y = a(x)
        expected_b = torch.cat(
            [b.branch1[1](b.branch1[0](y)), b.branch2[2](b.branch2[1](b.branch2[0](y))), F.max_pool2d(y, 3, 2, 1)], 1
        )
        torch.testing.assert_close(b(y), expected_b)
    assert expected_b.shape == (2, 8 + 8 + 32, 18, 7)
    assert b.branch1[1][0].stride == (2, 2) and b.branch2[1][0].stride == (1, 1)
    assert b.branch2[2][0].stride == (2, 2)


def test_separate_stems_and_dgd_init():
    torch.manual_seed(0)
    model = build_model("maskreid", 0, **TINY)
    assert model.raw_stem[0][0].weight.data_ptr() != model.masked_stem[0][0].weight.data_ptr()
    assert len(model.raw_stem) == 3 and model.raw_stem[2][0].out_channels == 4
    assert model.inception_1a.branch1[0].in_channels == 8  # concatenated stems
    raw, masked = pair(2)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(raw, masked), model(masked, raw))
    model.train()
    model(raw, masked).embedding.sum().backward()
    assert model.raw_stem[0][0].weight.grad.abs().sum() > 0
    assert model.masked_stem[0][0].weight.grad.abs().sum() > 0
    # Caffe xavier (uniform ±sqrt(3 / fan_in)) and bias 0.2
    conv = model.inception_2a.branch2[1][0]
    bound = math.sqrt(3 / conv.weight[0].numel())
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert torch.all(conv.bias == 0.2)


def test_resnet50_variant():
    with torch.device("meta"):
        full = build_model("maskreid_resnet50", 751)
    assert sum(p.numel() for p in full.trunk.parameters()) == 23_508_032  # torchvision ResNet-50 minus fc
    assert full.head.fc.in_features == 512 + 1024 + 2048
    torch.manual_seed(0)
    model = build_model("maskreid_resnet50", 5, layers=(1, 1, 1, 1), width=8)
    assert isinstance(model, MaskReIDResNet50)
    raw, masked = pair(2, 64, 32)
    out = model(raw, masked)
    assert out.embedding.shape == (2, 256) and out.logits.shape == (2, 5)
    model.eval()
    with torch.no_grad():
        levels = model.levels(raw, masked)
        assert [tuple(level.shape[1:]) for level in levels] == [(64, 8, 4), (128, 4, 2), (256, 4, 2)]  # last stride 1
        # With both stems equal, stream_fuse's init (average) makes the trunk see a plain ResNet stem.
        model.masked_stem.load_state_dict(
            {k: v for k, v in model.trunk.state_dict().items() if k.startswith(("conv1.", "bn1."))}
        )
        trunk = model.trunk
        plain = trunk.stages(trunk.maxpool(trunk.stem(raw)))[1:]
        for got, want in zip(model.levels(raw, raw), plain):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(train):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MaskReID(4, stem_channels=4, base_width=4).train(train)
    compiled = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)
    raw, masked = pair(2, 48, 24)
    expected, actual = model(raw, masked), compiled(raw, masked)
    if train:
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
        (actual.embedding.sum() + actual.logits.sum()).backward()
        assert model.masked_stem[0][0].weight.grad.abs().sum() > 0
    else:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- constructor options

BAD_HEAD_OPTIONS = [
    ("embed_dim", 0),
    ("skip", "attention"),
    ("fuse_levels", None),  # a null override passes the config's type check
    ("level_norm", "ln"),
]
BAD_OPTIONS = {
    "maskreid": [("stem_channels", 0), ("base_width", -1), *BAD_HEAD_OPTIONS],
    "maskreid_resnet50": [
        ("last_stride", 0),
        ("last_stride", 3),
        ("last_stride", True),
        ("layers", (1, 1, 1)),  # layer4 missing
        ("layers", (1, 1, 1, 0)),
        ("layers", ()),
        ("width", 0),
        *BAD_HEAD_OPTIONS,
    ],
}
SMALL = {"maskreid": TINY, "maskreid_resnet50": dict(layers=(1, 1, 1, 1), width=8)}


@pytest.mark.parametrize(
    "model_name,option,value", [(name, *case) for name, cases in BAD_OPTIONS.items() for case in cases]
)
def test_out_of_range_options_are_refused_by_name(model_name, option, value):
    with pytest.raises(ValueError, match=rf"^{model_name}: {option} must be "):
        build_model(model_name, 0, **{**SMALL[model_name], option: value})


@pytest.mark.parametrize("model_name", list(BAD_OPTIONS))
def test_negative_class_count_is_refused(model_name):
    with pytest.raises(ValueError, match=rf"^{model_name}: num_classes must be an integer >= 0"):
        build_model(model_name, -1, **SMALL[model_name])


def test_options_are_checked_before_anything_is_built(monkeypatch):
    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *args, **kwargs: built.append(type(self)))
    for name in BAD_OPTIONS:
        with pytest.raises(ValueError, match="embed_dim"):
            build_model(name, 0, **SMALL[name], embed_dim=0)
    assert built == []


def test_defaults_and_shipped_configurations_build():
    """Each class's defaults and every built-in MaskReID config's options, on the meta device."""
    from dpm_ops.engine.config import available_configs, load_config

    shipped = [load_config(name)["model"] for name in available_configs()]
    shipped = [(m["name"], m["options"]) for m in shipped if m["name"] in BAD_OPTIONS]
    assert shipped
    with torch.device("meta"):
        for name, options in [(name, {}) for name in BAD_OPTIONS] + shipped:
            assert build_model(name, 751, **options).head.fc.out_features == options.get("embed_dim", 256)


def test_the_masked_stream_reads_the_masked_image():
    model = MaskReID(**TINY).eval()
    raw, masked = pair()
    with torch.no_grad():
        assert not torch.allclose(model(raw, masked), model(raw, raw))


def test_softmax_head_reads_the_pre_l2_feature_and_l2_level_norm():
    model = MaskReID(num_classes=5, level_norm="l2", **TINY)
    assert model.head.classifier.weight.std().item() == pytest.approx(0.001, rel=0.3)  # N(0, 0.001) init
    captured = {}
    model.head.bn.register_forward_hook(lambda module, args, out: captured.__setitem__("feature", out))
    model.head.fc.register_forward_pre_hook(lambda module, args: captured.__setitem__("levels", args[0]))
    out = model(*pair(4))
    torch.testing.assert_close(out.logits, model.head.classifier(captured["feature"]))
    sizes = [model.inception_1b.out_channels, model.inception_2b.out_channels, model.inception_3b.out_channels]
    norms = torch.stack([level.norm(dim=1) for level in captured["levels"].split(sizes, 1)])
    torch.testing.assert_close(norms, torch.ones_like(norms))  # each level's vector has unit length
