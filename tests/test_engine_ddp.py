"""Two processes on CPU with the gloo backend (torchrun), on a tiny synthetic set: the P x K batch
is split across ranks, rank 0 alone writes logs and checkpoints, and a killed DDP run resumes. On a
GPU, one process with nccl: a training run end to end on the CUDA kernels."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpm_ops.cli import main
from dpm_ops.engine import load_checkpoint
from engine_utils import scored, tiny_config, write_config


def torchrun(*args, cwd, program=("-m", "dpm_ops"), processes=2, timeout=300):
    # PYTHONFAULTHANDLER: a rank killed by a signal prints every thread's Python stack.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += [*program, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_gloo_training(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "set", "dpm"))
    run = tmp_path / "run"
    killed = torchrun("train", "--config", str(config), "--output", str(run), "train.stop_after_iters=3", cwd=tmp_path)
    assert killed.returncode == 0, killed.stderr[-8000:]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["training"]["world_size"] == 2
    result = torchrun("train", "--config", str(config), "--output", str(run), "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-8000:]
    assert result.stdout.count("mINP") == 1, result.stdout  # only rank 0 prints the table
    assert result.stdout.count("run folder:") == 1, result.stdout  # and the run folder
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # one writer, resumed cleanly
    last = load_checkpoint(run / "checkpoints" / "last.pt")["training"]
    assert last["progress"]["epoch_done"] and len(last["rng"]) == 2  # both ranks' RNG states
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"all", "clean", "occluded"} <= set(metrics)
    # every rank saw half of each 4-id x 2 batch: 4 images per rank per step
    assert "2 process(es)" in (run / "train.log").read_text()
    # `dpm-reid eval` on two processes: both evaluate, rank 0 alone says where the metrics went
    evaluated = torchrun(
        "eval", "--config", str(config), "--weights", str(run / "checkpoints" / "final.pt"), cwd=tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stderr[-8000:]
    assert evaluated.stdout.count("metrics written to") == 1, evaluated.stdout
    # the training run's own evaluation is that of final.pt: every rank took rank 0's BatchNorm statistics
    assert scored(run / "eval", run / "checkpoints" / "final.pt") == metrics
    # ... and so is a single process's evaluation of it (rank 0 ranks the gathered shards in dataset order)
    single = tmp_path / "single_eval"
    assert (
        main(
            [
                "eval",
                "--config",
                str(config),
                "--weights",
                str(run / "checkpoints" / "final.pt"),
                "--output",
                str(single),
            ]
        )
        == 0
    )
    assert scored(single, run / "checkpoints" / "final.pt") == metrics
    # The killed and resumed run ends bit-identical to an uninterrupted one; that one loads with two workers
    # per rank (augmentations are seeded per sample, not by the worker that draws them).
    full = tmp_path / "full"
    result = torchrun("train", "--config", str(config), "--output", str(full), "dataloader.num_workers=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-8000:]
    resumed, uninterrupted = (load_checkpoint(r / "checkpoints" / "final.pt")["model"] for r in (run, full))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert [json.loads(line) for line in (full / "train_log.jsonl").read_text().splitlines()] == records
    assert json.loads((full / "metrics.json").read_text()) == metrics


def test_input_errors_under_torchrun_are_one_line_and_do_not_hang(tmp_path):
    # Every rank that finds a mistake says it and exits 2: a config mistake is every rank's (the same line from
    # each), the output folder rank 0's alone to check, a dataset error may be one rank's alone (its shard).
    # When rank 0 alone said a config mistake, rank 1 could exit first and torchrun stopped rank 0 before it
    # printed (no line at all). torchrun itself exits 1 whatever its ranks' codes (ChildFailedError), naming
    # the first rank to fail (exit 2; it stops the other with SIGTERM if that one is still running).
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "absent", "dpm", dataset={"generate": False}))
    (tmp_path / "file").write_text("")
    for overrides, needle in (
        (["solver.base_lr=-1"], "solver.base_lr: expected a value > 0"),
        ([], "dataset root not found"),
        (["--output", str(tmp_path / "file" / "run")], "cannot create the folder"),
        (
            ["train.sync_bn=true"],
            "config key train.sync_bn: torch's SyncBatchNorm trains on CUDA devices only, and these 2",
        ),
    ):
        result = torchrun("train", "--config", str(config), *overrides, cwd=tmp_path, timeout=120)
        errors = [line for line in result.stderr.splitlines() if line.startswith("dpm-reid: error: ")]
        assert errors and needle in errors[0] and set(errors) == {errors[0]}, result.stderr[-4000:]
        root_cause = re.search(r"Root Cause.*?exitcode\s*: (-?\d+)", result.stderr, re.S)
        assert result.returncode == 1 and root_cause.group(1) == "2", result.stderr[-4000:]


@pytest.mark.parametrize(
    "environment, message",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is 2 but RANK, MASTER_ADDR, MASTER_PORT are not set: start multi-process"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "29500"}, "WORLD_SIZE is 2 but MASTER_ADDR is not set:"),
        ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE must be an integer >= 1, got 'two'"),
        ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE must be an integer >= 1, got '0'"),
        ({"WORLD_SIZE": "--2"}, "environment variable WORLD_SIZE must be an integer >= 1, got '--2'"),
        ({"RANK": "2"}, "environment variable RANK must be an integer in [0, 1], got '2'"),
        ({"RANK": "-1"}, "environment variable RANK must be an integer in [0, 1], got '-1'"),
        ({"LOCAL_RANK": "-1"}, "environment variable LOCAL_RANK must be an integer >= 0, got '-1'"),
    ],
)
def test_launcher_variables_set_by_hand_are_one_line_errors(tmp_path, monkeypatch, capsys, environment, message):
    # A WORLD_SIZE left in a shell without torchrun's other variables was a KeyError traceback, and a RANK
    # outside the world (which no rank 0 ever waits for) hung in the rendezvous; both before any work.
    launched = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in ({} if environment.get("WORLD_SIZE") else launched).items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if "WORLD_SIZE" in environment:
            monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "set", "dpm"))
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpm-reid: error: ") and message in lines[0], lines
    assert not (tmp_path / "set").exists() and not any((tmp_path / "run").iterdir())  # no set made, no run begun


GLOO_THREADS_AFTER_CLEANUP = """
import os, torch
from dpm_ops.engine import distributed

def gloo_threads():
    names = (open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task"))
    return [name for name in names if "gloo" in name]

info = distributed.init_distributed(torch.device("cpu"))
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
model(torch.randn(4, 3)).sum().backward()
del model
# the other collective helpers, on values that differ by rank
mean = distributed.mean_across_ranks({"loss": float(info.rank)}, torch.device("cpu"))["loss"]
norm = torch.nn.BatchNorm1d(1)
norm.running_mean.fill_(info.rank + 1.0)
distributed.broadcast_buffers(norm)
gathered = distributed.all_gather_object(info.rank)
running = gloo_threads()
distributed.cleanup()
with open(f"rank{os.environ['RANK']}.txt", "w") as report:  # not stdout: the ranks share it
    report.write(f"mean {mean}, buffer {norm.running_mean.item()}, gathered {gathered}; ")
    report.write(f"gloo threads {running} before cleanup, {gloo_threads()} after")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
def test_collective_helpers_and_cleanup_stopping_the_gloo_threads(tmp_path):
    # A gloo thread that outlives cleanup() and frees a collective's tensor while the interpreter shuts
    # down aborts its rank; DDP's imports used to keep the default group (and its threads) alive. The
    # logged losses' mean, rank 0's BatchNorm statistics and the gathered objects come from the helpers.
    script = tmp_path / "gloo_threads.py"
    script.write_text(GLOO_THREADS_AFTER_CLEANUP)
    result = torchrun(cwd=tmp_path, program=(str(script),))
    assert result.returncode == 0, result.stderr[-8000:]
    for report in ((tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)):
        helpers, report = report.split("; ")
        assert helpers == "mean 0.5, buffer 1.0, gathered [0, 1]", helpers  # the mean, rank 0's buffer, both
        before, after = report.split(" before cleanup, ")
        assert "gloo" in before, report  # the threads this test looks for exist under these names
        assert after == "[] after", report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nccl and the CUDA kernels need a GPU")
def test_one_process_nccl_training_on_cuda(tmp_path):
    # A GPU run end to end under torchrun: nccl, the CUDA kernels, bf16 autocast ("auto" on CUDA), the
    # evaluation; the process group destroyed before exit (else torch warns at shutdown).
    config = tiny_config(tmp_path / "set", "dpm", train={"device": "cuda"})
    run = tmp_path / "run"
    config_file = write_config(tmp_path / "tiny.yaml", config)
    result = torchrun("train", "--config", str(config_file), "--output", str(run), cwd=tmp_path, processes=1)
    assert result.returncode == 0, result.stderr[-8000:]
    assert not re.search(r"NOT been destroyed|destroy_process_group\(\) was not called", result.stderr), result.stderr
    log = (run / "train.log").read_text()
    assert "device cuda" in log and "amp torch.bfloat16" in log and "1 process(es)" in log, log
    assert {"all", "clean", "occluded"} <= set(json.loads((run / "metrics.json").read_text()))


_GLOBAL_TRIPLET = """
import torch
from torch.nn.parallel import DistributedDataParallel
from dpm_ops.engine.distributed import cleanup, gather_batch, init_distributed
from dpm_ops.losses import batch_hard_soft_margin_triplet

rank = init_distributed(torch.device("cpu")).rank
torch.manual_seed(0)
model, single = torch.nn.Linear(8, 6).double(), torch.nn.Linear(8, 6).double()
single.load_state_dict(model.state_dict())
x, labels = torch.randn(16, 8, dtype=torch.float64), torch.arange(4).repeat_interleave(4)  # 4 ids x 4
share = slice(8 * rank, 8 * rank + 8)  # the P x K batch split over the ranks: 2 ids each
ddp = DistributedDataParallel(model)
loss = batch_hard_soft_margin_triplet(*gather_batch(ddp(x[share]), labels[share]))
loss.backward()
whole = batch_hard_soft_margin_triplet(single(x), labels)  # one process of the whole batch
whole.backward()
same = torch.allclose(loss, whole) and all(
    torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-12) for a, b in zip(model.parameters(), single.parameters())
)
with open(f"rank{rank}.txt", "w") as report:  # not stdout: the ranks share it (their lines may interleave)
    report.write(str(same))
del ddp  # DDP's reducer holds the process group: alive, its gloo threads outlived cleanup (an abort)
cleanup()
"""


def test_the_triplet_mines_over_the_whole_batch_under_ddp(tmp_path):
    """Each rank mined its own share of the P x K batch (half the identities on two processes): another loss and
    other gradients than one process of the whole batch. The shares are gathered (gather_batch) and the gradient
    of each rank's own rows summed, so DDP's average is the single process's gradient."""
    script = tmp_path / "global_triplet.py"
    script.write_text(_GLOBAL_TRIPLET)
    result = torchrun(cwd=tmp_path, program=(str(script),))
    assert result.returncode == 0, result.stderr[-5000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)] == ["True", "True"]


_GLOBAL_RANKING = """
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from dpm_ops.engine.distributed import cleanup, gather_batch, init_distributed, mean_across_ranks
from dpm_ops.losses import MaskReIDRankingLoss

rank = init_distributed(torch.device("cpu")).rank
torch.manual_seed(0)
x, labels = torch.randn(16, 8, dtype=torch.float64), torch.arange(4).repeat_interleave(4)  # 4 ids x 4
share = slice(8 * rank, 8 * rank + 8)  # the P x K batch split over the ranks: 2 ids each
report = open(f"rank{rank}.txt", "w")  # not stdout: the ranks share it (their lines interleaved)
for pos_mode, neg_mode, backend in (
    ("hardest", "literal", None),
    ("all_eq5", "violating_only", "reference"),
    ("eq4", "literal", None),
):
    model, single = torch.nn.Linear(8, 6).double(), torch.nn.Linear(8, 6).double()
    single.load_state_dict(model.state_dict())
    options = dict(pos_mode=pos_mode, neg_mode=neg_mode, backend=backend)
    ddp = DistributedDataParallel(model)
    loss = MaskReIDRankingLoss(ranking_batch=gather_batch, **options)(F.normalize(ddp(x[share])), labels[share])
    loss.backward()
    whole = MaskReIDRankingLoss(**options)(F.normalize(single(x)), labels)  # one process of the whole batch
    whole.backward()
    own = MaskReIDRankingLoss(**options)(F.normalize(single(x[share])), labels[share])  # the rank's share alone
    logged = mean_across_ranks({"loss": loss.item()}, torch.device("cpu"))["loss"]  # what the log hook writes
    error = max((a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), single.parameters()))
    same = torch.allclose(loss, whole, rtol=1e-14, atol=0) and logged == loss.item() and error < 1e-12
    report.write(f"{pos_mode}: {same}, {bool(torch.isclose(own, whole, rtol=1e-3))}, {error:.1e}\\n")
report.close()
del ddp  # DDP's reducer holds the process group: alive, its gloo threads outlived cleanup (an abort)
cleanup()
"""


def test_the_maskreid_ranking_loss_mines_over_the_whole_batch_under_ddp(tmp_path):
    """As the triplet (above): each rank ranked its share of the P x K batch alone (another loss: fewer negatives,
    other hardest positives). Gathered, every rank computes the whole batch's loss (a mean over its anchors): the
    gradient of each rank's rows summed over the ranks, DDP's average is one process's gradient, and the logged
    mean over the ranks is that loss."""
    script = tmp_path / "global_ranking.py"
    script.write_text(_GLOBAL_RANKING)
    result = torchrun(cwd=tmp_path, program=(str(script),))
    assert result.returncode == 0, result.stderr[-5000:]
    for report in ((tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)):
        # True: the same loss, logged value and gradients (the largest difference last); False: a share alone
        # gives another loss, so the comparison can fail
        lines = [line.rsplit(", ", 1)[0] for line in report.splitlines()]
        assert lines == [f"{mode}: True, False" for mode in ("hardest", "all_eq5", "eq4")], report


@pytest.mark.parametrize("kind", ["pk", "maskreid"])
def test_the_maskreid_recipe_gathers_its_p_x_k_batches_alone(monkeypatch, kind):
    """A P x K batch is split over the ranks: its ranking loss mines over every rank's share. A MaskReID batch is a
    whole ranking problem on each rank (the sampler deals out whole batches): gathered, each rank's anchors would be
    ranked against the other ranks' batches too, another loss than one process's."""
    from dpm_ops.engine import distributed, load_config
    from dpm_ops.engine.recipes import get_recipe
    from dpm_ops.engine.recipes import maskreid as maskreid_recipe
    from dpm_ops.losses import MaskReIDRankingLoss
    from dpm_ops.losses._options import same_batch
    from dpm_ops.models import build_model

    made = []
    monkeypatch.setattr(
        maskreid_recipe,
        "MaskReIDRankingLoss",
        lambda **options: made.append(MaskReIDRankingLoss(**options)) or made[-1],
    )
    config = load_config("maskreid_market1501", [f"sampler.kind={kind}", "pretrain.epochs=0"])
    model = build_model("maskreid", 0, 0, stem_channels=4, base_width=4, embed_dim=16)
    get_recipe("maskreid").build_stages(model, config, {kind: 4})
    (ranking,) = made
    assert ranking.ranking_batch is (distributed.gather_batch if kind == "pk" else same_batch)
    assert (ranking.alpha, ranking.lam, ranking.pos_mode) == (0.15, 2.0, "hardest")


_SYNC_BN = """
import sys, torch
from torch.nn.modules.batchnorm import _BatchNorm
from dpm_ops.engine import load_config, trainer as trainer_module
from dpm_ops.engine.builders import build_model_from_args, evaluate_with_config

def refusal(call):
    try:
        call()
    except ValueError as error:
        return str(error)
    return "accepted"

# On CPU torch refuses DDP of SyncBatchNorm layers and their train-mode forward (the reason train.sync_bn is refused
# there): the refusal lifted, the wrapper recording what it was given, the rest of the setup runs.
ddp, wrapped = torch.nn.parallel.DistributedDataParallel, []
trainer_module.check_sync_bn = lambda *args: None
report = []
for path, output in zip(sys.argv[1::2], sys.argv[2::2]):
    trainer = trainer_module.Trainer(load_config(path, ["train.sync_bn=true"]), output)
    torch.nn.parallel.DistributedDataParallel = lambda module, **options: wrapped.append(module) or module
    trainer.setup()
    torch.nn.parallel.DistributedDataParallel = ddp
    model, fresh = trainer.model, build_model_from_args(trainer.model_name, trainer.model_args)  # as export's
    norms = [type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)]
    optimized = {id(p) for s in trainer.stages for o in s.optimizers.values() for g in o.param_groups for p in g["params"]}
    for norm in (m for m in model.modules() if isinstance(m, _BatchNorm)):  # statistics a checkpoint must carry
        norm.running_mean.add_(0.1), norm.running_var.mul_(2.0)
    fresh.load_state_dict(model.state_dict())  # strict: the same keys and shapes
    metrics = trainer.evaluate()  # eval mode: the running statistics, nothing synced (rank 0's; the other's None)
    same = metrics == evaluate_with_config(fresh, trainer.splits, trainer.config, device=trainer.device, log=print)
    sync = next(m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)).train()
    refused = refusal(lambda: ddp(model)), refusal(lambda: sync(torch.randn(4, sync.num_features)))
    report.append(
        f"{wrapped[-1] is model} {set(norms)} {len(norms) == sum(isinstance(m, _BatchNorm) for m in fresh.modules())} "
        f"{0 < len(optimized) and optimized <= {id(p) for p in model.parameters()}} {same}; {refused}"
    )
    if trainer.run_folder is not None:
        trainer.run_folder.release()
with open(f"rank{trainer.dist.rank}.txt", "w") as file:  # not stdout: the ranks share it
    file.write("\\n".join(report))
trainer_module.distributed.cleanup()
"""


def test_sync_bn_converts_the_batchnorm_layers_and_keeps_the_state_dict(tmp_path):
    """train.sync_bn under torchrun: every BatchNorm layer of the model made SyncBatchNorm before DDP wraps it, with
    the parameters the optimizers hold, a state dict that a plain model of the checkpoint's arguments takes (final.pt,
    eval, export), and an evaluation (eval mode: the running statistics) that is that plain model's. torch runs
    neither the DDP wrapper nor the train-mode forward of SyncBatchNorm on CPU (why the option is refused there,
    checked here so that a torch lifting it shows): the whole batch's statistics need a GPU per process to test."""
    script, paths = tmp_path / "sync_bn.py", []
    script.write_text(_SYNC_BN)
    for model in ("dpm", "maskreid"):
        config = tiny_config(tmp_path / f"set_{model}", model, dataset={"with_masks": True})
        paths += [str(write_config(tmp_path / f"{model}.yaml", config)), str(tmp_path / f"run_{model}")]
    result = torchrun(*paths, cwd=tmp_path, program=(str(script),))
    assert result.returncode == 0, result.stderr[-8000:]
    refused = "('SyncBatchNorm layers only work with GPU modules', 'SyncBatchNorm expected input tensor to be on GPU"
    for report in ((tmp_path / f"rank{rank}.txt").read_text().splitlines() for rank in range(2)):
        assert len(report) == 2, report
        assert all(line.startswith(f"True {{'SyncBatchNorm'}} True True True; {refused}") for line in report), report


def test_sync_bn_is_refused_on_cpu_under_torchrun_alone():
    """torch's SyncBatchNorm trains CUDA tensors only: on CPU its DDP wrapper, then its first train-mode forward,
    failed after the data was read. One process has the whole batch's statistics already: it keeps its BatchNorm."""
    from dpm_ops.engine import ConfigError, load_config
    from dpm_ops.engine.builders import check_sync_bn
    from dpm_ops.engine.distributed import DistInfo, data_parallel

    config = load_config("synthetic_dpm", ["train.sync_bn=true"])
    with pytest.raises(
        ConfigError,
        match=r"^config key train.sync_bn: torch's SyncBatchNorm trains on CUDA devices only, and these 2 processes "
        r"train on cpu: set train.sync_bn=false, or train.device=cuda$",
    ):
        check_sync_bn(config, torch.device("cpu"), DistInfo(1, 2, 1, "gloo"))
    check_sync_bn(config, torch.device("cuda", 1), DistInfo(1, 2, 1, "nccl"))
    check_sync_bn(config, torch.device("cpu"), DistInfo())
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    assert data_parallel(model, torch.device("cpu"), True, False) is model and type(model[1]) is torch.nn.BatchNorm1d


def test_two_processes_evaluate_several_test_sets_as_one_does(tmp_path):
    """dataset.test_name a list under torchrun: every rank evaluates each set in turn (a collective extraction each),
    rank 0 alone writes the test_<set>/ folders and the metrics.json of them all, the same as one process writes."""
    from dpm_ops.data.synth import generate_synthetic_dataset
    from engine_utils import tiny_synth_config

    for folder, seed in (("Market-1501-v15.09.15", 3), ("DukeMTMC-reID", 11)):
        generate_synthetic_dataset(tmp_path / "sets" / folder, tiny_synth_config(seed=seed), progress=False)
    settings = tiny_config(tmp_path / "sets")
    settings["dataset"] = {"name": "market1501", "root": str(tmp_path / "sets"), "check_counts": "off"}
    settings["dataset"]["test_name"] = ["dukemtmc", "market1501"]
    settings["solver"]["epochs"] = 1
    config = write_config(tmp_path / "two_tests.yaml", settings)
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    weights = tmp_path / "run" / "checkpoints" / "final.pt"
    evaluated = torchrun("eval", "--config", str(config), "--weights", str(weights), "--output", "ddp", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-8000:]
    assert evaluated.stdout.count("mINP") == 3, evaluated.stdout  # rank 0's table of each set, and of them all
    assert "all queries of each of the 2 test sets:" in evaluated.stdout
    assert main(["eval", "--config", str(config), "--weights", str(weights), "--output", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("ddp", "one"))
    assert list(two) == ["dukemtmc", "market1501"] and two == one
    assert all((tmp_path / "ddp" / f"test_{name}" / "metrics.json").is_file() for name in two)
