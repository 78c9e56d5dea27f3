"""dpm_ops: fused kernels and pipelines for occluded / mask-based person re-ID (DPM, MaskReID)."""

from . import evaluation, ops
from ._backend import backends

__version__ = "0.1.0"
__all__ = ["evaluation", "ops", "backends", "__version__"]
