"""Parallelism, applied to a single-device model from outside (DESIGN §3)."""
from .mesh import ParallelDims

__all__ = ["ParallelDims"]
