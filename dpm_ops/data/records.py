"""The records every loader returns."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional


class ImageRecord(NamedTuple):
    """One image: its path, person id and 0-based camera index.

    Train pids are relabelled 0..N-1; query/gallery pids keep the dataset's own numbering
    (distractor pid 0 included) so that evaluation matches on the original ids.
    """

    path: str
    pid: int
    camid: int


@dataclasses.dataclass
class ReIDSplits:
    """Train/query/gallery lists of one dataset plus what evaluation and MaskReID need."""

    name: str
    root: str
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    num_cams: int
    # original train pid -> relabelled 0..N-1
    train_pid_map: dict[int, int] = dataclasses.field(default_factory=dict)
    # image path -> foreground mask path; None when masks were not requested
    mask_paths: Optional[dict[str, str]] = None
    # paths of images known to be occluded (or partial); None when the dataset does not say
    occluded_paths: Optional[frozenset[str]] = None
    junk_dropped: int = 0
    # Market-1501's hand-drawn gt_bbox boxes, the multi-query pools (every id, original pids);
    # None unless the loader was asked for them
    multi_query: Optional[list[ImageRecord]] = None
    # gallery pids that mark images of no identity (Market-1501's 0): never trained on as an identity
    distractor_pids: frozenset[int] = frozenset()
    # the first train label of each dataset of a set combined of several (combine_datasets); () for one dataset
    source_labels: tuple[int, ...] = ()
    # a set with no test split of its own (CUHK-SYSU's crops, DGD's Shinpuhkan): combineall trains on its train split
    train_only: bool = False
    # a run tested on several sets (dataset.test_name a list): the sets after the first, each as this one (its name,
    # query, gallery, masks, occlusion labels), the train split shared
    more_tests: tuple["ReIDSplits", ...] = ()

    @property
    def num_train_pids(self) -> int:
        return len(self.train_pid_map)

    def is_occluded(self, record: ImageRecord) -> Optional[bool]:
        """Whether an image is occluded, or None when the dataset gives no occlusion labels."""
        if self.occluded_paths is None:
            return None
        return record.path in self.occluded_paths

    def summary(self) -> str:
        """A small table of ids / images / cameras per split."""
        lines = [f"{self.name} ({self.root})", f"  {'split':<8}{'ids':>7}{'images':>9}{'cams':>6}"]
        for split_name in ("train", "query", "gallery"):
            records = getattr(self, split_name)
            ids = len({r.pid for r in records})
            cams = len({r.camid for r in records})
            lines.append(f"  {split_name:<8}{ids:>7}{len(records):>9}{cams:>6}")
        if self.junk_dropped:
            lines.append(f"  junk images (pid -1) dropped: {self.junk_dropped}")
        if self.occluded_paths is not None:
            occluded_queries = sum(r.path in self.occluded_paths for r in self.query)
            lines.append(f"  occluded queries: {occluded_queries} / {len(self.query)}")
        for test in self.more_tests:  # their query and gallery lines
            lines += [f"and {test.name} ({test.root})", *test.summary().splitlines()[3:]]
        return "\n".join(lines)
