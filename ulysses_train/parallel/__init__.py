"""Parallelism, applied to a single-device model from outside (docs/architecture.md §3)."""
from .mesh import ParallelDims
from .ring import RingAttention, UlyssesRingAttention
from .ulysses import UlyssesAttention

__all__ = ["ParallelDims", "RingAttention", "UlyssesAttention", "UlyssesRingAttention"]
