"""Parallelism, applied to a single-device model from outside (docs/architecture.md §3)."""
from .mesh import ParallelDims
from .ulysses import UlyssesAttention

__all__ = ["ParallelDims", "UlyssesAttention"]
