"""Identity samplers: batch composition, determinism, resume position, DDP split, DataLoader use."""

import re
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dpm_ops.data import (
    ImageDataset,
    ImageRecord,
    MaskReIDBatchSampler,
    RandomIdentityBatchSampler,
    SourceBalancedBatchSampler,
    build_dataloader,
)
from dpm_ops.data.transforms import dpm_train_transforms

# pid -> number of images: a mix of rich identities and ones with fewer than K = 4 images
IMAGES_PER_PID = {10: 9, 11: 4, 12: 1, 13: 2, 14: 6, 15: 5, 16: 8, 17: 3, 18: 4, 19: 12}
PIDS = [pid for pid, count in IMAGES_PER_PID.items() for _ in range(count)]


# a set combined of two datasets (combine_datasets' labels): 3 identities, then 9 with more images
TWO_SOURCES = [pid for pid in range(3) for _ in range(2)] + [pid for pid in range(3, 12) for _ in range(5)]


def flat(batches):
    return [[ref.index for ref in batch] for batch in batches]


def test_pk_batches_have_p_ids_times_k_images():
    sampler = RandomIdentityBatchSampler(PIDS, num_ids=3, num_instances=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in flat(batches):
        counts = Counter(PIDS[index] for index in batch)
        assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}
        for pid in counts:  # identities with >= K images are drawn without replacement within a chunk
            chunk = [index for index in batch if PIDS[index] == pid]
            if IMAGES_PER_PID[pid] >= 4:
                assert len(set(chunk)) == 4
    used = Counter(PIDS[index] for batch in flat(batches) for index in set(batch))
    assert used[12] == 1  # the single-image identity is padded by replacement


def test_pk_epoch_uses_each_chunk_once():
    sampler = RandomIdentityBatchSampler(PIDS, num_ids=2, num_instances=4, seed=1)
    appearances = Counter(PIDS[index] for batch in flat(sampler) for index in batch)
    for pid, count in IMAGES_PER_PID.items():
        assert appearances[pid] <= 4 * max(1, count // 4) and appearances[pid] % 4 == 0  # whole chunks, once
    # Batches are drawn until fewer than num_ids = 2 identities have chunks left: every identity but at
    # most one used all its chunks (an upper bound alone also held for an epoch cut short, or empty).
    unused = [pid for pid, count in IMAGES_PER_PID.items() if appearances[pid] < 4 * max(1, count // 4)]
    assert len(unused) <= 1, unused
    indices = [index for batch in flat(sampler) for index in batch if IMAGES_PER_PID[PIDS[index]] >= 4]
    assert len(indices) == len(set(indices)), "no image repeats within an epoch for rich identities"


def test_deterministic_by_seed_and_epoch():
    def batches(seed, epoch):
        sampler = RandomIdentityBatchSampler(PIDS, num_ids=3, num_instances=4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 2) == batches(0, 2)  # indices and augmentation seeds
    assert batches(0, 2) != batches(0, 3)
    assert batches(0, 2) != batches(1, 2)
    sampler = RandomIdentityBatchSampler(PIDS, num_ids=3, num_instances=4, seed=0)
    sampler.set_epoch(2)
    list(sampler)
    sampler.set_epoch(3)  # one sampler across epochs, as the training loop uses it
    assert list(sampler) == batches(0, 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandomIdentityBatchSampler(PIDS, num_ids=2, num_instances=4, seed=7),
        lambda: MaskReIDBatchSampler(PIDS, num_positives=3, num_negatives=4, seed=7),
        lambda: SourceBalancedBatchSampler(TWO_SOURCES, (0, 3), num_ids=2, num_instances=2, seed=7),
    ],
)
def test_resume_mid_epoch_continues_exactly(make):
    reference = make()
    reference.set_epoch(1)
    uninterrupted = list(reference)

    first = make()
    first.set_epoch(1)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    assert {key: state[key] for key in ("seed", "epoch", "position", "world_size")} == {
        "seed": 7,
        "epoch": 1,
        "position": 3,
        "world_size": 1,
    }

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the training loop calls this again; same epoch keeps the position
    assert seen + list(resumed) == uninterrupted
    assert list(resumed) == uninterrupted, "the next pass starts the epoch from its beginning"

    prefetching = make()  # with workers the loop tells how many batches it consumed
    prefetching.set_epoch(1)
    assert prefetching.state_dict(consumed_batches=2)["position"] == 2
    saved_again = make()
    saved_again.load_state_dict(state)
    assert saved_again.state_dict() == state, "a checkpoint taken before the next batch keeps the position"
    moved_on = make()
    moved_on.load_state_dict(state)
    moved_on.set_epoch(2)
    assert moved_on.state_dict()["position"] == 0
    assert len(list(moved_on)) == len(moved_on), "a new epoch starts at batch 0"


def test_state_from_another_world_size_is_refused():
    state = RandomIdentityBatchSampler(PIDS, num_ids=2, num_instances=2, world_size=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        RandomIdentityBatchSampler(PIDS, num_ids=2, num_instances=2).load_state_dict(state)


def test_state_from_another_sampling_plan_is_refused():
    # the position counts one plan's batches: in another plan it named other batches, silently
    pk = RandomIdentityBatchSampler(PIDS, num_ids=2, num_instances=2, seed=3)
    pk.set_epoch(1)
    next(iter(pk))
    state = pk.state_dict()
    assert state["plan"] == {
        "sampler": "RandomIdentityBatchSampler",
        "num_ids": 2,
        "num_instances": 2,
        "images": len(PIDS),
        "identities": len(IMAGES_PER_PID),
        "labels": f"crc32 {zlib.crc32(np.asarray(PIDS, dtype=np.int64).tobytes()):08x}",
    }
    for other, message in (
        (lambda: RandomIdentityBatchSampler(PIDS, num_ids=2, num_instances=4, seed=3), "num_instances 2 -> 4"),
        (lambda: RandomIdentityBatchSampler(PIDS[:-1], num_ids=2, num_instances=2, seed=3), "images 54 -> 53"),
        (lambda: RandomIdentityBatchSampler(PIDS + [99], num_ids=2, num_instances=2), "identities 10 -> 11"),
        (lambda: RandomIdentityBatchSampler(PIDS[::-1], num_ids=2, num_instances=2, seed=3), "labels 'crc32 "),
        (
            lambda: MaskReIDBatchSampler(PIDS, num_positives=2, num_negatives=2),
            "sampler 'RandomIdentityBatchSampler' -> 'MaskReIDBatchSampler', num_ids 2 -> None",
        ),
    ):
        sampler = other()
        with pytest.raises(ValueError, match=rf"^sampler state was saved by another sampling plan \(.*{message}.*\)"):
            sampler.load_state_dict(state)
        assert (sampler.epoch, sampler.state_dict()["position"]) == (0, 0)  # unchanged by a refused state
    maskreid = MaskReIDBatchSampler(PIDS, num_positives=2, num_negatives=2, batches_per_epoch=5)
    with pytest.raises(ValueError, match=r"batches_per_epoch 5 -> 10\)"):
        MaskReIDBatchSampler(PIDS, num_positives=2, num_negatives=2).load_state_dict(maskreid.state_dict())
    with pytest.raises(ValueError, match=r"^state\['plan'\] must be a dict, got 3$"):
        pk.load_state_dict({**state, "plan": 3})

    same = RandomIdentityBatchSampler(PIDS, num_ids=2, num_instances=2, seed=3)
    same.load_state_dict({key: value for key, value in state.items() if key != "plan"})  # saved before plans
    assert same.state_dict() == state


def test_epochs_positions_and_states_that_do_not_fit_are_refused():
    # a position past the epoch resumed an empty epoch; a state without its keys was a KeyError
    sampler = RandomIdentityBatchSampler(PIDS, num_ids=2, num_instances=2)
    batches = len(sampler)
    state = {**sampler.state_dict(), "seed": 5, "epoch": 3}
    for bad, message in (
        (
            {**state, "position": batches + 1},
            rf"state\['position'\] must be an integer in \[0, {batches}\], got {batches + 1}",
        ),
        ({**state, "epoch": -1}, r"state\['epoch'\] must be an integer >= 0, got -1"),
        ({**state, "seed": 0.5}, r"state\['seed'\] must be an integer >= 0, got 0.5"),
        ({"seed": 0}, r"state must be a state_dict\(\) \(seed, epoch, position\), got \{'seed': 0\}"),
    ):
        with pytest.raises(ValueError, match=rf"^{message}$"):
            sampler.load_state_dict(bad)
        assert (sampler.seed, sampler.epoch) == (0, 0)  # unchanged by a refused state
    sampler.load_state_dict({**state, "position": batches})  # a finished epoch
    assert list(sampler) == []
    with pytest.raises(ValueError, match=r"^epoch must be an integer >= 0, got -1$"):
        sampler.set_epoch(-1)
    with pytest.raises(ValueError, match=rf"^consumed_batches must be an integer in \[0, {batches}\], got -1$"):
        sampler.state_dict(consumed_batches=-1)


def test_distributed_pk_splits_every_global_batch_by_identity():
    single = flat(RandomIdentityBatchSampler(PIDS, num_ids=4, num_instances=2, seed=3))
    ranks = [
        flat(RandomIdentityBatchSampler(PIDS, num_ids=4, num_instances=2, seed=3, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, part0, part1 in zip(single, *ranks):
        assert part0 + part1 == whole
        assert len({PIDS[i] for i in part0}) == 2 and not {PIDS[i] for i in part0} & {PIDS[i] for i in part1}
    with pytest.raises(ValueError, match="divisible"):
        RandomIdentityBatchSampler(PIDS, num_ids=3, num_instances=2, world_size=2, rank=1)


def test_maskreid_batch_is_one_identity_then_distinct_singles():
    sampler = MaskReIDBatchSampler(PIDS, num_positives=5, num_negatives=6, seed=0)
    batches = flat(sampler)
    assert len(batches) == len(IMAGES_PER_PID)  # an epoch = one batch per identity
    anchors = []
    for batch in batches:
        assert len(batch) == 11
        anchor = PIDS[batch[0]]
        anchors.append(anchor)
        assert all(PIDS[index] == anchor for index in batch[:5])
        negatives = [PIDS[index] for index in batch[5:]]
        assert len(set(negatives)) == 6 and anchor not in negatives
        if IMAGES_PER_PID[anchor] >= 5:
            assert len(set(batch[:5])) == 5
    assert sorted(anchors) == sorted(IMAGES_PER_PID), "each identity is the anchor once per epoch"
    # a negative is any image of its identity, not always the same one
    negatives = {index for batch in flat(MaskReIDBatchSampler(PIDS, 5, 6, 200)) for index in batch[5:]}
    assert len({index for index in negatives if PIDS[index] == 19}) > 1
    assert len(MaskReIDBatchSampler(PIDS, 5, 6, batches_per_epoch=23)) == 23
    with pytest.raises(ValueError, match="needs 11 distinct identities"):
        MaskReIDBatchSampler(PIDS, num_positives=10, num_negatives=10)
    with pytest.raises(
        ValueError, match="num_positives must be an integer >= 2"
    ):  # one positive leaves no positive pair
        MaskReIDBatchSampler(PIDS, num_positives=1, num_negatives=6)


def test_pk_needs_num_ids_identities():
    assert len(RandomIdentityBatchSampler(PIDS, num_ids=10, num_instances=1)) > 0
    with pytest.raises(ValueError, match="at least num_ids=11 identities"):
        RandomIdentityBatchSampler(PIDS, num_ids=11, num_instances=1)


def test_distributed_maskreid_deals_whole_batches():
    single = list(MaskReIDBatchSampler(PIDS, 3, 4, seed=2))
    ranks = [list(MaskReIDBatchSampler(PIDS, 3, 4, seed=2, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 3 for r in ranks)  # 10 batches cut to 9
    assert [ranks[i % 3][i // 3] for i in range(9)] == single[:9]


@pytest.fixture()
def image_dataset(tmp_path):
    records = []
    for index, pid in enumerate(PIDS):
        path = tmp_path / f"{pid:04d}_c1s1_{index:06d}_01.jpg"
        Image.new("RGB", (8, 16), (pid * 10 % 256, index * 7 % 256, 90)).save(path)
        records.append(ImageRecord(str(path), pid, 0))
    return ImageDataset(records, dpm_train_transforms(size=(16, 8), padding=2))


def test_dataloader_batches_and_augmentation_do_not_depend_on_workers(image_dataset):
    def run(workers):
        sampler = RandomIdentityBatchSampler(image_dataset.pids, num_ids=2, num_instances=4, seed=5)
        loader = build_dataloader(image_dataset, batch_sampler=sampler, num_workers=workers)
        return [(batch["image"], batch["pid"], batch["index"]) for batch in loader]

    serial, parallel = run(0), run(2)
    assert len(serial) == len(parallel) > 0
    for (image_a, pid_a, index_a), (image_b, pid_b, index_b) in zip(serial, parallel):
        assert image_a.shape == (8, 3, 16, 8)
        assert torch.equal(pid_a, pid_b) and torch.equal(index_a, index_b) and torch.equal(image_a, image_b)


def test_eval_loader_keeps_dataset_order(image_dataset):
    loader = build_dataloader(image_dataset, batch_size=16)
    indices = torch.cat([batch["index"] for batch in loader]).tolist()
    assert indices == list(range(len(image_dataset)))
    assert build_dataloader(image_dataset).batch_size == 256  # DPM's test batch
    # persistent workers asked for without workers: none to keep (torch's DataLoader refuses the pair)
    in_process = build_dataloader(image_dataset, batch_size=16, persistent_workers=True)
    assert not in_process.persistent_workers and len(list(in_process)) == len(loader)
    assert build_dataloader(image_dataset, num_workers=1, persistent_workers=True).persistent_workers


@pytest.mark.parametrize("make", [RandomIdentityBatchSampler, MaskReIDBatchSampler])
def test_rank_world_size_and_empty_data_are_refused(make):
    pids = [pid for pid in range(64) for _ in range(4)]
    for rank, world_size, message in (
        (0, 0, r"world_size must be an integer >= 1, got 0"),
        (-1, 2, r"rank must be an integer in \[0, 1\], got -1"),
        (2, 2, r"rank must be an integer in \[0, 1\], got 2"),
        (0, 2.0, r"world_size must be an integer >= 1, got 2.0"),
    ):
        with pytest.raises(ValueError, match=rf"^{message}$"):
            make(pids, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got -1$"):
        make(pids, seed=-1)
    with pytest.raises(ValueError, match="empty dataset"):
        make([])
    # labels that are no integers: int("a") was the message, 0.5 silently identity 0
    for bad in ("a", 0.5, None, True):
        with pytest.raises(
            ValueError, match=rf"^pids must be integer identity labels, got {re.escape(repr(bad))} at index 4$"
        ):
            make(pids[:4] + [bad] + pids[5:])


def test_sampler_sizes_are_checked_and_default_to_the_papers():
    pids = [pid for pid in range(64) for _ in range(4)]
    for num_ids, num_instances, message in (
        (0, 4, "num_ids must be an integer >= 1, got 0"),
        (16, 0, "num_instances must be an integer >= 1, got 0"),
        (-16, 4, "num_ids must be an integer >= 1, got -16"),
        (16, 2.5, "num_instances must be an integer >= 1, got 2.5"),
    ):
        with pytest.raises(ValueError, match=rf"^{message}$"):
            RandomIdentityBatchSampler(pids, num_ids=num_ids, num_instances=num_instances)
    assert {len(batch) for batch in RandomIdentityBatchSampler(pids, num_ids=1, num_instances=1)} == {1}
    pk = RandomIdentityBatchSampler(pids)
    assert (pk.num_ids, pk.num_instances, pk.seed) == (16, 4, 0)  # DPM: 64 images = 16 ids x 4
    assert {len(batch) for batch in pk} == {64}
    for num_positives, num_negatives, message in (
        (1, 54, "num_positives must be an integer >= 2, got 1"),
        (10, 0, "num_negatives must be an integer >= 1, got 0"),
    ):
        with pytest.raises(ValueError, match=rf"^{message}$"):
            MaskReIDBatchSampler(pids, num_positives=num_positives, num_negatives=num_negatives)
    with pytest.raises(ValueError, match=r"^batches_per_epoch must be an integer in \[1, 1000000\] \(one for each"):
        MaskReIDBatchSampler(pids, batches_per_epoch=0)
    # one batch for two ranks left both with none, and an epoch of no step
    with pytest.raises(
        ValueError, match=r"^batches_per_epoch must be an integer in \[2, 1000000\] \(one for each of the 2"
    ):
        MaskReIDBatchSampler(pids, batches_per_epoch=1, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"^batches_per_epoch must be an integer in \[1, 1000000\]"):
        MaskReIDBatchSampler(pids, batches_per_epoch=10**12)  # planning it would have taken a year
    smallest = MaskReIDBatchSampler(pids, num_positives=2, num_negatives=1)
    assert {len(batch) for batch in smallest} == {3}
    ranking = MaskReIDBatchSampler(pids)
    assert (ranking.num_positives, ranking.num_negatives, ranking.seed) == (10, 54, 0)  # maskreid.md: 10 + 54


def test_maskreid_default_epoch_must_leave_every_process_a_batch():
    """One batch per identity, 3 identities over 4 processes: the epoch was cut to a multiple of 4, none, on
    every rank (an explicit batches_per_epoch of 3 was refused)."""
    pids = [i // 3 for i in range(9)]
    with pytest.raises(ValueError, match=r"one batch per identity \(3\) leaves some of the 4 processes no batch"):
        MaskReIDBatchSampler(pids, num_positives=2, num_negatives=1, rank=0, world_size=4)
    assert len(MaskReIDBatchSampler(pids, num_positives=2, num_negatives=1, batches_per_epoch=4, world_size=4)) == 1


def test_source_balanced_batches_take_each_datasets_share():
    """num_ids / 2 identities of each dataset per batch, in turn (so a rank's share holds both); an epoch uses the
    larger dataset's chunks once, the smaller one's drawn again as they run out."""
    sampler = SourceBalancedBatchSampler(TWO_SOURCES, (0, 3), num_ids=4, num_instances=2, seed=3)
    batches = flat(list(sampler))
    chunks_of_larger = 9 * (5 // 2)
    assert len(batches) == chunks_of_larger // 2 == len(sampler)
    for batch in batches:
        pids = [TWO_SOURCES[index] for index in batch]
        identities = list(dict.fromkeys(pids))
        assert len(batch) == 8 and [pid >= 3 for pid in identities] == [False, True, False, True]
        assert all(pids.count(pid) == 2 for pid in identities)
    larger = Counter(TWO_SOURCES[i] for batch in batches for i in batch if TWO_SOURCES[i] >= 3)
    assert sum(larger.values()) == chunks_of_larger * 2  # each of its chunks once
    shares = [SourceBalancedBatchSampler(TWO_SOURCES, (0, 3), 4, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for whole, first, second in zip(batches, *(flat(list(share)) for share in shares)):
        assert first + second == whole and {TWO_SOURCES[i] >= 3 for i in first} == {False, True}
    plan = sampler.state_dict()["plan"]
    assert plan["source_labels"] == [0, 3] and plan["sampler"] == "SourceBalancedBatchSampler"


@pytest.mark.parametrize(
    "starts, num_ids, message",
    [
        ((0,), 4, r"increasing first labels of 2\+ datasets"),
        ((1, 3), 4, "increasing first labels"),
        ((0, 3, 3), 6, "increasing first labels"),
        ((0, 3), 3, "num_ids=3 is not divisible by the 2 datasets"),
        ((0, 3), 8, "dataset 0 has 3 identities, fewer than its share of a batch, 4"),
    ],
)
def test_source_balanced_sampling_refuses_what_it_cannot_balance(starts, num_ids, message):
    with pytest.raises(ValueError, match=message):
        SourceBalancedBatchSampler(TWO_SOURCES, starts, num_ids=num_ids, num_instances=2)
