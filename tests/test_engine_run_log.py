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


def test_a_torn_last_record_is_dropped_on_resume(tmp_path):
    """A crash or a full disk can tear the last JSONL line (flushed, not synced): --resume failed with json's
    "Unterminated string ..." naming nothing. The torn tail is dropped; a bad line before good ones is named."""
    import pytest

    from dpm_ops.engine import CheckpointError

    jsonl = tmp_path / "train_log.jsonl"
    good = [json.dumps({"step": step, "loss": 1.0}) for step in (1, 2)]
    for tail in ('{"step": 3, "lo', "\0\0\0\0", '{"step": 3, "lo\n\0\0'):
        jsonl.write_text("\n".join(good) + "\n" + tail)
        log = RunLog(tmp_path, io.StringIO(), enabled=True)
        log.open(5)
        log.close()
        assert [r["step"] for r in records(tmp_path)] == [1, 2]
    jsonl.write_text(good[0] + "\n" + '{"step": 2, "lo' + "\n" + good[1] + "\n")
    with pytest.raises(CheckpointError, match=rf"^{jsonl}: line 2 is not a logged step's JSON record; remove it"):
        RunLog(tmp_path, io.StringIO(), enabled=True).open(5)
    assert jsonl.read_text().count("\n") == 3  # left as it was
