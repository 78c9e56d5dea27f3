"""Re-export of dpm_ops._precision (kept here: the losses import it as ``._precision``)."""

from .._precision import at_least_fp32, common_at_least_fp32

__all__ = ["at_least_fp32", "common_at_least_fp32"]
