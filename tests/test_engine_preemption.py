"""SIGTERM (a cluster's preemption or time limit, torchrun's forwarding of it): the run finishes its step, writes
last.pt there and stops; resumed, it ends bit-identical to a run never stopped. From the command line: one line,
exit code 143, the DataLoader workers outliving a SIGTERM sent to the whole process group."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpm_ops.data.synth import generate_synthetic_dataset
from dpm_ops.cli import main
from dpm_ops.engine import Hook, load_checkpoint, load_config, train
from engine_utils import tiny_config, tiny_synth_config, write_config


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("preempt") / "set", tiny_synth_config(), progress=False)


def config_for(tmp_path, root, overrides=()):
    path = write_config(tmp_path / "dpm.yaml", tiny_config(root, "dpm"))
    return load_config(str(path), ["train.eval_period=1", *overrides])


class SigtermAt(Hook):
    """SIGTERM to this process after step ``step`` (before the checkpoint hooks of that step run)."""

    def __init__(self, step):
        self.step = step

    def after_step(self, trainer, at, losses):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def progress(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["training"]["progress"]


@pytest.mark.parametrize("where", ["mid-epoch", "epoch end"])
def test_sigterm_stops_after_its_step_with_a_checkpoint_there_and_the_resume_is_bit_exact(tmp_path, tiny_root, where):
    config = config_for(tmp_path, tiny_root, ["train.checkpoint_every_iters=0"])  # no checkpoint but the stop's
    full = train(config, tmp_path / "full")
    per_epoch = full["global_step"] // config["solver"]["epochs"]
    step = 2 if where == "mid-epoch" else per_epoch
    before = signal.getsignal(signal.SIGTERM)
    stopped = train(config, tmp_path / "stopped", hooks=[SigtermAt(step)])
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone with it
    assert not stopped["finished"] and stopped["global_step"] == step
    assert stopped["stop_reason"] == f"stopped by SIGTERM after {step} iterations: last.pt written there"
    assert progress(tmp_path / "stopped")["global_step"] == step
    assert progress(tmp_path / "stopped")["epoch_done"] == (where == "epoch end")
    assert not (tmp_path / "stopped" / "eval_epoch_001").exists()  # left to the resumed run
    resumed = train(config, tmp_path / "stopped", resume=True)
    assert resumed["finished"] and resumed["metrics"] == full["metrics"]
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "final.pt")["model"] for run in ("full", "stopped"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert json.loads((tmp_path / "stopped" / "eval_epoch_001" / "metrics.json").read_text())


def test_a_sigterm_handler_of_the_callers_own_is_left_in_charge(tmp_path, tiny_root):
    config = config_for(tmp_path, tiny_root)
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        result = train(config, tmp_path / "run", hooks=[SigtermAt(2)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result["finished"] and received == [signal.SIGTERM]


def test_auto_resume_starts_a_new_run_and_continues_a_stopped_one(tmp_path, tiny_root):
    """--auto-resume, for the command line a scheduler runs again when it requeues the job: without a last.pt it
    starts (as without the flag), with one it resumes (as --resume); a folder holding checkpoints but no last.pt
    stays refused (a run there, not one to go on with)."""
    config = write_config(tmp_path / "dpm.yaml", tiny_config(tiny_root, "dpm"))
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--output", str(run), "--auto-resume"]
    assert main([*argv, "train.stop_after_iters=3", "train.checkpoint_every_iters=2"]) == 0
    assert progress(run)["global_step"] == 2
    assert main(argv) == 0
    assert "resumed from" in (run / "train.log").read_text() and (run / "checkpoints" / "final.pt").is_file()
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one record a step: the stopped run's log, continued
    (run / "checkpoints" / "last.pt").unlink()
    assert main(argv) == 2  # final.pt is a run's: refused, not overwritten


def sigterm_the_job(tmp_path, root, launcher: list) -> tuple[int, str, Path]:
    """Start ``launcher + dpm-reid train`` (a long run, two DataLoader workers) in a session of its own, and send its
    whole process group SIGTERM, as SLURM's scancel does, once two steps are logged; its exit code and stderr."""
    config = write_config(tmp_path / "dpm.yaml", tiny_config(root, "dpm"))
    run = tmp_path / "run"
    argv = [*launcher, "train", "--config", str(config), "--output", str(run), "solver.epochs=1000"]
    argv += ["dataloader.num_workers=2", "train.checkpoint_every_iters=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log, deadline = run / "train_log.jsonl", time.monotonic() + 240
    while not (log.is_file() and log.read_text().count("\n") >= 2):  # training, its workers running
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-4000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    return process.returncode, stderr, run


def stopped_line(step: int) -> str:
    return f"dpm-reid: stopped by SIGTERM after {step} iterations: last.pt written there (resume with --resume)"


def test_cli_sigterm_to_the_process_group_stops_with_one_line_and_exit_143(tmp_path, tiny_root):
    """The DataLoader workers get it too: they died, and the training process with them, on "DataLoader worker
    (pid ...) is killed by signal: Terminated" (a traceback, exit 1, no checkpoint)."""
    returncode, stderr, run = sigterm_the_job(tmp_path, tiny_root, [sys.executable, "-m", "dpm_ops"])
    assert returncode == 143, stderr[-4000:]
    assert stderr.strip().splitlines()[-1] == stopped_line(progress(run)["global_step"])


def test_torchrun_ranks_stop_at_the_same_step(tmp_path, tiny_root):
    """torchrun forwards SIGTERM to its ranks (and the group's SIGTERM reaches them too), each at its own moment:
    every rank stops after the same step, whose last.pt they write together. torchrun itself then exits 1 with
    its own SignalException traceback (torch's launcher)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dpm_ops"]
    returncode, stderr, run = sigterm_the_job(tmp_path, tiny_root, launcher)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["training"]
    assert saved["world_size"] == 2
    assert stderr.count(stopped_line(saved["progress"]["global_step"])) == 2, stderr[-4000:]
