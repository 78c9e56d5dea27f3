"""The run's logs: a resumed run continues train.log and drops the JSONL records past its checkpoint."""

import io
import json

from dpm_ops.engine.run_log import RunLog


def records(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_resume_keeps_the_text_log_and_the_records_up_to_its_step(tmp_path):
    folder = tmp_path / "run" / "nested"  # created, parents included
    log = RunLog(folder, io.StringIO(), enabled=True)
    log.open(None)
    log.message("first run")
    for step in (10, 20, 30):
        log.step({"step": step, "epoch": 1, "lr": 1e-3, "loss": 0.5, "loss/ce": 0.25, "loss/tri": 0.125}, "epoch 1")
    log.close()
    text = (folder / "train.log").read_text()
    assert "first run" in text and "epoch 1 step 30 lr 1.000e-03 loss 0.5000 (ce 0.2500 tri 0.1250)" in text

    resumed = RunLog(folder, io.StringIO(), enabled=True)
    resumed.open(20)  # the checkpoint of step 20: step 30 is logged again
    resumed.message("resumed")
    resumed.close()
    assert [r["step"] for r in records(folder)] == [10, 20]
    text = (folder / "train.log").read_text()
    assert "first run" in text and "epoch 1 step 30" in text and text.rstrip().endswith("resumed")

    fresh = RunLog(folder, io.StringIO(), enabled=True)
    fresh.open(None)  # a new run (--overwrite): both files start over
    fresh.close()
    assert (folder / "train.log").read_text() == "" and records(folder) == []


def test_other_ranks_write_nothing(tmp_path):
    log = RunLog(tmp_path / "run", io.StringIO(), enabled=False)
    log.open(None)
    log.message("ignored")
    log.step({"step": 1, "epoch": 1, "lr": 1.0, "loss": 1.0}, "epoch 1")
    log.close()
    assert not (tmp_path / "run").exists()
