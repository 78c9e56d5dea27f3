"""Checkpoints: atomic writes (a crash mid-save leaves the old file and no debris), tags, clear errors."""

import os

import pytest
import torch

from dpm_ops.engine.checkpoint import (CheckpointError, atomic_write, capture_rng_state, load_checkpoint,
                                       make_checkpoint, restore_rng_state, save_checkpoint)


def state(model_name="dpm", value=1.0):
    return make_checkpoint(model_name, {"num_classes": 3, "num_cameras": 2, "options": {}}, {"model": {}},
                           {"w": torch.full((4,), value)})


def test_round_trip_and_tags(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt" / "last.pt", state())
    loaded = load_checkpoint(path, model_name="dpm")
    assert torch.equal(loaded["model"]["w"], torch.ones(4)) and loaded["model_name"] == "dpm"
    assert os.listdir(tmp_path / "ckpt") == ["last.pt"]


def test_crash_during_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", state(value=1.0))
    before = path.read_bytes()

    def half_write_then_die(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is being killed mid-save

    monkeypatch.setattr(torch, "save", half_write_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, state(value=2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(4))


def test_replace_is_the_commit_point(tmp_path, monkeypatch):
    """Until os.replace, the destination never holds partial data; a failing replace leaves no debris."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    seen = []

    def spy_replace(src, dst):
        seen.append((open(src, "rb").read(), open(dst, "rb").read()))
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", spy_replace)
    with pytest.raises(OSError):
        atomic_write(path, lambda handle: handle.write(b"new content"))
    assert seen == [(b"new content", b"old")]
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_other_models_checkpoint_is_one_clear_line(tmp_path):
    path = save_checkpoint(tmp_path / "final.pt", state("vit_baseline"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model_name="dpm")
    assert "holds a 'vit_baseline' model, not 'dpm'" in str(info.value) and "\n" not in str(info.value)


def test_foreign_and_corrupt_files(tmp_path):
    torch.save({"backbone.w": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="not a dpm_ops training checkpoint"):
        load_checkpoint(tmp_path / "plain.pth")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="make_checkpoint"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}})


def test_rng_state_round_trip():
    import random

    import numpy as np

    saved = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
