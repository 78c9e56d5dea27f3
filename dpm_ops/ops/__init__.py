"""Fused ops of dpm_ops (torch custom ops under the ``dpm_ops`` namespace)."""

from .masked_cosine_reference import masked_cosine_reference as masked_cosine  # replaced by the dispatching op

__all__ = ["masked_cosine"]
