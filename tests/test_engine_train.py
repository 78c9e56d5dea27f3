"""Training engine on a tiny synthetic set (CPU): the loss falls, a killed run resumes bit-exactly,
DPM's two-pass update steps the right parameters, MaskReID runs both stages."""

import json
import os
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from dpm_ops.data.synth import generate_synthetic_dataset
from dpm_ops.engine import (
    CheckpointError,
    ConfigError,
    Hook,
    Trainer,
    TrainingDiverged,
    load_checkpoint,
    load_config,
    train,
)
from dpm_ops.engine.run_log import RunLog
from dpm_ops.losses import MaskReIDRankingLoss
from engine_utils import flip_a_tensor_bit, tiny_config, tiny_synth_config, write_config


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


@pytest.mark.parametrize("model", ["dpm", "maskreid"])
def test_loader_workers_do_not_change_the_training(tmp_path, tiny_root, model):
    """One process trains the same weights loading in two workers as in its own process: each sample's
    augmentation is seeded by the sampler, not by the worker that loads it (2 ranks: test_engine_ddp)."""
    runs = {
        w: train(config_for(tmp_path, tiny_root, model, [f"dataloader.num_workers={w}"]), tmp_path / f"w{w}")
        for w in (0, 2)
    }
    a, b = _final_weights(tmp_path / "w0"), _final_weights(tmp_path / "w2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0]["metrics"] == runs[2]["metrics"]


def test_resumed_log_drops_later_steps_by_replacing_the_file(tmp_path):
    """On resume the JSONL log keeps the steps up to the checkpoint. It is rewritten into a new file that
    replaces the old one, so a kill during the rewrite leaves the earlier log whole, and a reader that
    opened it before still reads every line it had."""
    log = RunLog(tmp_path, stream=None, enabled=True)
    log.open(resume_step=None)
    for step in (1, 2, 3):
        log.step({"step": step, "epoch": 0, "lr": 0.1, "loss": 1.0 / step}, "train")
    log.close()
    path = tmp_path / "train_log.jsonl"
    with open(path, encoding="utf-8") as reader:
        log.open(resume_step=2)
        log.close()
        assert len(reader.read().splitlines()) == 3
    assert [record["step"] for record in read_jsonl(path)] == [1, 2]
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_errors(tmp_path, tiny_root):
    config = config_for(tmp_path, tiny_root)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(config, tmp_path / "empty", resume=True)
    train(config_for(tmp_path, tiny_root, overrides=["train.stop_after_iters=2"]), tmp_path / "run")
    changed = config_for(tmp_path, tiny_root, overrides=["solver.base_lr=0.5"])
    # the message points at the run's own config (a resume with the built-in config lost the run's overrides)
    with pytest.raises(
        CheckpointError,
        match=r"solver.base_lr .*\(the run's own settings: --config \S*run/config.yaml --output \S*run\)$",
    ):
        train(changed, tmp_path / "run", resume=True)
    # keys the model or the run's choices do not read are not compared (earlier runs stored whatever the config
    # held: the ranking loss's for DPM, poly_power under warmup_cosine)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["config"]["loss"]["ranking_pos_mode"] = "all"
    state["config"]["solver"]["poly_power"] = 3.0
    # a checkpoint from before a config key existed trained with what is now its default
    del state["config"]["train"]["deterministic"]
    torch.save(state, last)
    with pytest.raises(CheckpointError, match="deterministic is True but the checkpoint was trained with False"):
        train(config_for(tmp_path, tiny_root, overrides=["train.deterministic=true"]), tmp_path / "run", resume=True)
    # a checkpoint from before the recipe-dependent input keys stored a default for one its model does not use
    state["config"]["input"]["resize"] = [160, 64]
    torch.save(state, last)
    train(config, tmp_path / "run", resume=True)
    other_model = config_for(tmp_path, tiny_root, "vit_baseline")
    with pytest.raises(CheckpointError, match="holds a 'dpm' model, not 'vit_baseline'"):
        train(other_model, tmp_path / "run", resume=True)
    state = load_checkpoint(last)
    state["training"]["world_size"] = 2
    torch.save(state, last)
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\), this run has 1"):
        train(config, tmp_path / "run", resume=True)
    del state["training"]  # a final.pt (weights only) copied over last.pt
    torch.save(state, last)
    with pytest.raises(CheckpointError, match=r"last.pt holds weights only, no training state$"):
        train(config, tmp_path / "run", resume=True)
    # a damaged last.pt (torch.load reads it) is refused, and the run's earlier checkpoints are named
    train(config_for(tmp_path, tiny_root, overrides=["train.stop_after_iters=2"]), tmp_path / "damaged")
    last = tmp_path / "damaged" / "checkpoints" / "last.pt"
    shutil.copy(last, last.with_name("epoch_001.pt"))
    flip_a_tensor_bit(last)
    with pytest.raises(
        CheckpointError, match=r"last.pt is damaged: .*; to resume from an earlier checkpoint, copy one of epoch_001.pt"
    ):
        train(config, tmp_path / "damaged", resume=True)


def test_resume_mid_epoch_refuses_training_data_that_changed(tmp_path, tiny_root):
    # the checkpoint's sampler position counts the batches of the data it was saved with: with an image
    # less, the same position named other batches and the run went on silently
    root = tmp_path / "set"
    shutil.copytree(tiny_root, root)
    config = config_for(tmp_path, root, overrides=["train.stop_after_iters=2", "dataset.check_counts=off"])
    train(config, tmp_path / "run")
    removed = sorted((root / "bounding_box_train").glob("*.jpg"))[0]
    removed.unlink()
    mask = root / "masks" / "bounding_box_train" / removed.with_suffix(".png").name
    if mask.exists():
        mask.unlink()
    resumed = config_for(tmp_path, root, overrides=["dataset.check_counts=off"])
    message = r"--resume: .*last.pt: sampler state was saved by another sampling plan \(images (\d+) -> (\d+), labels "
    with pytest.raises(CheckpointError, match=message) as error:
        train(resumed, tmp_path / "run", resume=True)
    before, after = map(int, re.search(r"images (\d+) -> (\d+)", str(error.value)).groups())
    assert before == after + 1 and str(error.value).endswith("(has the training data changed?)")


def test_a_diverged_run_stops_and_keeps_its_good_checkpoints(tmp_path, tiny_root):
    # NaN weights used to reach the next step's ops ("features contains non-finite values", nothing said of
    # the training) and, at a checkpoint step, to overwrite last.pt: the run was lost with its weights.
    class Poison(Hook):  # at step 4, between its update and its checkpoint, one weight turns NaN
        def after_step(self, trainer, at, losses):
            if trainer.global_step == 4:
                with torch.no_grad():
                    next(trainer.model.parameters()).view(-1)[0] = float("nan")

    config = config_for(tmp_path, tiny_root, overrides=["train.checkpoint_every_iters=2"])
    with pytest.raises(
        TrainingDiverged, match=r"^training diverged at step 4: the weights hold NaN or inf; the checkpoints"
    ):
        train(config, tmp_path / "run", hooks=[Poison()])
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["training"]["progress"]["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    # the optimizer can break the weights within a step too: a huge learning rate, at the first step
    diverging = config_for(tmp_path, tiny_root, overrides=["solver.base_lr=1e8"])
    with pytest.raises(
        TrainingDiverged, match=r"^training diverged at step 1: .*\(a lower solver.base_lr may train\)$"
    ):
        train(diverging, tmp_path / "diverging")
    assert not list((tmp_path / "diverging" / "checkpoints").glob("*.pt"))


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


def test_maskreid_softmax_stage_alone_then_ranking_from_its_weights(tmp_path, tiny_root, monkeypatch):
    """The paper's two runs (maskreid.md §5): softmax alone (solver.epochs 0: Table 1's runs on the JSTL merge,
    MaskReID_soft), then the ranking stage started from its weights (model.pretrained, no softmax head)."""
    settings = tiny_config(tiny_root, "maskreid")
    settings.update(solver={"epochs": 0}, sampler={"kind": "pk", "num_ids": 4, "num_instances": 2})
    softmax = load_config(str(write_config(tmp_path / "softmax.yaml", settings)))
    first = train(softmax, tmp_path / "softmax")
    records = read_jsonl(tmp_path / "softmax" / "train_log.jsonl")
    assert first["finished"] and all("loss/softmax" in r and "loss/ranking" not in r for r in records)
    assert records[-1]["epoch"] == 1 and {"all", "clean", "occluded"} <= set(first["metrics"])
    weights = tmp_path / "softmax" / "checkpoints" / "final.pt"
    trunk = {k: v for k, v in load_checkpoint(weights)["model"].items() if ".classifier." not in f".{k}"}
    ranking = config_for(
        tmp_path, tiny_root, "maskreid", [f"model.pretrained={weights}"], pretrain={"epochs": 0}, solver={"epochs": 1}
    )
    started, fit = {}, Trainer.fit

    def recording_fit(trainer):  # the weights the ranking stage starts from
        started.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return fit(trainer)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    second = train(ranking, tmp_path / "ranking")
    assert second["finished"] and "loss/ranking" in read_jsonl(tmp_path / "ranking" / "train_log.jsonl")[0]
    assert started.keys() == trunk.keys() and all(torch.equal(started[k], trunk[k]) for k in trunk)
    with pytest.raises(ConfigError, match="solver.epochs: 0 trains nothing; it is for MaskReID's softmax pre"):
        config_for(tmp_path, tiny_root, "dpm", ["solver.epochs=0"])


def test_maskreid_triplet_stage_mines_the_whole_p_x_k_batch(tmp_path, tiny_root, monkeypatch):
    """loss.maskreid_loss triplet (Table 2's MaskReID_trip): the stage after the pre-training trains the batch-hard
    soft-margin triplet on the embedding of P x K batches, gathered over the ranks (here one: the batch itself)."""
    from dpm_ops.engine import distributed

    gathered, gather = [], distributed.gather_batch
    monkeypatch.setattr(distributed, "gather_batch", lambda *args: gathered.append(len(args[1])) or gather(*args))
    settings = tiny_config(tiny_root, "maskreid")
    settings["sampler"] = {"kind": "pk", "num_ids": 4, "num_instances": 2}
    settings["loss"] = {"maskreid_loss": "triplet"}
    result = train(load_config(str(write_config(tmp_path / "trip.yaml", settings))), tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    triplet = [r for r in records if "loss/triplet" in r]
    assert result["finished"] and triplet and not any("loss/ranking" in r for r in records)
    assert "loss/softmax" in records[0] and "triplet epoch 1 iter 1/5" in (tmp_path / "run" / "train.log").read_text()
    assert gathered == [8] * len(triplet)  # every triplet step, on the whole 4 x 2 batch
    with pytest.raises(ConfigError, match="sampler.kind: loss.maskreid_loss triplet mines each anchor's hardest"):
        config_for(tmp_path, tiny_root, "maskreid", ["loss.maskreid_loss=triplet"])
    with pytest.raises(
        ConfigError, match="loss.ranking_alpha: read only by the ranking loss's Eq. 5 .*maskreid_loss is"
    ):
        load_config(str(tmp_path / "trip.yaml"), ["loss.ranking_alpha=0.1"])


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


@pytest.mark.parametrize("model, amp", [("dpm", "bf16"), ("vit_baseline", "fp16"), ("maskreid", "bf16")])
def test_amp_trains_under_autocast_and_evaluates_in_fp32(tmp_path, tiny_root, model, amp, monkeypatch):
    """solver.amp on the CPU: every train step's forward runs under autocast (both DPM passes, both
    MaskReID stages), the evaluation after training does not (eval.amp off: the official code tests in
    fp32); the losses stay finite."""
    modes, forward = [], torch.nn.Linear.forward

    def recording(self, x):
        modes.append((self.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    result = train(config_for(tmp_path, tiny_root, model, [f"solver.amp={amp}"]), tmp_path / "run")
    assert result["finished"] and all(
        math.isfinite(r["loss"]) for r in read_jsonl(tmp_path / "run" / "train_log.jsonl")
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert {(on, d) for training, on, d in modes if training} == {(True, dtype)}
    assert {on for training, on, _ in modes if not training} == {False}


def test_dpm_stage_takes_its_solver_settings(tmp_path, tiny_root):
    config = config_for(
        tmp_path,
        tiny_root,
        overrides=["solver.momentum=0.8", "solver.weight_decay_bias=0.0", "solver.min_lr_factor=0.01"],
    )
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    stage = trainer.stages[0]
    main, mask = stage.optimizers["main"], stage.optimizers["mask"]
    assert [(g["momentum"], g["weight_decay"]) for g in main.param_groups] == [(0.8, 1e-4), (0.8, 0.0)]
    assert [g["lr"] for g in mask.param_groups] == [0.01, 0.02]  # mask_lr unset: base_lr
    schedule = stage.schedules["main"]
    assert (schedule.warmup, schedule.lr_min) == (1, pytest.approx(0.01 * 0.01))
    assert type(trainer.dataset.transform.transforms[-1]).__name__ == "RandomErasing"
    no_erasing = config_for(tmp_path, tiny_root, overrides=["input.erasing=0.0"])
    assert type(trainer.recipe.train_transform(no_erasing).transforms[-1]).__name__ != "RandomErasing"
    # the logged loss is pass 1's weighted sum of the logged terms (dpm.md: λ_HEM 0.1, outer weights 1)
    losses = stage.step(trainer.step_context, next(iter(trainer.loaders["pk"])))
    expected = losses["loss/id"] + 0.1 * losses["loss/hem"] + losses["loss/triplet"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("model", ["dpm", "vit_baseline", "maskreid"])
def test_adamw_option_builds_adamw_with_each_groups_settings(tmp_path, tiny_root, model):
    overrides = ["solver.optimizer=adamw", "solver.weight_decay=0.05", "solver.weight_decay_bias=0.0"]
    trainer = Trainer(config_for(tmp_path, tiny_root, model, overrides=overrides), tmp_path / "run")
    trainer.setup()
    stage = trainer.stages[0]
    for name, optimizer in stage.optimizers.items():
        assert type(optimizer) is torch.optim.AdamW
        # weights / biases; DPM's mask generator all at the bias decay, as the official make_optimizer
        assert {g["weight_decay"] for g in optimizer.param_groups} == ({0.0} if name == "mask" else {0.05, 0.0})
    before = [p.detach().clone() for p in stage.optimizers["main"].param_groups[0]["params"]]
    losses = stage.step(trainer.step_context, next(iter(trainer.loaders[stage.sampler_kind])))
    assert math.isfinite(losses["loss"].item())
    after = stage.optimizers["main"].param_groups[0]["params"]
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


def test_dpm_one_pass_steps_both_optimizers(tmp_path, tiny_root):
    trainer = Trainer(config_for(tmp_path, tiny_root, overrides=["solver.two_pass=false"]), tmp_path / "run")
    trainer.setup()
    attfc = trainer.model.mask_generator.attfc.weight.detach().clone()
    losses = trainer.stages[0].step(trainer.step_context, next(iter(trainer.loaders["pk"])))
    assert "loss/pass2" not in losses
    assert not torch.equal(attfc, trainer.model.mask_generator.attfc.weight)
    # each step's gradients are that step's own: none carried over from the step before
    weight = trainer.model.mask_generator.attfc.weight
    seen = []
    weight.register_hook(lambda grad: seen.append(grad.clone()))
    trainer.stages[0].step(trainer.step_context, next(iter(trainer.loaders["pk"])))
    assert torch.equal(weight.grad, seen[-1])


def test_maskreid_stages_take_their_own_settings(tmp_path, tiny_root):
    config = config_for(tmp_path, tiny_root, "maskreid", overrides=["pretrain.base_lr=0.05", "solver.poly_power=0.9"])
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    pretrain, ranking = trainer.stages
    assert pretrain.optimizers["main"].param_groups[0]["initial_lr"] == 0.05
    assert ranking.optimizers["main"].param_groups[0]["initial_lr"] == 0.01
    for stage, base_lr in ((pretrain, 0.05), (ranking, 0.01)):
        schedule = stage.schedules["main"]
        iterations = stage.epochs * len(trainer.samplers[stage.sampler_kind])
        assert (schedule.kind, schedule.total, schedule.power) == ("poly", iterations, 0.9)  # poly: per iteration
        assert schedule.lr_min == pytest.approx(0.002 * base_lr)
    classifier = {id(p) for n, p in trainer.model.named_parameters() if ".classifier." in n}
    ranked = {id(p) for g in ranking.optimizers["main"].param_groups for p in g["params"]}
    assert classifier and not classifier & ranked  # the softmax head is not trained by the ranking loss
    assert trainer.recipe.find_unused_parameters(trainer.model_args)  # DDP: the head idles in stage 2
    # DGD's test geometry: resize to the crop plus (16, 8), then centre-crop
    assert trainer.recipe.test_transform(None).transforms[0].size == (160, 64)
    no_pretrain = Trainer(config_for(tmp_path, tiny_root, "maskreid", pretrain={"epochs": 0}), tmp_path / "run2")
    no_pretrain.setup()
    assert no_pretrain.model_args["num_classes"] == 0 and len(no_pretrain.stages) == 1


def test_stage_epochs_checkpoints_evaluations_and_log_lines(tmp_path, tiny_root):
    """MaskReID: pretrain (epoch 1) then ranking (epoch 2), counted across the stages."""
    config = config_for(
        tmp_path,
        tiny_root,
        "maskreid",
        overrides=["train.log_period=1000", "train.checkpoint_period=1", "train.eval_period=1"],
    )
    train(config, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]  # log_period > the epoch: its last step is logged
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "epoch_001.pt").is_file() and (checkpoints / "epoch_002.pt").is_file()
    assert (tmp_path / "run" / "eval_epoch_001").is_dir()  # the pretrain stage's end is no run end
    assert not (tmp_path / "run" / "eval_epoch_002").exists()  # the run's own evaluation
    # poly, stepped per iteration from t = 0: the ranking epoch's last step has t = n - 1 of n
    ranking_steps = records[1]["step"] - records[0]["step"]
    assert records[1]["lr"] == pytest.approx(0.01 * (1 / ranking_steps) ** 0.5)


def test_periods_count_the_epochs_of_the_run_across_its_stages(tmp_path, tiny_root):
    """MaskReID's 1 pre-training + 3 ranking epochs: every 2nd epoch of the run is 2 and 4 (the ranking stage's 1st
    and 3rd); they counted each stage's epochs (3 only: the ranking stage's 2nd)."""
    periods = ["train.log_period=1000", "train.checkpoint_period=2", "train.eval_period=2", "solver.epochs=3"]
    train(config_for(tmp_path, tiny_root, "maskreid", overrides=periods), tmp_path / "run")
    kept = sorted(path.name for path in (tmp_path / "run" / "checkpoints").glob("epoch_*.pt"))
    assert kept == ["epoch_002.pt", "epoch_004.pt"]
    evaluated = sorted(path.name for path in (tmp_path / "run").glob("eval_epoch_*"))
    assert evaluated == ["eval_epoch_002"]  # epoch 4 ends the run: its evaluation is the run's own


def test_periodic_evaluation_does_not_change_the_training(tmp_path, tiny_root, monkeypatch):
    plain = train(config_for(tmp_path, tiny_root), tmp_path / "plain")
    evaluate = Trainer.evaluate  # an evaluation that draws random numbers (pictures may pick queries)
    monkeypatch.setattr(Trainer, "evaluate", lambda self, **kw: (torch.rand(3), evaluate(self, **kw))[1])
    evaluated = train(config_for(tmp_path, tiny_root, overrides=["train.eval_period=1"]), tmp_path / "evaluated")
    assert (tmp_path / "evaluated" / "eval_epoch_001").is_dir()
    a, b = _final_weights(tmp_path / "plain"), _final_weights(tmp_path / "evaluated")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain["metrics"] == evaluated["metrics"]


def test_resume_after_an_epoch_end_and_into_a_later_stage(tmp_path, tiny_root, monkeypatch):
    """last.pt written at epoch 1's end resumes with the next epoch (for MaskReID: the ranking stage,
    its epochs still counted across the stages). Evaluation settings may change on resume."""
    for model in ("dpm", "maskreid"):
        full = train(config_for(tmp_path, tiny_root, model, ["train.checkpoint_every_iters=0"]), tmp_path / model)
        full_log = read_jsonl(tmp_path / model / "train_log.jsonl")
        epoch_end = next(r["step"] for r in full_log if r["epoch"] == 2) - 1
        # killed one step into epoch 2: the last checkpoint is epoch 1's end
        every = "train.checkpoint_every_iters=0"
        killed = config_for(tmp_path, tiny_root, model, [every, f"train.stop_after_iters={epoch_end + 1}"])
        train(killed, tmp_path / f"{model}_killed")
        logged = record_logged_steps(monkeypatch)
        resumed = config_for(tmp_path, tiny_root, model, [every, "eval.batch_size=32"])
        train(resumed, tmp_path / f"{model}_killed", resume=True)
        assert logged == list(range(epoch_end + 1, full["global_step"] + 1)), model
        assert read_jsonl(tmp_path / f"{model}_killed" / "train_log.jsonl") == full_log, model
        monkeypatch.undo()


def same_draws_forward(trainer, forward):
    """``forward()`` without gradients, leaving the RNG as it found it (the step's own forward then
    draws the same drop-path / dropout masks)."""
    state = torch.get_rng_state()
    with torch.no_grad():
        out = forward()
    torch.set_rng_state(state)
    return out


def test_step_losses_take_the_configured_weights(tmp_path, tiny_root):
    # DPM: plain_weight 1, masked_weight 0 -> the ID term is the plain CE of f_bn Wᵀ
    config = config_for(tmp_path, tiny_root, overrides=["loss.plain_weight=1.0", "loss.masked_weight=0.0"])
    trainer = Trainer(config, tmp_path / "dpm")
    trainer.setup()
    batch = next(iter(trainer.loaders["pk"]))
    out = same_draws_forward(trainer, lambda: trainer.model(batch["image"], batch["camid"], batch["pid"]))
    losses = trainer.stages[0].step(trainer.step_context, batch)
    plain = F.cross_entropy(out.bn_feature @ out.weight.T, batch["pid"])
    assert losses["loss/id"].item() == pytest.approx(plain.item(), rel=1e-3)  # no_grad attention may differ in rounding
    # MaskReID: the ranking loss with the config's lambda
    config = config_for(tmp_path, tiny_root, "maskreid", ["loss.ranking_lambda=0.5"], pretrain={"epochs": 0})
    trainer = Trainer(config, tmp_path / "maskreid")
    trainer.setup()
    batch = next(iter(trainer.loaders["maskreid"]))
    out = same_draws_forward(trainer, lambda: trainer.model(batch["image"], batch["masked"]))
    losses = trainer.stages[0].step(trainer.step_context, batch)
    options = {k: config["loss"][f"ranking_{k}"] for k in ("alpha", "neg_mode", "pos_mode")}
    expected = MaskReIDRankingLoss(lam=0.5, **options)(out.embedding, batch["pid"])
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-3)


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_settings_are_the_official_scripts_by_default(tmp_path, monkeypatch, deterministic):
    """The official DPM train.py sets cuDNN deterministic and benchmark on; train.deterministic=true asks for
    torch's deterministic algorithms instead (benchmark off). The seed is set either way."""
    from dpm_ops.engine import Trainer

    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "deterministic", False)
    monkeypatch.setattr(cudnn, "benchmark", False)
    called = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *args, **kwargs: called.append(args))
    config = load_config("synthetic_dpm", ["train.device=cpu", f"train.deterministic={str(deterministic).lower()}"])
    trainer = Trainer(config, tmp_path / "run")
    try:
        trainer._seed()
    finally:
        trainer.run_folder.release()
    assert (cudnn.deterministic, cudnn.benchmark, called) == (
        (False, False, [(True,)]) if deterministic else (True, True, [])
    )
    assert torch.initial_seed() == config["train"]["seed"]


def test_a_kill_during_the_periodic_evaluation_or_an_epoch_checkpoint_loses_nothing(tmp_path, tiny_root, monkeypatch):
    """The epoch's last.pt is written before its evaluation: a run killed during eval_epoch_001 resumed at epoch 2
    and never wrote it. The resumed run now evaluates that epoch first. epoch_NNN.pt is written before last.pt, so
    a kill between them runs the epoch, and writes it, again."""
    from dpm_ops.engine import Trainer, checkpoint

    overrides = [
        "solver.epochs=2",
        "train.eval_period=1",
        "train.checkpoint_period=1",
        "train.checkpoint_every_iters=0",
    ]
    config = config_for(tmp_path, tiny_root, overrides=overrides)
    evaluate = Trainer.evaluate

    def killed(self, out_dir=None, pictures=None):
        raise KeyboardInterrupt  # as a kill would, after last.pt of epoch 1

    monkeypatch.setattr(Trainer, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["epoch_001.pt", "last.pt"]
    assert not (tmp_path / "run" / "eval_epoch_001" / "metrics.json").exists()
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    saved = []
    save = checkpoint.save_checkpoint
    monkeypatch.setattr(
        "dpm_ops.engine.trainer.save_checkpoint", lambda path, state: saved.append(path.name) or save(path, state)
    )
    result = train(config, tmp_path / "run", resume=True)
    assert result["finished"] and (tmp_path / "run" / "eval_epoch_001" / "metrics.json").is_file()
    assert saved[:2] == ["epoch_002.pt", "last.pt"]


def test_re_evaluating_a_finished_run_rewrites_its_config_with_its_metrics(tmp_path, tiny_root, monkeypatch):
    """--resume of a finished run with other eval keys re-evaluates it: config.yaml was rewritten before the
    evaluation, so an interrupted one left a config.yaml that did not give the folder's metrics.json."""
    import yaml

    from dpm_ops.engine import Trainer

    config = config_for(tmp_path, tiny_root, overrides=["solver.epochs=1"])
    run = tmp_path / "run"
    train(config, run)
    rerank = config_for(tmp_path, tiny_root, overrides=["solver.epochs=1", "eval.rerank=true"])
    evaluate = Trainer.evaluate

    def interrupted(self, out_dir=None, pictures=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(rerank, run, resume=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["rerank"] is False
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    train(rerank, run, resume=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["rerank"] is True
    assert json.loads((run / "metrics.json").read_text())["settings"]["rerank"] is True


def test_an_epoch_hook_that_stops_the_run_stops_it_there(tmp_path, tiny_root):
    """A stop set by after_epoch was read at the next step (one more iteration ran) or, in the last epoch, not at
    all (the run finished, evaluated and saved final.pt)."""

    class StopAtEpochEnd(Hook):
        def __init__(self, epoch):
            self.epoch, self.steps = epoch, None

        def after_epoch(self, trainer, at):
            if at.epoch == self.epoch:
                self.steps = trainer.global_step
                trainer.stop_reason = f"stopped after epoch {at.epoch}"

    config = config_for(tmp_path, tiny_root, overrides=["solver.epochs=2"])
    for epoch in (1, 2):
        hook = StopAtEpochEnd(epoch)
        result = train(config, tmp_path / f"run{epoch}", hooks=[hook])
        assert not result["finished"] and result["global_step"] == hook.steps
        assert not (tmp_path / f"run{epoch}" / "checkpoints" / "final.pt").exists()


def test_eval_choices_that_need_the_model_or_data_are_checked_before_training(tmp_path, tiny_root):
    """Found by the final evaluation, they ended a whole training run without its final.pt."""
    from dpm_ops.engine import ConfigError

    for overrides, message in (
        (["eval.rerank=true", "eval.rerank_method=gnn"], "rerank 'gnn' ranks by the cosine of the features"),
        (["eval.rerank=true", "eval.k1=9223372036854775807"], "k1 must be an integer >= 1 and <= "),
        (["eval.aqe=true", "eval.aqe_k=256"], r"aqe k must be an integer in \[1, "),
    ):
        config = config_for(tmp_path, tiny_root, overrides=overrides)
        with pytest.raises(ConfigError, match=f"^config section eval: {message}"):
            train(config, tmp_path / "run")
        assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_a_run_whose_config_held_an_unread_key_resumes(tmp_path, tiny_root):
    """Before unread keys were refused, a warmup_cosine run with solver.poly_power 0.9 trained (the key ignored)
    and saved the schedule's power: no config resumed it (the key is refused now, and without it the schedule's
    settings differed)."""
    train(config_for(tmp_path, tiny_root, overrides=["train.stop_after_iters=2"]), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["config"]["solver"]["poly_power"] = 0.9  # as the earlier version saved such a run
    for schedule in state["training"]["schedules"].values():
        schedule["power"] = 0.9
    torch.save(state, last)
    assert train(config_for(tmp_path, tiny_root), tmp_path / "run", resume=True)["finished"]


def test_a_checkpoint_older_than_a_key_resumes_with_what_runs_did_before_it(tmp_path, tiny_root):
    """A checkpoint saved before dataset.val_ratio existed: a run that does not read it resumes; the value of a run
    that reads it is what runs did before it (Field.before: DGD's trainval trained whole, 0.0), not its default."""
    from dpm_ops.engine.config import saved_choice

    train(config_for(tmp_path, tiny_root, overrides=["train.stop_after_iters=2"]), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    del state["config"]["dataset"]["val_ratio"]  # as the earlier version saved it
    torch.save(state, last)
    assert train(config_for(tmp_path, tiny_root), tmp_path / "run", resume=True)["finished"]
    assert saved_choice(state["config"], "dataset", "val_ratio") == 0.0
    assert saved_choice(state["config"], "dataset", "split_id") is None  # no before: the default
    assert saved_choice({"loss": {"ranking_pos_mode": "all"}}, "loss", "ranking_pos_mode") == "all_eq5"  # renamed


def test_a_log_that_cannot_be_flushed_still_releases_the_run_folder(tmp_path, tiny_root, monkeypatch):
    """Closing train.log on a full disk raised before the folder was released: a retry in the same process (a
    notebook) was refused as "in use by another training run"."""
    from dpm_ops.engine.run_log import RunLog

    config = config_for(tmp_path, tiny_root, overrides=["train.stop_after_iters=1"])
    close = RunLog.close

    def full_disk(log):
        close(log)
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "train.log"))

    monkeypatch.setattr(RunLog, "close", full_disk)
    with pytest.raises(OSError, match="No space left on device") as kept:  # its traceback keeps the Trainer
        train(config, tmp_path / "run")
    monkeypatch.setattr(RunLog, "close", close)
    assert train(config, tmp_path / "run")["global_step"] == 1  # was: CheckpointError, "in use"
    assert kept.traceback


def test_a_run_whose_folder_is_removed_stops_at_its_next_checkpoint(tmp_path, tiny_root):
    """The run recreated the deleted folder at its next checkpoint and went on, its logs lost, while a second run
    could start there (the lock it held was the deleted file's)."""

    class RemoveFolder(Hook):
        def after_step(self, trainer, at, losses):
            if trainer.global_step == 1:
                shutil.rmtree(tmp_path / "run")

    config = config_for(tmp_path, tiny_root)
    with pytest.raises(CheckpointError, match=r"/run was removed or replaced during the run: it stops"):
        train(config, tmp_path / "run", hooks=[RemoveFolder()])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_whose_folder_is_removed_before_its_evaluation_writes_nothing_there(tmp_path, tiny_root, monkeypatch):
    """The final evaluation recreated the removed folder and wrote metrics.json (another run's, had one started
    there) before the final checkpoint's check said no."""
    save = Trainer.save

    def save_then_remove(trainer, at, epoch_done, **kwargs):  # the folder removed after the last epoch's checkpoint
        save(trainer, at, epoch_done, **kwargs)
        if epoch_done:
            shutil.rmtree(tmp_path / "run")

    monkeypatch.setattr(Trainer, "save", save_then_remove)
    config = config_for(tmp_path, tiny_root, overrides=["solver.epochs=1", "solver.warmup_epochs=0"])
    with pytest.raises(CheckpointError, match=r"/run was removed or replaced during the run: it stops"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
