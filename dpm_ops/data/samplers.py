"""Identity batch samplers for DPM (P x K) and MaskReID (1 id x P + N singles).

Both are batch samplers (``DataLoader(batch_sampler=...)``), deterministic in (seed, epoch), with

* ``set_epoch(epoch)`` to reshuffle per epoch (as ``DistributedSampler``);
* ``state_dict()`` / ``load_state_dict()`` holding (seed, epoch, position): after loading, the next
  iteration resumes the same epoch at batch ``position`` with exactly the batches an uninterrupted
  run would have drawn. The state also records the plan the batches follow (the sampler, its sizes,
  the data's image and identity counts and a checksum of its labels): a sampler of another plan refuses
  it, since the position would name other batches. With DataLoader workers the sampler runs ahead of the training loop
  (prefetching), so pass the number of batches the loop consumed: ``state_dict(consumed_batches=i)``;
* ``rank`` / ``world_size`` for DDP (see each class for how batches are split).

Each batch element is a :class:`SampleRef` ``(index, seed)``: the dataset index and a per-sample
augmentation seed drawn from the same (seed, epoch) stream. :class:`~dpm_ops.data.loader.ImageDataset`
seeds its transforms with it, so augmentation too is identical after a resume, whatever the worker count.
"""

from __future__ import annotations

import numbers
import zlib
from collections import defaultdict
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from dpm_ops.evaluation._inputs import check_count

# An epoch's batches are drawn when it starts: 10^5 took 3.8 s to plan, 10^12 would have taken a year.
MAX_BATCHES_PER_EPOCH = 10**6


class SampleRef(NamedTuple):
    index: int
    seed: int


def _pid_groups(pids: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for index, pid in enumerate(pids):
        if isinstance(pid, bool) or not isinstance(pid, numbers.Integral):
            raise ValueError(f"pids must be integer identity labels, got {pid!r} at index {index}")
        groups[int(pid)].append(index)
    return dict(sorted(groups.items()))


class _EpochBatchSampler(Sampler[list[SampleRef]]):
    """Shared epoch / position / rank bookkeeping; subclasses build one epoch's global batches."""

    SIZES: tuple[str, ...] = ()  # the attributes that shape a subclass's batches, recorded in its state

    def __init__(self, pids: Sequence[int], seed: int, rank: int, world_size: int):
        self.world_size = check_count("world_size", world_size, 1)
        self.rank = check_count("rank", rank, 0, world_size - 1)
        self.seed = check_count("seed", seed, 0)  # numpy's generators take non-negative seeds
        self.groups = _pid_groups(pids)
        # the identity labels in dataset order, for the plan a state records: counts alone miss a relabelled set
        self._labels_crc = zlib.crc32(np.asarray(pids, dtype=np.int64).tobytes())
        if not self.groups:
            raise ValueError("cannot sample from an empty dataset")
        self.epoch = 0
        self._cache: tuple[tuple[int, int], list[list[SampleRef]]] | None = None
        self._start = 0  # batch to resume from, set by load_state_dict, used once
        self._yielded = 0  # batches handed out in the current epoch

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def _split_for_rank(self, batches: list[list[SampleRef]]) -> list[list[SampleRef]]:
        raise NotImplementedError

    def _rank_batches(self) -> list[list[SampleRef]]:
        """This rank's batches for the current epoch (cached: len() and iter() share them)."""
        key = (self.seed, self.epoch)
        if self._cache is None or self._cache[0] != key:
            rng = self._rng()
            batches = self._attach_seeds(self._global_batches(rng), rng)
            self._cache = (key, self._split_for_rank(batches))
        return self._cache[1]

    def _attach_seeds(self, batches: list[list[int]], rng: np.random.Generator) -> list[list[SampleRef]]:
        total = sum(len(batch) for batch in batches)
        seeds = iter(rng.integers(0, 2**63 - 1, size=total).tolist())
        return [[SampleRef(index, next(seeds)) for index in batch] for batch in batches]

    def __iter__(self) -> Iterator[list[SampleRef]]:
        batches = self._rank_batches()
        start, self._start = self._start, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield batch

    def __len__(self) -> int:
        """Batches per epoch for this rank (a resumed epoch yields ``len - position`` of them)."""
        return len(self._rank_batches())

    def set_epoch(self, epoch: int) -> None:
        epoch = check_count("epoch", epoch, 0)
        if epoch != self.epoch:
            self._start = self._yielded = 0
        self.epoch = epoch

    def state_dict(self, consumed_batches: Optional[int] = None) -> dict:
        if consumed_batches is None:
            position = self._yielded
        else:
            position = check_count("consumed_batches", consumed_batches, 0, len(self))
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": position,
            "world_size": self.world_size,
            "plan": self._plan(),
        }

    def _plan(self) -> dict:
        """What decides the batches besides (seed, epoch, world_size)."""
        sizes = {name: getattr(self, name) for name in self.SIZES}
        images = sum(len(group) for group in self.groups.values())
        data = {"images": images, "identities": len(self.groups), "labels": f"crc32 {self._labels_crc:08x}"}
        return {"sampler": type(self).__name__, **sizes, **data}

    def _check_plan(self, saved) -> None:
        """Refuse a state whose position counts the batches of another plan (states saved before plans
        were recorded have none and are taken as they are)."""
        if saved is None:
            return
        if not isinstance(saved, dict):
            raise ValueError(f"state['plan'] must be a dict, got {saved!r:.100}")
        plan = self._plan()
        changed = [
            f"{key} {saved.get(key)!r} -> {plan.get(key)!r}"
            for key in {**saved, **plan}
            if saved.get(key) != plan.get(key)
        ]
        if changed:
            raise ValueError(
                f"sampler state was saved by another sampling plan ({', '.join(changed)}): "
                "its position would resume other batches"
            )

    def check_state_dict(self, state: dict) -> None:
        """load_state_dict's checks of the state's form, world size and plan, changing nothing."""
        if not isinstance(state, dict) or not {"seed", "epoch", "position"} <= state.keys():
            raise ValueError(f"state must be a state_dict() (seed, epoch, position), got {state!r:.100}")
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(
                f"sampler state saved with world_size={state['world_size']} cannot resume with {self.world_size}"
            )
        self._check_plan(state.get("plan"))

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
        seed, epoch = check_count("state['seed']", state["seed"], 0), check_count("state['epoch']", state["epoch"], 0)
        previous, (self.seed, self.epoch) = (self.seed, self.epoch), (seed, epoch)
        try:  # the epoch's batch count bounds the position: past it, an empty epoch was resumed
            self._start = check_count("state['position']", state["position"], 0, len(self))
        except ValueError:
            self.seed, self.epoch = previous
            raise
        self._yielded = self._start


class RandomIdentityBatchSampler(_EpochBatchSampler):
    """DPM / TransReID's sampler: batches of ``num_ids`` identities x ``num_instances`` images.

    Per epoch, each identity's images are shuffled and cut into chunks of ``num_instances``; an
    identity with fewer images is first padded by drawing ``num_instances`` with replacement, and a
    trailing partial chunk is dropped. Batches take one chunk from each of ``num_ids`` random
    identities that still have chunks, until fewer than ``num_ids`` identities remain (TransReID /
    DPM's ``RandomIdentitySampler``).

    Distributed: every rank builds the same global batches and takes its share of the identities
    of each one (``num_ids / world_size`` ids x ``num_instances``), so the global batch equals the
    single-process batch; ``num_ids`` must be divisible by ``world_size``.
    """

    SIZES = ("num_ids", "num_instances")

    def __init__(
        self,
        pids: Sequence[int],
        num_ids: int = 16,
        num_instances: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(pids, seed, rank, world_size)
        num_ids, num_instances = check_count("num_ids", num_ids, 1), check_count("num_instances", num_instances, 1)
        if num_ids % world_size:
            raise ValueError(f"num_ids={num_ids} is not divisible by world_size={world_size}")
        if len(self.groups) < num_ids:
            raise ValueError(
                f"P x K sampling needs at least num_ids={num_ids} identities, the data has {len(self.groups)}"
            )
        self.num_ids = num_ids
        self.num_instances = num_instances

    def _identity_chunks(self, pids, rng: np.random.Generator) -> dict[int, list[list[int]]]:
        """Each identity's images shuffled (padded with replacement to ``num_instances``) and cut into chunks."""
        chunks: dict[int, list[list[int]]] = {}
        for pid in pids:
            indices = self.groups[pid]
            if len(indices) < self.num_instances:
                pool = rng.choice(indices, size=self.num_instances, replace=True).tolist()
            else:
                pool = rng.permutation(indices).tolist()
            usable = len(pool) - len(pool) % self.num_instances
            chunks[pid] = [pool[i : i + self.num_instances] for i in range(0, usable, self.num_instances)]
        return chunks

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        chunks = self._identity_chunks(self.groups, rng)
        available = list(chunks)
        batches = []
        while len(available) >= self.num_ids:
            chosen = [available[i] for i in rng.choice(len(available), size=self.num_ids, replace=False)]
            batches.append([chunks[pid].pop(0) for pid in chosen])
            available = [pid for pid in available if chunks[pid]]
        return [[index for chunk in batch for index in chunk] for batch in batches]

    def _split_for_rank(self, batches: list[list[SampleRef]]) -> list[list[SampleRef]]:
        share = (self.num_ids // self.world_size) * self.num_instances
        return [batch[self.rank * share : (self.rank + 1) * share] for batch in batches]


class SourceBalancedBatchSampler(RandomIdentityBatchSampler):
    """P x K batches of a set combined of several datasets (``source_labels``: the first label of each), each batch
    ``num_ids / datasets`` identities of every dataset (fast-reid's set-weighted sampling, with equal weights):
    large datasets no longer crowd the small ones out of the batches.

    Chunks as :class:`RandomIdentityBatchSampler`'s; an epoch uses the chunks of the dataset with the most once, the
    others' chunks drawn anew whenever fewer than their share of identities has chunks left. A batch lists the
    datasets' identities in turn (one of each, then the next of each), so that each rank's share mixes them."""

    def __init__(
        self,
        pids: Sequence[int],
        source_labels: Sequence[int],
        num_ids: int = 16,
        num_instances: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(pids, num_ids, num_instances, seed, rank, world_size)
        starts = list(source_labels) if isinstance(source_labels, (list, tuple)) else None
        if not starts or len(starts) < 2 or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"source_labels must be the increasing first labels of 2+ datasets, from 0, got {starts}")
        bounds = [*starts[1:], max(self.groups) + 1]
        self.sources = [[pid for pid in sorted(self.groups) if low <= pid < high] for low, high in zip(starts, bounds)]
        if self.num_ids % len(self.sources):
            raise ValueError(f"num_ids={self.num_ids} is not divisible by the {len(self.sources)} datasets")
        short = next((i for i, pids in enumerate(self.sources) if len(pids) < self.num_ids // len(self.sources)), None)
        if short is not None:
            raise ValueError(
                f"dataset {short} has {len(self.sources[short])} identities, fewer than its share of a batch, "
                f"{self.num_ids // len(self.sources)}"
            )
        self.source_labels = tuple(starts)

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        share = self.num_ids // len(self.sources)
        chunks = [self._identity_chunks(pids, rng) for pids in self.sources]
        lead = max(range(len(chunks)), key=lambda i: sum(map(len, chunks[i].values())))  # the most chunks
        batches = []
        while True:
            picked = []
            for source, pids in enumerate(self.sources):
                available = [pid for pid in pids if chunks[source][pid]]
                if len(available) < share:
                    if source == lead:
                        return batches
                    chunks[source] = self._identity_chunks(pids, rng)
                    available = list(pids)
                chosen = rng.choice(len(available), size=share, replace=False)
                picked.append([chunks[source][available[i]].pop(0) for i in chosen])
            batches.append([index for turn in zip(*picked) for chunk in turn for index in chunk])

    def _plan(self) -> dict:
        return {**super()._plan(), "source_labels": list(self.source_labels)}


class MaskReIDBatchSampler(_EpochBatchSampler):
    """MaskReID's ranking batch (the paper's Section 4): ``num_positives`` images of one anchor
    identity followed by one image each of ``num_negatives`` other distinct identities (10 + 54 = 64).

    The anchor identities of an epoch are a permutation of all identities, so an epoch is one
    batch per identity (the paper leaves the epoch undefined), or ``batches_per_epoch`` batches
    cycling through fresh permutations. An anchor with fewer than ``num_positives`` images is
    sampled with replacement (the paper does not say). The anchor's images are
    always the first ``num_positives`` positions of a batch.

    Distributed: a batch is one ranking problem and is not split; rank r takes global batches
    r, r + world_size, ... (the epoch is cut to a multiple of ``world_size``).
    """

    SIZES = ("num_positives", "num_negatives", "batches_per_epoch")

    def __init__(
        self,
        pids: Sequence[int],
        num_positives: int = 10,
        num_negatives: int = 54,
        batches_per_epoch: Optional[int] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(pids, seed, rank, world_size)
        num_positives = check_count("num_positives", num_positives, 2)  # an anchor and at least one positive
        num_negatives = check_count("num_negatives", num_negatives, 1)
        if batches_per_epoch is not None:  # each rank takes every world_size-th batch: fewer left ranks none
            why = f" (one for each of the {world_size} processes; an epoch is planned up front)"
            check_count("batches_per_epoch", batches_per_epoch, world_size, MAX_BATCHES_PER_EPOCH, why=why)
        if len(self.groups) < num_negatives + 1:
            raise ValueError(
                f"a MaskReID batch needs {num_negatives + 1} distinct identities, the data has {len(self.groups)}"
            )
        self.num_positives = num_positives
        self.num_negatives = num_negatives
        if batches_per_epoch is None and len(self.groups) < world_size:  # the default: one batch per identity
            raise ValueError(
                f"a MaskReID epoch of one batch per identity ({len(self.groups)}) leaves some of the {world_size} "
                "processes no batch: pass batches_per_epoch >= the number of processes"
            )
        self.batches_per_epoch = batches_per_epoch or len(self.groups)
        self._pid_list = list(self.groups)

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        anchors: list[int] = []
        while len(anchors) < self.batches_per_epoch:
            anchors += rng.permutation(len(self._pid_list)).tolist()
        batches = []
        for anchor in anchors[: self.batches_per_epoch]:
            indices = self.groups[self._pid_list[anchor]]
            replace = len(indices) < self.num_positives
            batch = rng.choice(indices, size=self.num_positives, replace=replace).tolist()
            others = rng.choice(len(self._pid_list) - 1, size=self.num_negatives, replace=False)
            for other in others.tolist():
                pid = self._pid_list[other + (other >= anchor)]  # skip the anchor identity
                group = self.groups[pid]
                batch.append(group[int(rng.integers(len(group)))])
            batches.append(batch)
        return batches

    def _split_for_rank(self, batches: list[list[SampleRef]]) -> list[list[SampleRef]]:
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]
