"""Reductions over the data-parallel (dp × sp) group: token counts, losses and gradients.

Sequence-parallel ranks hold the same weights but different tokens, so for everything below they
count as data parallel: sums go over the flattened `dp_sp` group (docs/architecture.md §1). Every
function has a size-1 path (group None) that does nothing, so a single process runs exactly the
reference.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def all_reduce_(tensor: torch.Tensor, group, op=None) -> torch.Tensor:
    """In-place all-reduce (SUM by default) over `group`; the tensor itself when group is None."""
    if group is not None:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


def reduce_gradients_(params: Iterable[torch.nn.Parameter], group) -> None:
    """Sum every parameter's gradient over `group`, in fp32, in one collective per dtype/device.

    Sum, not mean: the loss was already divided by the global token count, so each rank's
    gradient is its share of the global gradient (docs/architecture.md §1: divide exactly once). A
    parameter without a gradient on this rank contributes zeros, so every rank issues the same
    collective.
    """
    if group is None:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        # A tensor-parallel gradient is a DTensor: its local shard is what this rank sums with
        # the same shard on the other dp x sp ranks (they share the tp coordinate).
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        buckets.setdefault((grad.dtype, grad.device), []).append(grad)
    for grads in buckets.values():
        flat = _flatten_dense_tensors(grads)  # one contiguous buffer: one collective, no strides
        wire = flat.float() if flat.dtype != torch.float32 else flat
        dist.all_reduce(wire, group=group)
        wire = wire.to(flat.dtype)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(wire, grads)):
            grad.copy_(reduced)
