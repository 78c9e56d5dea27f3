"""Errors and warnings raised by the data layer.

Every problem with a dataset on disk surfaces as one exception whose message names the offending
file or folder, so a user sees a single clear line instead of a deep traceback.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset on disk is malformed: wrong layout, bad filename, unreadable image or mask."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset folder, list file, image or mask that should exist does not."""


class DatasetCountWarning(UserWarning):
    """A split's id/image count differs from the published count (a partial copy of the dataset)."""
