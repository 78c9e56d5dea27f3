"""The CLI's paths and run folders: empty or undecodable paths, outputs that would replace a run's files,
system errors named by their argument, a dataset folder of query and gallery images alone, and the ends of a
command (Ctrl-C while starting, a reader that leaves the pipe)."""

import fcntl
import shutil
import subprocess
import sys

import pytest

from dpm_ops.cli import main
from engine_utils import scored, tiny_config, write_config
from test_cli import _fresh_checkpoint, _set_cameras, assert_one_line_error, tiny_set  # noqa: F401 (the fixture)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--config", "c", "--output", ""], "argument --output: expected a path, got ''"),
        (["eval", "--config", "c", "--weights", "w", "--output", ""], "argument --output: expected a path, got ''"),
        (["extract", "--config", "c", "--weights", "w", "--images", "", "--out", "f.npz"], "--images: expected a path"),
        (["rank", "--query", "", "--gallery", "g.npz"], "argument --query: expected a path, got ''"),
        (
            ["train", "--config", "c", "--output", "runs/a\udcff"],
            "--output: expected a UTF-8 path, got 'runs/a\\udcff'",
        ),
    ],
)
def test_empty_and_undecodable_paths_are_refused(capsys, argv, needle):
    """An empty --images searched the current folder and an empty --output took the default folder; a byte
    that is not UTF-8 in --output failed when the log wrote the path, after the whole run."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert_one_line_error(capsys, exit_info.value.code, needle)


def _trained_run(tmp_path, config):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "final.pt").write_bytes(_fresh_checkpoint(tmp_path, config).read_bytes())
    (run / "metrics.json").write_text("{}")
    return run


def test_eval_never_writes_into_a_training_run(tmp_path, tiny_set, capsys):  # noqa: F811
    """eval --output <a run folder> replaced the run's metrics.json and pictures, also while a train held it."""
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    run = _trained_run(tmp_path, config)
    weights = ["--config", str(config), "--weights", str(run / "checkpoints" / "final.pt")]
    code = main(["eval", *weights, "--output", str(run)])
    assert_one_line_error(capsys, code, f"--output {run} holds a training run (checkpoints/final.pt)")
    assert (run / "metrics.json").read_text() == "{}"
    busy = tmp_path / "busy"  # a run starting there: its lock, no checkpoint yet
    busy.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()", str(busy / ".run.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["eval", *weights, "--output", str(busy)])
        assert_one_line_error(capsys, code, f"--output {busy} is in use by a training run")
    finally:
        holder.communicate("")
    with open(busy / ".run.lock") as handle:  # released: the folder may be used
        fcntl.lockf(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    assert not (busy / "metrics.json").exists()


def _test_splits_alone(dataset, folder, *, masks=False, manifest=False):
    """A copy of the query and gallery folders of ``dataset`` (with their mask trees; its manifest), no train
    folder."""
    names = ["query", "bounding_box_test"]
    for name in names + ([f"{name}_seg" for name in names] if masks else []):
        shutil.copytree(dataset / name, folder / name)
    if manifest:
        shutil.copy(dataset / "synthetic.json", folder)
    return folder


MINE = ["dataset.name=market1501", "dataset.check_counts=off"]  # a folder of one's own images (README)


@pytest.mark.parametrize("model", ["dpm", "maskreid"])
def test_eval_scores_query_and_gallery_images_alone(tmp_path, tiny_set, model):  # noqa: F811
    """eval builds its model from the checkpoint (its classes and cameras) but read the train split: a folder of
    query and gallery images alone was refused ("no *.jpg images in .../bounding_box_train", or the layout's
    missing folder). MaskReID reads the test images' masks, and no train mask."""
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, model, eval={"max_rank": 10}))
    weights = _fresh_checkpoint(tmp_path, config)

    def evaluate(output, *overrides):
        argv = ["eval", "--config", str(config), "--weights", str(weights), "--output", str(tmp_path / output)]
        assert main([*argv, *overrides]) == 0
        return scored(tmp_path / output, weights)

    full = evaluate("full")
    masks = model == "maskreid"
    # the synthetic loader on the copy: its manifest's query and gallery counts still checked ("error")
    alone = _test_splits_alone(tiny_set, tmp_path / "synthetic_test", masks=masks, manifest=True)
    assert evaluate("synthetic_test", f"dataset.root={alone}") == full
    mine = _test_splits_alone(tiny_set, tmp_path / "mine", masks=masks)
    assert evaluate("mine", *MINE, f"dataset.root={mine}")["all"] == full["all"]  # Market names no occlusion
    (mine / "bounding_box_train").mkdir()  # an empty train folder is not read either
    assert evaluate("mine_empty_train", *MINE, f"dataset.root={mine}")["all"] == full["all"]


def _one_camera(state):
    """A model trained on one camera: no camera embedding."""
    state["model_args"].update(num_cameras=1)
    del state["model"]["backbone.sie_embed"]


def test_a_test_set_alone_needs_the_checkpoints_cameras(tmp_path, tiny_set, capsys):  # noqa: F811
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm", eval={"max_rank": 10}))
    mine = _test_splits_alone(tiny_set, tmp_path / "mine")
    overrides = [*MINE, f"dataset.root={mine}"]

    def evaluate(weights, *more):
        return main(
            ["eval", "--config", str(config), "--weights", str(weights), "--output", str(tmp_path / "ev"), *more]
        )

    # a test camera beyond the checkpoint's camera embedding: one line, before the extraction
    two = _fresh_checkpoint(tmp_path, config, _set_cameras(2), name="two.pt")
    code = evaluate(two, *overrides)
    assert_one_line_error(capsys, code, str(two), "has 2 camera embeddings (SIE", "camera ids up to 2 (3 cameras)")
    assert not (tmp_path / "ev" / "metrics.json").exists()
    # one training camera: no embedding, the test cameras are not read (it was refused as "1 camera embeddings")
    one = _fresh_checkpoint(tmp_path, config, _one_camera, name="one.pt")
    assert evaluate(one) == 0 and evaluate(one, *overrides) == 0
    # training still needs a train split, absent or empty
    train = ["train", "--config", str(config), "--output", str(tmp_path / "run"), *overrides]
    capsys.readouterr()
    code = main(train)
    assert_one_line_error(capsys, code, "Market-1501: no folder with bounding_box_train", "lacks bounding_box_train")
    (mine / "bounding_box_train").mkdir()
    assert_one_line_error(capsys, main(train), f"no *.jpg images in {mine / 'bounding_box_train'}")


def test_run_folder_problems_are_named_before_training(tmp_path, tiny_set, capsys):  # noqa: F811
    """A file named checkpoints in the run folder was an '[Errno 17] File exists' after the first epoch;
    an --output name too long for the system a bare '[Errno 36]' naming no argument."""
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm", solver={"epochs": 50}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    code = main(["train", "--config", str(config), "--output", str(run)])
    assert_one_line_error(capsys, code, f"{run / 'checkpoints'} is not a folder")
    long_name = tmp_path / ("x" * 300)
    code = main(["train", "--config", str(config), "--output", str(long_name)])
    assert_one_line_error(capsys, code, f"--output {long_name}", "ile name too long")


@pytest.mark.parametrize("port, shown", [("99999", "'99999'"), ("abc", "'abc'")])
def test_master_port_is_checked(tmp_path, tiny_set, capsys, monkeypatch, port, shown):  # noqa: F811
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_set, "dpm"))
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", port)
    code = main(["train", "--config", str(config), "--output", str(tmp_path / "run")])
    assert_one_line_error(
        capsys, code, f"environment variable MASTER_PORT must be an integer in [1, 65535], got {shown}"
    )


def test_interrupt_while_starting_is_one_line(monkeypatch, capsys):
    """Ctrl-C while torch was importing (before the commands' own handler) ended in a traceback."""
    import dpm_ops.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_parser", interrupted)
    assert main(["eval", "--config", "c", "--weights", "w"]) == 130
    assert capsys.readouterr().err == "dpm-reid: interrupted\n"


@pytest.mark.parametrize("command", [["dpm-reid", "configs"], [sys.executable, "-m", "dpm_ops", "configs"]])
def test_interrupt_while_torch_imports_is_one_line(command):
    """Ctrl-C while dpm_ops' package import loads torch, before cli.main runs: a KeyboardInterrupt traceback
    through the console script's import, now the command's line and exit code. The signal is sent once the
    process has mapped libtorch (inside `import torch`); a plain `import dpm_ops` still gets the interrupt."""
    import shutil
    import signal
    import time

    if command[0] == "dpm-reid" and shutil.which("dpm-reid") is None:
        pytest.skip("the dpm-reid script is not installed here")
    for argv, expect_line in ((command, True), ([sys.executable, "-c", "import dpm_ops"], False)):
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job's SIGINT is ignored
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(f"/proc/{process.pid}/maps") as maps:
                if "libtorch" in maps.read():
                    break
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        if expect_line:
            assert (process.returncode, err) == (130, "dpm-reid: interrupted\n")
        else:
            assert "KeyboardInterrupt" in err


def test_a_reader_that_leaves_the_pipe_is_no_error():
    """`dpm-reid configs | head -1` ended in a BrokenPipeError traceback."""
    done = subprocess.run(
        f"{sys.executable} -m dpm_ops configs | true", shell=True, capture_output=True, text=True, timeout=120
    )
    assert done.stderr == "", done.stderr
