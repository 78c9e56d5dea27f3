"""Which images the set holds: split, pid, camera, name and occlusion of every image, decided
from the seed before anything is drawn."""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import SynthConfig

# independent random streams derived from the seed
STREAM_PLAN, STREAM_CAMERA, STREAM_IDENTITY, STREAM_IMAGE = range(4)


@dataclasses.dataclass(frozen=True)
class Job:
    folder: str  # bounding_box_train | query | bounding_box_test
    name: str
    identity: int  # index into the identity table, -1 for a one-off person (distractor / junk)
    camera: int  # 0-based
    occluded: bool
    junk: bool


def plan_images(config: SynthConfig) -> tuple[list[Job], list[int]]:
    """Decide every image: split, pid, camera, occlusion. Returns the jobs and the pid table."""
    rng = np.random.default_rng([config.seed, STREAM_PLAN])
    pids = sorted(int(p) for p in rng.choice(np.arange(1, 2 * config.ids + 1), size=config.ids, replace=False))
    order = rng.permutation(config.ids)
    train_ids = sorted(order[: (config.ids + 1) // 2].tolist())
    test_ids = sorted(order[(config.ids + 1) // 2 :].tolist())
    frame = [0] * config.cameras  # strictly increasing per camera, so names never repeat
    jobs: list[Job] = []

    def name_for(pid: int, camera: int, detection: int) -> str:
        frame[camera] += int(rng.integers(20, 400))
        sequence = 1 + frame[camera] // 25000 % 6
        return f"{pid:04d}_c{camera + 1}s{sequence}_{frame[camera]:06d}_{detection:02d}.jpg"

    def cameras_of_identity() -> list[int]:
        count = int(rng.integers(config.id_cameras[0], config.id_cameras[1] + 1))
        return sorted(rng.choice(config.cameras, size=count, replace=False).tolist())

    def add_identity_image(folder: str, identity: int, camera: int, detection: int, occlusion: float) -> None:
        # the draws happen in this order: detection (by the caller), name, occlusion
        name = name_for(pids[identity], camera, detection)
        jobs.append(Job(folder, name, identity, camera, bool(rng.random() < occlusion), False))

    for identity in train_ids:
        cams = cameras_of_identity()
        for _ in range(int(rng.integers(config.train_images[0], config.train_images[1] + 1))):
            camera = int(rng.choice(cams))
            add_identity_image("bounding_box_train", identity, camera, int(rng.integers(1, 6)), config.train_occlusion)
    for identity in test_ids:
        cams = cameras_of_identity()
        for camera in rng.permutation(cams)[: config.queries_per_id].tolist():
            add_identity_image("query", identity, camera, 0, config.query_occlusion)
        for camera in cams:
            for _ in range(int(rng.integers(config.gallery_per_camera[0], config.gallery_per_camera[1] + 1))):
                add_identity_image(
                    "bounding_box_test", identity, camera, int(rng.integers(1, 6)), config.gallery_occlusion
                )
    identity_gallery = sum(job.folder == "bounding_box_test" for job in jobs)
    for pid, share in ((0, config.distractors), (-1, config.junk)):
        for _ in range(int(round(share * identity_gallery))):
            camera = int(rng.integers(config.cameras))
            name = name_for(0, camera, int(rng.integers(1, 6)))
            if pid < 0:
                name = "-1" + name[4:]
            jobs.append(
                Job("bounding_box_test", name, -1, camera, bool(rng.random() < config.gallery_occlusion), pid < 0)
            )
    return jobs, pids


def split_counts(jobs: list[Job], pids: list[int]) -> dict:
    """(ids, images) per split as the loader sees them: junk dropped, distractors one id (pid 0)."""
    split_of_folder = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}
    counts = {}
    for folder, split in split_of_folder.items():
        kept = [job for job in jobs if job.folder == folder and not job.junk]
        ids = {pids[job.identity] if job.identity >= 0 else 0 for job in kept}
        counts[split] = [len(ids), len(kept)]
    return counts
