"""Process-group helpers for ``torchrun`` (DDP): nccl on GPUs, gloo on CPU; rank 0 does the I/O.

    torchrun --nproc_per_node 2 -m dpm_ops train --config synthetic_dpm

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them
everything here degrades to a single process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

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


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (idempotent); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
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


def broadcast_buffers(module: torch.nn.Module, source: int = 0) -> None:
    """Give every rank rank ``source``'s buffers (BatchNorm running statistics). DDP broadcasts them at
    the start of each forward, so after the last one every rank holds the statistics of its own
    batches; evaluation, which shards the test set over the ranks, must use the ones that rank 0's
    checkpoints save. No-op in a single process."""
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
