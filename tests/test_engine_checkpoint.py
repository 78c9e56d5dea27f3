"""Checkpoints: atomic writes (a crash mid-save leaves the old file and no debris), tags, clear errors."""

import os
import re
import stat
import subprocess
import sys

import pytest
import torch

from dpm_ops.engine import checkpoint
from engine_utils import flip_a_tensor_bit


def state(model_name="dpm", value=1.0):
    return checkpoint.make_checkpoint(
        model_name, {"num_classes": 3, "num_cameras": 2, "options": {}}, {"model": {}}, {"w": torch.full((4,), value)}
    )


def test_round_trip_and_tags(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ckpt" / "last.pt", state())
    loaded = checkpoint.load_checkpoint(path, model_name="dpm")
    assert torch.equal(loaded["model"]["w"], torch.ones(4)) and loaded["model_name"] == "dpm"
    assert os.listdir(tmp_path / "ckpt") == ["last.pt"]
    assert "training" not in loaded  # a final.pt holds no training state
    final = checkpoint.make_checkpoint("dpm", {}, {}, {}, metrics={"all": {"mAP": 50.0}})
    assert final["metrics"] == {"all": {"mAP": 50.0}} and "training" not in final


def test_save_refuses_a_state_without_its_model_name(tmp_path):
    with pytest.raises(ValueError, match="make_checkpoint"):
        checkpoint.save_checkpoint(tmp_path / "last.pt", {"format": checkpoint.FORMAT, "model": {}})
    assert not (tmp_path / "last.pt").exists()


def test_another_format_version_is_named(tmp_path):
    """A checkpoint of another dpm_ops checkpoint format (a newer release's) is named as such, by load_checkpoint
    and by eval / extract / export's reader (which took it for a bare state dict and refused it as one)."""
    from dpm_ops.engine import load_config
    from dpm_ops.engine.builders import trained_model

    newer = {**state(), "format": "dpm_ops.checkpoint/2"}
    torch.save(newer, tmp_path / "newer.pt")
    message = (
        rf"^checkpoint {re.escape(str(tmp_path / 'newer.pt'))} is of format 'dpm_ops.checkpoint/2', which this "
        r"dpm_ops does not read \(it reads 'dpm_ops.checkpoint/1'\); use the dpm_ops version that wrote it$"
    )
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load_checkpoint(tmp_path / "newer.pt")
    with pytest.raises(checkpoint.CheckpointError, match=message):
        trained_model(load_config("synthetic_dpm"), tmp_path / "newer.pt")


def test_a_failed_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """torch.save reports a write that fails (a full disk) as a RuntimeError ("unexpected pos ..."), which the CLI
    printed as a traceback: it is an OSError naming the checkpoint (one CLI line naming --output), and the
    previous file and no temporary remain."""
    path = checkpoint.save_checkpoint(tmp_path / "last.pt", state(value=1.0))

    def full_disk(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 402624 vs 402512\nmore")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as error:
        checkpoint.save_checkpoint(path, state(value=2.0))
    assert error.value.filename == str(path)
    assert re.fullmatch(
        r"writing the checkpoint failed \(\d+ MiB free on its file system; torch: \[enforce fail at "
        r"inline_container.cc:672\] . unexpected pos 402624 vs 402512\)",
        error.value.strerror,
    )
    monkeypatch.undo()
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(4))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"is a folder, not a file$"):
        checkpoint.load_checkpoint(tmp_path)
    # a run folder, or its checkpoints/ folder: the message names the checkpoints to pass instead
    checkpoint.save_checkpoint(tmp_path / "checkpoints" / "final.pt", state())
    checkpoint.save_checkpoint(tmp_path / "checkpoints" / "last.pt", state())
    listed = f"{tmp_path / 'checkpoints' / 'final.pt'}, {tmp_path / 'checkpoints' / 'last.pt'}"
    for folder in (tmp_path, tmp_path / "checkpoints"):
        with pytest.raises(checkpoint.CheckpointError) as error:
            checkpoint.load_checkpoint(folder)
        assert str(error.value) == f"checkpoint {folder} is a folder, not a file (it holds {listed})"


def test_a_missing_file_and_a_device_file_are_named(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"^checkpoint not found: .*none\.pt$"):
        checkpoint.load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"^checkpoint /dev/null is not a regular file$"):
        checkpoint.load_checkpoint("/dev/null")


def test_crash_during_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = checkpoint.save_checkpoint(tmp_path / "last.pt", state(value=1.0))
    before = path.read_bytes()

    def half_write_then_die(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is being killed mid-save

    monkeypatch.setattr(torch, "save", half_write_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, state(value=2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(4))


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
        checkpoint.atomic_write(path, lambda handle: handle.write(b"new content"))
    assert seen == [(b"new content", b"old")]
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_data_is_synced_before_the_replace_and_the_folder_after(tmp_path, monkeypatch):
    """Durability: the temporary's bytes reach the disk (flushed, fsynced) before os.replace
    publishes them, and the folder entry is fsynced after it; else a power cut could leave an
    empty or truncated checkpoint under the final name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync folder",) if stat.S_ISDIR(info.st_mode) else ("fsync file", info.st_size))
        real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace",))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    checkpoint.atomic_write(tmp_path / "f.bin", lambda handle: handle.write(b"new content"))
    assert events == [("fsync file", len(b"new content")), ("replace",), ("fsync folder",)]


def test_a_temporary_name_in_use_is_never_written_or_removed(tmp_path, monkeypatch):
    """The temporary is created exclusively ("x"): a file already at its name (a collision, or a
    planted link) is neither written through, moved into place nor deleted."""
    theirs = tmp_path / ".f.bin.0123456789ab.tmp"
    theirs.write_bytes(b"theirs")
    monkeypatch.setattr(checkpoint, "_temporary_name", lambda path: theirs)
    with pytest.raises(FileExistsError):
        checkpoint.atomic_write(tmp_path / "f.bin", lambda handle: handle.write(b"new content"))
    assert theirs.read_bytes() == b"theirs" and not (tmp_path / "f.bin").exists()


def test_other_models_checkpoint_is_one_clear_line(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "final.pt", state("vit_baseline"))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(path, model_name="dpm")
    assert "holds a 'vit_baseline' model, not 'dpm'" in str(info.value) and "\n" not in str(info.value)


def test_foreign_and_corrupt_files(tmp_path):
    torch.save({"backbone.w": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(checkpoint.CheckpointError, match="not a dpm_ops training checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "plain.pth")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="make_checkpoint"):
        checkpoint.save_checkpoint(tmp_path / "x.pt", {"model": {}})


def test_damaged_files_are_refused_before_torch_reads_them(tmp_path):
    """torch.load checks no CRC: a flipped bit loaded as a wrong weight, a cut file was torch's miniz error."""
    path = checkpoint.save_checkpoint(tmp_path / "last.pt", state())
    flip_a_tensor_bit(path)
    torch.load(path, weights_only=False)  # what torch does with it
    with pytest.raises(
        checkpoint.CheckpointError, match=r"last.pt is damaged: record \S+/data/\d+ does not read back .*\(Bad CRC-32"
    ):
        checkpoint.load_checkpoint(path)
    whole = checkpoint.save_checkpoint(tmp_path / "final.pt", state()).read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"cut.pt is cut short: its archive has no readable end"):
        checkpoint.load_checkpoint(tmp_path / "cut.pt")
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # records without a CRC have nothing to check
    try:
        torch.save(state(), tmp_path / "unchecked.pt")
    finally:
        torch.serialization.set_crc32_options(previous)
    assert checkpoint.load_checkpoint(tmp_path / "unchecked.pt")["model_name"] == "dpm"
    torch.save(state(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert checkpoint.load_checkpoint(tmp_path / "legacy.pt")["model_name"] == "dpm"


def test_rng_state_round_trip(tmp_path):
    """Through a file too: the restricted unpickler rebuilds np.random.get_state()'s array."""
    import random

    import numpy as np

    torch.save(checkpoint.capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.restore_rng_state(checkpoint.read_checkpoint_file(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


class _RunsCode:
    """Unpickling it calls os.mkdir(marker): what a booby-trapped weights file does with full unpickling."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_bad_map_location_is_named_not_the_file(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save(state(), path)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"^map_location must name a device \(cpu, cuda, cuda:N\), got 'gpu'$"
    ):
        checkpoint.load_checkpoint(path, map_location="gpu")  # was "not a PyTorch file written by torch.save"
    if not torch.cuda.is_available():
        with pytest.raises(checkpoint.CheckpointError, match="map_location 'cuda': CUDA is not available here"):
            checkpoint.load_checkpoint(path, map_location="cuda")


def test_no_code_runs_from_a_weights_file(tmp_path):
    """--weights takes files from anywhere (the official release, a colleague's run): they are read with
    torch's restricted unpickler, and an object it will not build is named."""
    marker = tmp_path / "ran"
    torch.save({"format": checkpoint.FORMAT, "model": _RunsCode(marker)}, tmp_path / "trap.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"trap.pt holds a Python object \(posix.mkdir\) that is not"):
        checkpoint.load_checkpoint(tmp_path / "trap.pt")
    assert not marker.exists()


def test_text_file_is_an_unreadable_checkpoint(tmp_path):
    """torch.load raises KeyError on a text file: still one CheckpointError naming the file."""
    (tmp_path / "notes.pt").write_text("hello\n")
    with pytest.raises(checkpoint.CheckpointError, match=r"unreadable checkpoint: .*notes\.pt is not a PyTorch file"):
        checkpoint.load_checkpoint(tmp_path / "notes.pt")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: s.pop("model_args"), "no model_args"),
        (lambda s: s["model_args"].pop("num_cameras"), "model_args must hold int num_classes, int num_cameras"),
        (lambda s: s["model_args"].update(options=None), "model_args must hold"),
        (lambda s: s.update(model={"w": [1.0]}), "no model state dict"),
    ],
)
def test_checkpoint_structure_is_checked_on_load(tmp_path, edit, needle):
    broken = state()
    edit(broken)
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert needle in str(info.value) and "broken.pt" in str(info.value) and "\n" not in str(info.value)


def test_tensors_that_do_not_fit_the_model_are_named(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    good = model.state_dict()
    checkpoint.load_model_state(model, dict(good), "ok.pt")
    cases = {
        "missing: 0.bias": {k: v for k, v in good.items() if k != "0.bias"},
        "unexpected: 2.weight": {**good, "2.weight": torch.zeros(1)},
        "shape differs: 1.weight (2, 4) vs the model's (2, 3)": {**good, "1.weight": torch.zeros(2, 4)},
        # load_state_dict casts these silently: an int64 state dict evaluated as other weights
        "dtype differs: 0.weight torch.int64 vs the model's torch.float32": {
            **good,
            "0.weight": good["0.weight"].long(),
        },
        "NaN or inf values: 1.bias": {**good, "1.bias": torch.full((2,), float("nan"))},
        "not a tensor with data: 0.bias, 1.weight": {
            **good,
            "0.bias": [0.0, 0.0, 0.0],
            "1.weight": torch.zeros(2, 3, device="meta"),
        },
    }
    for needle, tensors in cases.items():
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.load_model_state(model, tensors, "runs/x/final.pt")
        assert needle in str(info.value) and "runs/x/final.pt" in str(info.value), str(info.value)
    many = {k: v for k, v in good.items() if not k.startswith("0.")} | {f"x{i}": torch.zeros(1) for i in range(5)}
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected: x0, x1, x2 and 2 more"):
        checkpoint.load_model_state(model, many, "f.pt")
    three = {**good, **{f"x{i}": torch.zeros(1) for i in range(3)}}
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected: x0, x1, x2\)"):  # all listed, no "and 0 more"
        checkpoint.load_model_state(model, three, "f.pt")


def test_stale_temporaries_are_removed(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "last.pt", state())
    stale = [tmp_path / ".last.pt.0123abcd.tmp", tmp_path / ".metrics.json.99.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    for name in ("notes.tmp", ".cache.tmp"):  # not shaped like an atomic_write temporary: kept
        (tmp_path / name).write_text("not ours")
    (tmp_path / ".data.v2.tmp").mkdir()  # shaped like one, but a folder: never a temporary of ours
    assert sorted(checkpoint.remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == [".cache.tmp", ".data.v2.tmp", "last.pt", "notes.tmp"]
    assert checkpoint.remove_stale_temporaries(tmp_path / "absent") == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_one_permission_policy_for_every_file_written(tmp_path, umask):
    """Checkpoints and metrics.json are created like any other file: the umask decides."""
    from dpm_ops.engine.evaluator import write_json_atomic

    old = os.umask(umask)
    try:
        checkpoint.save_checkpoint(tmp_path / "last.pt", state())
        write_json_atomic(str(tmp_path / "metrics.json"), {"rank1": 1.0})
        (tmp_path / "train.log").write_text("log")
    finally:
        os.umask(old)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("last.pt", "metrics.json", "train.log")}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_output_folder_is_checked_before_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match=r"--output .*a_file: exists and is not a folder"):
        checkpoint.make_output_folder(tmp_path / "a_file", "--output")
    with pytest.raises(checkpoint.CheckpointError, match=r"--output .*a_file/run: cannot create the folder"):
        checkpoint.make_output_folder(tmp_path / "a_file" / "run", "--output")
    assert checkpoint.make_output_folder(tmp_path / "new" / "run", "--output").is_dir()


def test_read_only_output_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: pretend
    with pytest.raises(checkpoint.CheckpointError, match=r"output_dir .*: the folder is not writable"):
        checkpoint.make_output_folder(tmp_path, "output_dir")


def test_output_folder_needs_write_and_search_permission(tmp_path, monkeypatch):
    # a folder one may write but not enter (no x bit) cannot hold files either
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.X_OK)
    with pytest.raises(checkpoint.CheckpointError, match="not writable"):
        checkpoint.make_output_folder(tmp_path, "--output")


def test_output_folder_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert checkpoint.make_output_folder("~/runs/a", "--output") == tmp_path / "runs" / "a"
    assert (tmp_path / "runs" / "a").is_dir()


def test_run_folder_refusal_lets_go_and_overwrite_removes_the_earlier_checkpoints(tmp_path):
    earlier = [tmp_path / "checkpoints" / name for name in ("epoch_001.pt", "last.pt")]
    earlier[0].parent.mkdir()
    for path in earlier:
        path.write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match="already holds a run") as refused:
        checkpoint.RunFolder(tmp_path, resume=False, overwrite=False)
    # the refused run holds no lock: another process can take the folder at once
    take = "import fcntl, sys; fcntl.lockf(open(sys.argv[1], 'a+'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    lock = tmp_path / checkpoint.RunFolder.LOCK
    assert subprocess.run([sys.executable, "-c", take, str(lock)]).returncode == 0, refused
    # and its results: the metrics, pictures and periodic evaluations would pass for the new run's
    results = [tmp_path / "metrics.json", tmp_path / "loss_curves.png", tmp_path / "eval_epoch_002"]
    results[0].write_text("{}")
    results[1].write_bytes(b"png")
    (results[2] / "metrics.json").parent.mkdir()
    (results[2] / "metrics.json").write_text("{}")
    # `dpm-reid eval` of the earlier checkpoints (<run>/eval): its metrics and pictures, not a user's file there
    (tmp_path / "eval").mkdir()
    results += [tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "cmc.png"]
    for path in results[-2:]:
        path.write_bytes(b"{}")
    kept = [tmp_path / "notes.txt", tmp_path / "eval" / "notes.txt"]  # not the run's
    for path in kept:
        path.write_text("mine")
    folder = checkpoint.RunFolder(tmp_path, resume=False, overwrite=True)
    try:
        assert all(path.exists() for path in earlier + results)  # kept until the new run has set up
        assert folder.remove_earlier_run() == earlier + results
        assert not any(path.exists() for path in earlier + results) and folder.remove_earlier_run() == []
        assert all(path.exists() for path in kept)
    finally:
        folder.release()


def test_the_trainer_refuses_an_earlier_run_unless_told(tmp_path):
    from dpm_ops.engine import Trainer, load_config

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match="already holds a run"):
        Trainer(load_config("synthetic_dpm", ["train.device=cpu"]), tmp_path)  # overwrite defaults to False
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == b"x"


def test_the_trainer_checks_its_config_and_arguments_before_any_work(tmp_path):
    """A config edited after load_config is checked again (solver.optimizer 'lion' trained with SGD, a
    misspelt key was ignored, a missing section a KeyError); hooks, flags and the folder are checked too."""
    from dpm_ops.engine import ConfigError, Hook, Trainer, load_config

    def edited(edit):
        config = load_config("synthetic_dpm", ["train.device=cpu"])
        edit(config)
        return config

    for edit, needle in [
        (
            lambda c: c["solver"].update(optimizer="lion"),
            "config key solver.optimizer: 'lion' is not one of sgd, adamw",
        ),
        (lambda c: c["solver"].update(epocs=1), "unknown config key 'solver.epocs' in the config given"),
        (lambda c: c["solver"].update(epochs=-1), "config key solver.epochs: expected a value >= 0, got -1"),
        (lambda c: c.pop("solver"), "config has no solver section (a dict): start from load_config"),
        (lambda c: c["train"].update(seed="x"), "config key train.seed: expected int, got 'x'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            Trainer(edited(edit), tmp_path / "run")
    config = load_config("synthetic_dpm", ["train.device=cpu"])
    for arguments, needle in [
        (dict(hooks=[object()]), "hooks must be a list of Hook instances"),
        (dict(hooks=[Hook]), "hooks must be a list of Hook instances"),  # the class, not one
        (dict(hooks=None), "hooks must be a list of Hook instances"),
        (dict(resume="no"), "resume must be True, False or 'auto', got 'no'"),
        (dict(overwrite=1), "overwrite must be True or False, got 1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            Trainer(config, tmp_path / "run", **arguments)
    with pytest.raises(checkpoint.CheckpointError, match="output_dir must be a folder path, got None"):
        Trainer(config, None)
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_during_a_checkpoint_write_is_raised_after_it(tmp_path, monkeypatch):
    """SIGINT inside torch.save's writer came out as torch's 'unexpected pos' error, reported as a failed write
    (exit 2, not 130: 'interrupted'); now the write completes and the interrupt follows it."""
    import signal

    from dpm_ops.engine.checkpoint import make_checkpoint, save_checkpoint

    state = make_checkpoint("dpm", {}, {}, {"weight": torch.arange(3.0)})
    write = torch.save

    def interrupted_save(obj, handle):
        os.kill(os.getpid(), signal.SIGINT)
        write(obj, handle)

    monkeypatch.setattr(torch, "save", interrupted_save)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (xdist workers ignore it)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path / "last.pt", state)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.equal(torch.load(tmp_path / "last.pt")["model"]["weight"], torch.arange(3.0))


def test_a_second_run_of_the_same_process_is_refused_and_the_first_keeps_its_lock(tmp_path):
    """A process's record locks never conflict: a second Trainer on the folder in the same process was let in,
    and closing its handle (or an evaluation's check of the folder) dropped the first run's lock."""
    first = checkpoint.RunFolder(tmp_path, resume=False, overwrite=False)
    take = "import fcntl, sys; fcntl.lockf(open(sys.argv[1], 'a+'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    lock = tmp_path / checkpoint.RunFolder.LOCK
    try:
        with pytest.raises(checkpoint.CheckpointError, match="is in use by another training run"):
            checkpoint.RunFolder(tmp_path, resume=True, overwrite=False)
        with pytest.raises(checkpoint.CheckpointError, match="is in use by a training run"):
            checkpoint.check_not_a_run_folder(tmp_path, "--output")
        assert subprocess.run([sys.executable, "-c", take, str(lock)]).returncode != 0  # still held
    finally:
        first.release()
    checkpoint.RunFolder(tmp_path, resume=False, overwrite=False).release()
    assert subprocess.run([sys.executable, "-c", take, str(lock)]).returncode == 0
    # a run built, never run, then dropped (here inside a reference cycle, as a Trainer's hooks make one) frees it
    dropped = {"folder": checkpoint.RunFolder(tmp_path, resume=False, overwrite=False)}
    dropped["self"] = dropped
    del dropped
    checkpoint.RunFolder(tmp_path, resume=False, overwrite=False).release()
    checkpoint.check_not_a_run_folder(tmp_path, "--output")


def test_any_flipped_bit_loads_the_same_weights_or_is_one_checkpoint_error(tmp_path):
    """A damaged zip index escaped zipfile's check as its own errors (UnicodeDecodeError, NotImplementedError,
    'is encrypted'), naming no file; a flipped bit in a record's local header had torch.load read from a shifted
    offset: wrong weights, no error. Every single-bit flip either loads the same tensors or is refused."""
    written = checkpoint.make_checkpoint(
        "dpm",
        {"num_classes": 3, "num_cameras": 2, "options": {}},
        {"model": {}},
        {"a": torch.randn(40), "b": torch.arange(30.0)},
    )
    path = checkpoint.save_checkpoint(tmp_path / "last.pt", written)
    original = path.read_bytes()
    outcomes = set()
    for position in range(len(original)):
        for bit in (0x01, 0x80):
            damaged = bytearray(original)
            damaged[position] ^= bit
            path.write_bytes(damaged)
            try:
                loaded = checkpoint.read_checkpoint_file(path)
            except checkpoint.CheckpointError as error:
                assert str(path) in str(error) and "\n" not in str(error)
                outcomes.add("refused")
                continue
            outcomes.add("loaded")
            for key, tensor in written["model"].items():  # a loaded file holds what was written
                assert torch.equal(loaded["model"][key], tensor), (position, bit, key)
    assert outcomes == {"loaded", "refused"}


_FAILED_WRITES = """
import sys, torch
from pathlib import Path
from dpm_ops.engine.checkpoint import atomic_write_text, make_checkpoint, save_checkpoint
folder = Path(sys.argv[1])
big = make_checkpoint("dpm", {}, {}, {"weight": torch.zeros(100_000)})
for write in (lambda: save_checkpoint(folder / "last.pt", big), lambda: atomic_write_text(folder / "config.yaml", "x" * 100_000)):
    try:
        write()
    except OSError as error:
        print(error)
"""


def test_a_failed_write_names_its_file_and_keeps_the_earlier_one(tmp_path):
    """A full disk's error named no file ("[Errno 28] No space left on device"), or the hidden temporary's: the
    close of the temporary flushed again and its error replaced the first (torch's "unexpected pos" lost too)."""
    from dpm_ops.engine.checkpoint import atomic_write_text, make_checkpoint, save_checkpoint
    from engine_utils import run_with_file_size_limit

    save_checkpoint(tmp_path / "last.pt", make_checkpoint("dpm", {}, {}, {"weight": torch.ones(3)}))
    atomic_write_text(tmp_path / "config.yaml", "kept: 1\n")
    result = run_with_file_size_limit([sys.executable, "-c", _FAILED_WRITES, str(tmp_path)], 32_768)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint_line, config_line = result.stdout.splitlines()
    assert (
        checkpoint_line.endswith(f": '{tmp_path / 'last.pt'}'") and "writing the checkpoint failed" in checkpoint_line
    )
    assert config_line == f"[Errno 27] File too large: '{tmp_path / 'config.yaml'}'"
    assert torch.equal(torch.load(tmp_path / "last.pt")["model"]["weight"], torch.ones(3))
    assert (tmp_path / "config.yaml").read_text() == "kept: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "last.pt"]  # no temporary left
    # another file's error stays its own: the folder that is a file, not the metrics.json that does not exist
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileExistsError) as error:
        atomic_write_text(tmp_path / "afile" / "metrics.json", "{}")
    assert error.value.filename == str(tmp_path / "afile")
    # os.replace's error names the temporary and the destination: "path -> path" after the renaming
    (tmp_path / "folder" / "inside").mkdir(parents=True)
    with pytest.raises(OSError) as error:
        atomic_write_text(tmp_path / "folder", "{}")
    assert str(error.value).endswith(f": '{tmp_path / 'folder'}'") and "->" not in str(error.value)


def test_a_run_folder_removed_during_the_run_is_noticed(tmp_path):
    """A run whose folder was deleted recreated it at its next write, its logs went to deleted files, and a second
    run could start in it (the lock held was the deleted file's)."""
    import shutil

    (tmp_path / "run").mkdir()
    folder = checkpoint.RunFolder(tmp_path / "run", resume=False, overwrite=False)
    try:
        folder.check_held()
        shutil.rmtree(tmp_path / "run")
        with pytest.raises(checkpoint.CheckpointError, match=r"run was removed or replaced during the run"):
            folder.check_held()
        (tmp_path / "run").mkdir()
        checkpoint.RunFolder(tmp_path / "run", resume=False, overwrite=False).release()  # another run's lock file
        with pytest.raises(checkpoint.CheckpointError, match=r"run was removed or replaced during the run"):
            folder.check_held()
    finally:
        folder.release()
    folder.check_held()  # released: no longer the run's to check (an evaluation after the run)


def test_run_log_close_names_the_file_it_could_not_flush_and_closes_both(tmp_path):
    from dpm_ops.engine.run_log import RunLog

    log = RunLog(tmp_path, None, enabled=True)
    log.open(None)
    text = log._text

    class FullDisk:
        name = text.name

        def close(self):
            text.close()
            raise OSError(28, "No space left on device")

    jsonl, log._text = log._jsonl, FullDisk()
    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{tmp_path / 'train.log'}'")):
        log.close()
    assert jsonl.closed and text.closed and log._text is None
