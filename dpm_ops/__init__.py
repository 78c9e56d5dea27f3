"""dpm_ops: fused kernels and pipelines for occluded / mask-based person re-ID (DPM, MaskReID)."""

__version__ = "0.1.0"
