"""Shared helpers of the engine / CLI tests: a tiny synthetic set and tiny configs that train on CPU
in seconds."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_SYNTH = {
    "seed": 3,
    "ids": 20,
    "cameras": 3,
    "width": 32,
    "height": 64,
    "train_images": [4, 6],
    "id_cameras": [2, 3],
    "gallery_per_camera": [1, 2],
    "distractors": 0.1,
    "junk": 0.0,
    "query_occlusion": 0.6,
}


def tiny_synth_config(**overrides):
    """TINY_SYNTH as a SynthConfig (lists as tuples), with `overrides`."""
    from dpm_ops.data.synth import SynthConfig

    options = {key: tuple(value) if isinstance(value, list) else value for key, value in TINY_SYNTH.items()}
    return SynthConfig(**{**options, **overrides})


TINY_VIT = {
    "patch_size": 8,
    "stride": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "drop_path_rate": 0.1,
}


def synth_argv(out) -> list[str]:
    """`dpm-reid synth` arguments that write the tiny set to ``out``."""
    s = TINY_SYNTH
    return [
        "synth",
        "--out",
        str(out),
        "--seed",
        str(s["seed"]),
        "--ids",
        str(s["ids"]),
        "--cameras",
        str(s["cameras"]),
        "--width",
        str(s["width"]),
        "--height",
        str(s["height"]),
        "--train-images",
        "{},{}".format(*s["train_images"]),
        "--gallery-per-camera",
        "{},{}".format(*s["gallery_per_camera"]),
        "--distractors",
        str(s["distractors"]),
        "--junk",
        str(s["junk"]),
        "--query-occlusion",
        str(s["query_occlusion"]),
        "--quiet",
    ]


def tiny_config(root, model: str = "dpm", **sections) -> dict:
    """A config dict (as a YAML file would hold it) for ``model`` on the tiny set at ``root``."""
    options = dict(TINY_VIT)
    if model == "dpm":
        options["mask_tap_blocks"] = [0, 1]
    config = {
        "model": {"name": model, "options": options},
        "dataset": {"name": "synthetic", "root": str(root), "synth": dict(TINY_SYNTH)},
        "input": {"recipe": "dpm", "size": [64, 32], "padding": 2},
        "sampler": {"kind": "pk", "num_ids": 4, "num_instances": 2},
        "solver": {"base_lr": 0.01, "epochs": 2, "warmup_epochs": 1},
        "train": {"seed": 7, "log_period": 1, "checkpoint_every_iters": 2, "progress": False},
        "eval": {"batch_size": 64, "pictures": False},
    }
    if model.startswith("maskreid"):
        config["model"]["options"] = {"stem_channels": 4, "base_width": 4, "embed_dim": 16}
        config["input"] = {"recipe": "maskreid", "resize": [52, 24], "size": [36, 16]}
        config["sampler"] = {
            "kind": "maskreid",
            "num_positives": 3,
            "num_negatives": 5,
            "num_ids": 4,
            "num_instances": 2,
        }
        config["pretrain"] = {"epochs": 1, "base_lr": 0.01, "sampler": "pk"}
        config["solver"] = {"base_lr": 0.01, "epochs": 1, "schedule": "poly"}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    if model.startswith("maskreid") and not config["pretrain"]["epochs"]:  # no pre-training: its keys are unread
        config["pretrain"] = {"epochs": 0}
        for key in ("num_ids", "num_instances"):
            config["sampler"].pop(key, None)
    return config


def write_config(path, config: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def flip_a_tensor_bit(path) -> None:
    """One bit of the largest tensor of torch.save's archive ``path`` flipped in place (a disk error):
    torch.load still reads the file."""
    import re
    import zipfile

    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if re.search(r"/data/\d+$", info.filename)]
        record = max(tensors, key=lambda info: info.file_size)
    data = bytearray(Path(path).read_bytes())
    # a local header: 30 bytes, then the name and the extra field, whose lengths are its last two fields
    name_length = int.from_bytes(data[record.header_offset + 26 : record.header_offset + 28], "little")
    extra_length = int.from_bytes(data[record.header_offset + 28 : record.header_offset + 30], "little")
    data[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x10
    Path(path).write_bytes(data)


def scored(folder, weights) -> dict:
    """An evaluation's metrics.json, once its settings name the ``weights`` it scored (a training's do not)."""
    import json

    record = json.loads((Path(folder) / "metrics.json").read_text())
    assert record["settings"].pop("weights") == str(Path(weights).resolve())
    return record


def run_with_file_size_limit(argv: list, limit: int, **options):
    """``argv`` in a subprocess whose files cannot grow past ``limit`` bytes (RLIMIT_FSIZE, SIGXFSZ ignored): a
    write past it fails with EFBIG, as a full disk's with ENOSPC, without a small file system to fill."""
    import resource
    import signal
    import subprocess

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run(argv, preexec_fn=limited, capture_output=True, text=True, timeout=600, **options)
