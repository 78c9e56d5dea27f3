"""Bad input to the models', losses' and engine's Python API (from an audit): each is a ValueError naming the
argument before anything changes, where it was a raw torch / Python error, or silently taken."""

import collections
import io

import pytest
import torch

from dpm_ops.engine import CheckpointError, load_checkpoint, train
from dpm_ops.engine.checkpoint import save_checkpoint
from dpm_ops.losses import BaselineReIDLoss, DPMLoss, batch_hard_soft_margin_triplet
from dpm_ops.models import build_model
from dpm_ops.ops import hem_loss
from test_engine_train import config_for, tiny_root  # noqa: F401 (the fixture)

TINY_DPM = dict(embed_dim=32, depth=2, num_heads=4, img_size=(64, 64), stride=16, mask_tap_blocks=(0, 1))
MODELS = {
    "dpm": (TINY_DPM, 1),
    "vit_baseline": ({k: v for k, v in TINY_DPM.items() if k != "mask_tap_blocks"}, 1),
    "maskreid": (dict(stem_channels=4, base_width=8, embed_dim=16), 2),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_train_forward_of_one_image_is_refused_before_any_layer(name):
    """torch's BatchNorm error ('Expected more than 1 value per channel') came after the BatchNorms before it
    had taken the lone image into their running statistics."""
    options, streams = MODELS[name]
    model = build_model(name, 5, 2, **options).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    size = (64, 64) if name != "maskreid" else (144, 56)
    images = [torch.randn(1, 3, *size) for _ in range(streams)]
    kwargs = {} if name == "maskreid" else dict(cam_label=torch.tensor([0]))
    with pytest.raises(ValueError, match="a train-mode forward needs at least 2 images .* got 1; model.eval()"):
        model(*images, **kwargs)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    model.eval()(*images, **kwargs)  # any batch in eval mode


def test_model_name_of_another_type_is_unknown():
    with pytest.raises(ValueError, match=r"unknown model \['dpm'\]"):  # was: unhashable type: 'list'
        build_model(["dpm"], 5)


def test_losses_refuse_what_they_took_silently():
    labels = torch.tensor([0, 0, 1, 1])
    for features in (torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.bool)):  # a loss came out
        with pytest.raises(ValueError, match="batch_hard_triplet: features must be floating point"):
            batch_hard_soft_margin_triplet(features, labels)
    with pytest.raises(ValueError, match=r"hem_loss: cls_logits must have at least one head and one patch token"):
        hem_loss(torch.randn(4, 4, 0))  # it gave 1
    model = build_model("dpm", 5, 2, **TINY_DPM).train()
    output = model(torch.randn(4, 3, 64, 64), cam_label=torch.tensor([0, 1, 0, 1]), labels=labels)
    held = "plain_logits 4, masked_logits 4, feature 4, hem_logits 3 samples"
    with pytest.raises(ValueError, match=f"^DPMLoss: the output's tensors must hold one batch, got {held}$"):
        DPMLoss()(output._replace(hem_logits=output.hem_logits[:3]), labels)
    # the triplet term blamed the labels ("labels must be 1-D of length B = 3") for a feature of another batch
    with pytest.raises(ValueError, match="DPMLoss: the output's tensors must hold one batch, got .*feature 3"):
        DPMLoss()(output._replace(feature=output.feature[:3]), labels)
    # a MaskReID output has logits, no feature: an AttributeError
    maskreid_like = collections.namedtuple("MaskReIDTrainOutput", "logits embedding")(
        output.plain_logits, output.feature
    )
    with pytest.raises(
        ValueError, match="BaselineReIDLoss: output must be the model's train-mode ViTBaselineTrainOutput"
    ):
        BaselineReIDLoss()(maskreid_like, labels)


def test_engine_arguments(tmp_path, tiny_root):  # noqa: F811
    config = config_for(tmp_path, tiny_root)
    for log_stream, kind in (("log.txt", "str"), (io.BytesIO(), "BytesIO")):  # after the folder was made
        with pytest.raises(ValueError, match=f"log_stream must be a text stream .*, got {kind}$"):
            train(config, tmp_path / "run", log_stream=log_stream)
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):  # resume silently won
        train(config, tmp_path / "run", resume=True, overwrite=True)
    assert not (tmp_path / "run").exists()
    train(config_for(tmp_path, tiny_root, overrides=["solver.epochs=1"]), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    for bad in (None, [1]):  # AttributeError: no attribute 'get'
        with pytest.raises(ValueError, match="state must come from make_checkpoint"):
            save_checkpoint(tmp_path / "x.pt", bad)
    for path in (None, tmp_path):  # TypeError, IsADirectoryError
        with pytest.raises(ValueError, match="save_checkpoint: path must be a file path"):
            save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="map_location must be a device name, .*, got int"):  # blamed the file
        load_checkpoint(last, map_location=5)


def test_model_parts_check_what_they_are_given():
    """(Audit) SkippedFusionHead fused levels in another order silently and met one level fewer with a raw GEMM
    error; HierarchicalMaskGenerator took num_levels 0 and met the wrong tokens with raw conv / unflatten errors;
    resize_pos_embed read a 2-D embedding as one of fewer tokens; unknown options named neither the class nor
    its options."""
    from dpm_ops.losses import MaskedArcFaceLoss, MaskReIDRankingLoss
    from dpm_ops.models import DPM, HierarchicalMaskGenerator, SkippedFusionHead, resize_pos_embed

    head = SkippedFusionHead([4, 8, 16], embed_dim=8).eval()
    levels = [torch.randn(2, 4, 4, 4), torch.randn(2, 8, 2, 2), torch.randn(2, 16, 1, 1)]
    for bad in ([levels[0], levels[2], levels[1]], levels[:2], levels[0]):
        with pytest.raises(
            ValueError, match=r"skipped_fusion_head: levels must be 3 \(B, C, H, W\) maps of \[4, 8, 16\]"
        ):
            head(bad)
    assert head(levels).shape == (2, 8)
    with pytest.raises(ValueError, match="hierarchical_mask_generator: num_levels must be an integer >= 1"):
        HierarchicalMaskGenerator(8, (4, 4), num_levels=0)
    with pytest.raises(ValueError, match="hierarchical_mask_generator: grid_size must be 2 integers"):
        HierarchicalMaskGenerator(8, (4,))
    generator = HierarchicalMaskGenerator(8, (4, 4), num_levels=2).eval()
    for bad in ([torch.randn(2, 16, 8)], [torch.randn(2, 16, 8), torch.randn(2, 15, 8)], [torch.randn(2, 16, 4)] * 2):
        with pytest.raises(ValueError, match=r"tapped_tokens must be 2 \(B, 16, 8\) token grids"):
            generator(bad)
    assert generator([torch.randn(2, 16, 8)] * 2).shape == (2, 8)
    for bad, message in (
        (
            torch.randn(197, 8),
            r"pos_embed must be a \(1, 1 \+ N, C\) floating-point tensor, got torch.float32 \(197, 8\)",
        ),
        (torch.ones(1, 197, 8, dtype=torch.long), "pos_embed must be a .* floating-point tensor, got torch.int64"),
    ):
        with pytest.raises(ValueError, match=f"resize_pos_embed: {message}"):
            resize_pos_embed(bad, (16, 8))
    for grid in ((0, 8), (16.5, 8)):
        with pytest.raises(ValueError, match="resize_pos_embed: grid_size must be 2 integers in"):
            resize_pos_embed(torch.randn(1, 197, 8), grid)
    with pytest.raises(
        TypeError, match=r"MaskedArcFaceLoss: got an unexpected keyword argument 's' \(its options: scale,"
    ):
        MaskedArcFaceLoss(s=30)
    with pytest.raises(TypeError, match=r"MaskReIDRankingLoss: .*'foo' \(its options: alpha, .*, ranking_batch\)$"):
        MaskReIDRankingLoss(foo=1)  # the module's own option listed too
    with pytest.raises(
        TypeError, match=r"dpm: got an unexpected keyword argument 'foo' \(the backbone's options: img_size"
    ):
        DPM(5, foo=1)
