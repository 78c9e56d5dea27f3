"""Process-group helpers for ``torchrun`` (DDP): nccl on GPUs, gloo on CPU; rank 0 does the I/O.

    torchrun --nproc_per_node 2 -m dpm_ops train --config synthetic_dpm

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them
everything here degrades to a single process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _environment_integer(name: str, default: str, lowest: int, highest: Optional[int] = None) -> int:
    text = os.environ.get(name, default)
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lowest or (highest is not None and value > highest):
        expected = f"an integer >= {lowest}" if highest is None else f"an integer in [{lowest}, {highest}]"
        raise ValueError(f"environment variable {name} must be {expected}, got {text!r}")
    return value


def launcher_ranks() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the variables torchrun sets; (1, 0, 0) without WORLD_SIZE.
    A ValueError naming the variable when one is malformed or missing: read as they were, a stray
    WORLD_SIZE in a shell gave a KeyError traceback, a RANK past the world size a hang."""
    world_size = _environment_integer("WORLD_SIZE", "1", 1)
    if world_size == 1:
        return 1, 0, 0
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"environment variable WORLD_SIZE is {world_size} but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start multi-process runs with torchrun "
            "(it sets them all), or unset WORLD_SIZE"
        )
    rank = _environment_integer("RANK", "", 0, world_size - 1)
    _environment_integer("MASTER_PORT", "", 1, 65535)  # torch's own message names no variable
    return world_size, rank, _environment_integer("LOCAL_RANK", str(rank), 0)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (idempotent); a single process otherwise."""
    world_size, _, local_rank = launcher_ranks()
    if world_size == 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # torch.distributed.nn.functional binds `group=group.WORLD` defaults when first imported (by
        # DDP's first use of torch._dynamo): imported after init_process_group, they would keep the
        # default group alive, destroy_process_group could not stop its gloo threads, and one still
        # freeing a collective's tensor at interpreter shutdown aborts the rank ("terminate called
        # without an active exception"). Imported before, they bind None.
        import torch.distributed.nn.functional  # noqa: F401

        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_backend()
        )
    return DistInfo()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj`` (a list of one item without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def data_parallel(model: torch.nn.Module, device: torch.device, sync_bn: bool, find_unused: bool) -> torch.nn.Module:
    """What the train steps call: ``model`` itself in a single process, its DDP wrapper under torchrun. ``sync_bn``:
    its BatchNorm layers made SyncBatchNorm first (the whole batch's statistics in a train-mode forward, not the
    rank's share's), replaced in place with the same parameters and buffers: the optimizers built on ``model``,
    its state dict's keys and its eval mode (the running statistics) stay."""
    if not current().enabled:
        return model
    if sync_bn:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place: the model is no BatchNorm layer itself
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused
    )


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (one small all-reduce; ``flag`` itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    held = torch.tensor([int(flag)], device=device)
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    return bool(held.item())


def broadcast_buffers(module: torch.nn.Module, source: int = 0) -> None:
    """Give every rank rank ``source``'s buffers (BatchNorm running statistics). DDP broadcasts them at
    the start of each forward, so after the last one every rank holds the statistics of its own
    batches (SyncBatchNorm's: the whole batch's, the same on every rank); evaluation, which shards the
    test set over the ranks, must use the ones that rank 0's checkpoints save. No-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, source)


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (for logging); unchanged in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, in rank order; the gradient of this rank's own, summed over the ranks (each computes
    the same loss of the whole batch: DDP's average of them is a single process's gradient)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        shares = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(shares, rows.contiguous())
        ctx.share = (dist.get_rank() * rows.shape[0], rows.shape[0])
        return torch.cat(shares)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # summed in place: never the consumer's tensor
        dist.all_reduce(grad)
        return grad.narrow(0, *ctx.share)


def gather_batch(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch's features (differentiable) and labels from every rank's share of it (equal shares, as the
    P x K sampler splits it): a triplet loss mines over all of it, as one process of the whole batch does."""
    if not (dist.is_available() and dist.is_initialized()):
        return features, labels
    shares = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(shares, labels.contiguous())
    return _GatherRows.apply(features), torch.cat(shares)
