"""Training engine on a tiny synthetic set (CPU): the loss falls, a killed run resumes bit-exactly,
DPM's two-pass update steps the right parameters, MaskReID runs both stages."""

import functools
import json
import math

import pytest
import torch

from dpm_ops.data.synth import generate_synthetic_dataset
from dpm_ops.engine import CheckpointError, Trainer, load_checkpoint, load_config, train
from dpm_ops.engine.run_log import RunLog
from engine_utils import tiny_config, tiny_synth_config, write_config


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("engine") / "set", tiny_synth_config(), progress=False)


def config_for(tmp_path, root, model="dpm", overrides=(), **sections):
    path = write_config(tmp_path / f"{model}.yaml", tiny_config(root, model, **sections))
    return load_config(str(path), list(overrides))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_run_loss_falls(tmp_path, tiny_root):
    config = config_for(
        tmp_path,
        tiny_root,
        overrides=["solver.epochs=6", "solver.base_lr=0.03", "input.erasing=0.0", "train.checkpoint_every_iters=0"],
    )
    result = train(config, tmp_path / "run")
    assert result["finished"]
    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    for record in records:
        assert isinstance(record["step"], int) and isinstance(record["epoch"], int)
        assert {"lr", "loss", "loss/id", "loss/hem", "loss/triplet"} <= set(record)  # id: both fused CE branches
        assert all(math.isfinite(v) for v in record.values())
    first = sum(r["loss"] for r in records[:4]) / 4
    last = sum(r["loss"] for r in records[-4:]) / 4
    assert last < 0.85 * first, (first, last)
    metrics = result["metrics"]
    assert {"all", "clean", "occluded"} <= set(metrics)
    assert (
        json.loads((tmp_path / "run" / "metrics.json").read_text())["all"]["num_query"] == metrics["all"]["num_query"]
    )
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Rank-1" in log and "epoch 6/6 done" in log
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt", model_name="dpm")
    assert "training" not in final and final["config"]["solver"]["epochs"] == 6


def record_logged_steps(monkeypatch):
    """The step of every record logged from now on (each step is logged once)."""
    logged, original = [], RunLog.step
    monkeypatch.setattr(
        RunLog, "step", lambda self, record, where: logged.append(record["step"]) or original(self, record, where)
    )
    return logged


def _final_weights(path):
    return load_checkpoint(path / "checkpoints" / "final.pt")["model"]


@pytest.mark.parametrize("model", ["dpm", "vit_baseline"])
def test_killed_run_resumes_bit_exactly(tmp_path, tiny_root, model, monkeypatch):
    config = config_for(tmp_path, tiny_root, model)
    full = train(config, tmp_path / "full")
    # the "kill": stop after 5 iterations without saving (the last checkpoint is from iteration 4)
    killed_config = config_for(tmp_path, tiny_root, model, overrides=["train.stop_after_iters=5"])
    killed = train(killed_config, tmp_path / "killed")
    assert not killed["finished"] and killed["global_step"] == 5
    last = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert last["training"]["progress"]["global_step"] == 4 and not last["training"]["progress"]["epoch_done"]
    # The resumed call trains steps 5.. only: a resume that silently started over (deterministic) also
    # ended with the full run's weights, metrics and log.
    logged = record_logged_steps(monkeypatch)
    resumed = train(config, tmp_path / "killed", resume=True)
    assert logged == list(range(5, full["global_step"] + 1))
    assert resumed["finished"] and resumed["global_step"] == full["global_step"]
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["metrics"] == full["metrics"]
    assert read_jsonl(tmp_path / "killed" / "train_log.jsonl") == read_jsonl(tmp_path / "full" / "train_log.jsonl")


def test_resume_from_epoch_end_with_workers(tmp_path, tiny_root, monkeypatch):
    """Stop right after an epoch's last batch; the data loader runs one worker (prefetching ahead)."""
    config = config_for(tmp_path, tiny_root, overrides=["dataloader.num_workers=1", "train.checkpoint_every_iters=3"])
    full = train(config, tmp_path / "full")
    per_epoch = full["global_step"] // 2
    stop = config_for(
        tmp_path,
        tiny_root,
        overrides=[
            "dataloader.num_workers=1",
            "train.checkpoint_every_iters=3",
            f"train.stop_after_iters={per_epoch + 1}",
        ],
    )
    train(stop, tmp_path / "killed")
    saved_step = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["training"]["progress"]["global_step"]
    assert saved_step >= per_epoch
    logged = record_logged_steps(monkeypatch)
    resumed = train(config, tmp_path / "killed", resume=True)
    assert logged == list(range(saved_step + 1, full["global_step"] + 1))  # continued, not started over
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"] == full["metrics"]


def test_resume_errors(tmp_path, tiny_root):
    config = config_for(tmp_path, tiny_root)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(config, tmp_path / "empty", resume=True)
    train(config_for(tmp_path, tiny_root, overrides=["train.stop_after_iters=2"]), tmp_path / "run")
    changed = config_for(tmp_path, tiny_root, overrides=["solver.base_lr=0.5"])
    with pytest.raises(CheckpointError, match="solver.base_lr"):
        train(changed, tmp_path / "run", resume=True)
    # a checkpoint from before the rename of pos_mode 'all' resumes under the new name
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["config"]["loss"]["ranking_pos_mode"] = "all"
    torch.save(state, last)
    with pytest.raises(
        CheckpointError, match="ranking_pos_mode is 'hardest' but the checkpoint was trained with 'all_eq5'"
    ):
        train(config, tmp_path / "run", resume=True)
    # a checkpoint from before a config key existed trained with what is now its default
    del state["config"]["train"]["deterministic"]
    torch.save(state, last)
    renamed = "loss.ranking_pos_mode=all_eq5"
    with pytest.raises(CheckpointError, match="deterministic is True but the checkpoint was trained with False"):
        train(
            config_for(tmp_path, tiny_root, overrides=[renamed, "train.deterministic=true"]),
            tmp_path / "run",
            resume=True,
        )
    train(config_for(tmp_path, tiny_root, overrides=[renamed]), tmp_path / "run", resume=True)
    other_model = config_for(tmp_path, tiny_root, "vit_baseline")
    with pytest.raises(CheckpointError, match="holds a 'dpm' model, not 'vit_baseline'"):
        train(other_model, tmp_path / "run", resume=True)


def test_dpm_two_pass_updates(tmp_path, tiny_root):
    """Pass 1 steps everything but the mask generator at the scheduled lr; pass 2 only the mask
    generator at a constant lr."""
    config = config_for(tmp_path, tiny_root, overrides=["solver.epochs=2", "solver.mask_lr=0.002"])
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    stage = trainer.stages[0]
    main, mask = stage.optimizers["main"], stage.optimizers["mask"]
    mask_ids = {id(p) for p in trainer.model.mask_generator.parameters()}
    assert all(id(p) not in mask_ids for g in main.param_groups for p in g["params"])
    assert {id(p) for g in mask.param_groups for p in g["params"]} == mask_ids
    assert [g["lr"] for g in mask.param_groups] == [0.002, 0.004]  # weights, biases (x2)
    assert set(stage.schedules) == {"main"}

    calls = []
    for name, opt in (("main", main), ("mask", mask)):
        original = opt.step
        opt.step = lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1]
    batch = next(iter(trainer.loaders["pk"]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    stage.step(trainer.step_context, batch)
    assert calls == ["main", "mask"]
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert any(n.startswith("mask_generator.") for n in changed)
    assert any(n.startswith("backbone.") for n in changed)
    assert "bottleneck.bias" not in changed
    trainer.fit()
    assert [g["lr"] for g in mask.param_groups] == [0.002, 0.004]
    assert main.param_groups[0]["lr"] == pytest.approx(0.002 * 0.01)  # t = E: lr_min


def test_maskreid_softmax_then_ranking(tmp_path, tiny_root):
    config = config_for(tmp_path, tiny_root, "maskreid")
    result = train(config, tmp_path / "run")
    assert result["finished"]
    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    assert "loss/softmax" in records[0] and "loss/ranking" in records[-1]
    assert records[-1]["epoch"] == 2  # epochs count on across the stages
    assert {"all", "clean", "occluded"} <= set(result["metrics"])


@pytest.mark.parametrize("model", ["dpm", "maskreid"])
def test_compiled_train_steps_follow_eager(tmp_path, tiny_root, model, monkeypatch):
    """train.compile: the steps call torch.compile's module (here its aot_eager backend: inductor's
    CPU code generation would take minutes) and train as eager does; checkpoints keep the plain
    model's keys, and a compiled run resumes an eager one."""
    overrides = ["model.options.drop_path_rate=0.0"] if model == "dpm" else []  # compiled RNG streams differ
    eager = train(config_for(tmp_path, tiny_root, model, overrides), tmp_path / "eager")
    modes, real_compile = [], torch.compile

    def compile_aot_eager(module, mode):
        modes.append(mode)
        return real_compile(module, mode=None, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    compiled_config = config_for(tmp_path, tiny_root, model, [*overrides, "train.compile=default"])
    compiled = train(compiled_config, tmp_path / "compiled")
    assert modes == ["default"] and compiled["global_step"] == eager["global_step"]
    ours, theirs = (read_jsonl(tmp_path / run / "train_log.jsonl") for run in ("compiled", "eager"))
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-4)
    a, b = _final_weights(tmp_path / "compiled"), _final_weights(tmp_path / "eager")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)
    train(config_for(tmp_path, tiny_root, model, [*overrides, "train.stop_after_iters=3"]), tmp_path / "resumed")
    resumed = train(compiled_config, tmp_path / "resumed", resume=True)
    assert resumed["finished"] and modes == ["default", "default"]
