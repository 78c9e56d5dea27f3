"""MaskReID's widths, its head's embedding, the ResNet-50 variant's blocks and width and DPM's mask generator
are bounded (their weights grow with the squares): past the bounds the options are refused before anything is
built, at them the model builds (on the meta device: no memory)."""

import pytest
import torch

from dpm_ops.models import build_model
from dpm_ops.models.maskreid import MAX_BASE_WIDTH, MAX_EMBED_DIM, MAX_STEM_CHANNELS

TOO_WIDE = [
    ("maskreid", dict(stem_channels=10**9), r"stem_channels must be an integer in \[1, 512\], got 1000000000$"),
    ("maskreid", dict(base_width=513), r"base_width must be an integer in \[1, 512\], got 513$"),
    ("maskreid", dict(embed_dim=8193), r"embed_dim must be an integer in \[1, 8192\], got 8193$"),
    ("maskreid_resnet50", dict(embed_dim=10**9), r"embed_dim must be an integer in \[1, 8192\]"),  # the same head
    # layers=[10**9, ...] built blocks until the OOM killer ended the process
    ("maskreid_resnet50", dict(layers=[10**9, 3, 6, 3]), r"layers must be 4 integers in \[1, 64\]"),
    ("maskreid_resnet50", dict(width=513), r"width must be an integer in \[1, 512\], got 513$"),
    (
        "maskreid_resnet50",
        dict(width=512, layers=[3, 4, 64, 3]),
        r"layers \[3, 4, 64, 3\] at width 512: about 5.5e\+09",
    ),
    (
        "dpm",
        dict(embed_dim=1536, num_heads=8, depth=64, mlp_ratio=1.0, mask_tap_blocks=list(range(64)), stride=16),
        r"a mask generator of 64 levels at embed_dim = 1536: about 2.78e\+09 weights",
    ),
    # each part within the bound alone, not together (three parts just under it allocated three times it)
    (
        "dpm",
        dict(embed_dim=4096, num_heads=8, depth=8, mask_tap_blocks=[3, 5, 7]),
        r"its backbone, mask generator and classifier together: about 2.99e\+09 weights",
    ),
    (
        "vit_baseline",
        dict(embed_dim=4096, num_heads=8, depth=8, num_classes=450_000),
        r"its backbone and classifier together: about 3.46e\+09 weights",
    ),
    (
        "maskreid_resnet50",
        dict(width=512, layers=[3, 4, 12, 3], embed_dim=8192, num_classes=200_000),
        r"its trunk and classifier together: about 3.43e\+09 weights",
    ),
]


@pytest.mark.parametrize("name, options, message", TOO_WIDE)
def test_widths_past_the_bounds_are_refused_before_anything_is_built(monkeypatch, name, options, message):
    from dpm_ops.engine.builders import build_model_from_args
    from dpm_ops.engine.config import ConfigError

    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *args, **kwargs: built.append(type(self)))
    options = dict(options)
    num_classes = options.pop("num_classes", 1)
    with pytest.raises(ValueError, match=rf"^{name}: {message}"):
        build_model(name, num_classes, **options)
    with pytest.raises(ConfigError, match=rf"^config key model.options: {name}: {message}"):
        build_model_from_args(name, {"num_classes": num_classes, "num_cameras": 0, "options": options})
    assert built == []


def test_the_bounds_build():
    with torch.device("meta"):
        model = build_model(
            "maskreid", 0, stem_channels=MAX_STEM_CHANNELS, base_width=MAX_BASE_WIDTH, embed_dim=MAX_EMBED_DIM
        )
    assert sum(p.numel() for p in model.parameters()) < 10**9  # 0.6 B: a quarter of the ViTs' MAX_WEIGHTS


@pytest.mark.parametrize(
    "config_name, override, message",
    [
        ("synthetic_dpm", "model.options.depth=0", r"dpm: depth must be an integer in \[1, 64\], got 0$"),
        ("synthetic_vit_baseline", "model.options.stride=0", r"vit_baseline: stride must be an integer in \[1, 16\]"),
        (
            "maskreid_market1501",
            "model.options.base_width=513",
            r"maskreid\w*: base_width must be an integer in \[1, 512\]",
        ),
    ],
)
def test_a_bad_model_option_stops_training_before_the_data(tmp_path, config_name, override, message):
    """The model's own option checks run before the synthetic set is generated or any split is read (they ran
    after both: ~10 s of generation, then the error)."""
    from dpm_ops.engine import load_config, train
    from dpm_ops.engine.config import ConfigError

    root = tmp_path / "never_made"
    overrides = [override, f"dataset.root={root}", "dataset.name=synthetic", "dataset.generate=true"]
    config = load_config(config_name, overrides)
    with pytest.raises(ConfigError, match=rf"^config key model.options: {message}"):
        train(config, tmp_path / "run")
    assert not root.exists()
