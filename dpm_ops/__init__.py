"""dpm_ops: fused kernels and pipelines for occluded / mask-based person re-ID (DPM, MaskReID)."""

from . import ops
from ._backend import backends

__version__ = "0.1.0"
__all__ = ["ops", "backends", "__version__"]
