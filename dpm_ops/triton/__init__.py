"""Triton kernels, one file per op (imported lazily: triton is optional)."""
