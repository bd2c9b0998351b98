"""Reductions over the data-parallel (dp × sp) group: token counts, losses and gradients, and
`GradSync`, the one object that knows how a step's gradients become the global ones.

`GradSync` has three regimes, chosen once by parallel/parallelize.py, so the training step has no
branch over layouts: `Plain` (one rank; or zero=0 with tensor parallelism: one coalesced
all-reduce after the last backward), `DDP` (zero=0: bucketed all-reduces overlapping backward,
skipped before the last micro-batch) and `FSDP` (zero=2/3: FSDP2 reduce-scatters; what it keeps
and communicates per micro-batch is `sharding.set_last_micro_batch`'s).

Sequence-parallel ranks hold the same weights but different tokens, so for everything below they
count as data parallel: sums go over the flattened `dp_sp` group (docs/architecture.md §1). Every
function has a size-1 path (group None) that does nothing, so a single process runs exactly the
reference.

Gradients at zero=0 (replicated weights): torch's DistributedDataParallel (`replicate`) — its
reducer all-reduces ~25 MB buckets of gradients as soon as each bucket's gradients are ready, so
communication overlaps the rest of backward, and `no_sync()` skips it on the micro-batches
before the last. Why DDP and not the composable `replicate`: in torch 2.8..2.13 the composable
one lives only under the private `torch.distributed._composable` (and is DDP inside), while
DDP is public and stable. DDP cannot take DTensor parameters (its start-up broadcast has no
sharding rule), so with tensor parallelism (tp > 1) zero=0 keeps `reduce_gradients_`: one
coalesced all-reduce after backward (torchtitan likewise refuses DDP with more than 1-D meshes;
use zero=2/3 there for overlap).
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .sharding import set_last_micro_batch


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


def replicate(model: nn.Module, group, device: torch.device,
              bucket_cap_mb: float | None = None) -> nn.Module | None:
    """A DDP wrapper of `model` whose gradients are *summed* over `group`; None when group is
    None (one rank: nothing to reduce).

    Call it for zero=0 with plain (non-DTensor) parameters only (module docstring). Run forward
    and backward through the wrapper; `model` itself stays the unwrapped module, so its
    parameters, state dict and checkpoints are unchanged. Sum, not DDP's mean: the loss was
    already divided by the global token count (docs/architecture.md §1: divide exactly once).
    `bucket_cap_mb`: DDP's bucket size (None: its default, 25 MB; the first bucket is 1 MB).
    Buffers (RoPE tables) are computed alike on every rank, so they are not broadcast.
    """
    if group is None:
        return None
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch 2.13 renamed broadcast_buffers (deprecated, warns) to forward_sync_buffers; 2.8
    # has only the old name. Either way: no buffer broadcast before each forward.
    buffers = ("forward_sync_buffers" if "forward_sync_buffers"
               in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group, bucket_cap_mb=bucket_cap_mb, **{buffers: False},
        gradient_as_bucket_view=True)  # grads are views into the buckets: no second copy
    ddp.register_comm_hook(group, sum_hook)
    return ddp


def sum_hook(group, bucket):  # no annotations: DDP checks them, and ours would be strings
    """DDP communication hook: all-reduce (SUM) one bucket of gradients, asynchronously;
    returns a torch.futures.Future of the reduced bucket.

    DDP's default hook divides by the group size; ours must not (see `replicate`).
    bucket.buffer(): the bucket's gradients flattened, 1-D, in the parameters' dtype (fp32:
    master weights are fp32 under every precision policy, model/precision.py).
    """
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class GradSync:
    """How the gradients of one optimizer step are reduced over dp x sp.

    Use: for each micro-batch, `with sync.micro_batch(last): sync.module(...).backward()`; after
    the last, `sync.finish()`. Then every rank holds the global gradient (replicated, or its
    tp/FSDP shard), summed — never averaged: the loss was divided by the global token count.
    `module` is what forward runs through (a DDP wrapper, or the model itself); the model's
    parameters, state dict and checkpoints are never the wrapper's.
    """

    weight_casts = None  # the model's WeightCasts (model/precision.py), set by parallelize

    def __init__(self, module: nn.Module):
        self.module = module

    def micro_batch(self, last: bool):
        """Context for one micro-batch's forward and backward; `last`: the step's last."""
        return contextlib.nullcontext()

    def finish(self) -> None:
        """After the last backward of the step: frees the step's low-precision weight copies
        (stale once the optimizer steps; subclasses reduce gradients first)."""
        if self.weight_casts is not None:
            self.weight_casts.release()


class Plain(GradSync):
    """One rank (group None: nothing to do), or replicated DTensor parameters (tp > 1 at
    zero=0, which DDP cannot take): one coalesced all-reduce after backward."""

    def __init__(self, model: nn.Module, group):
        super().__init__(model)
        self.group = group

    def finish(self) -> None:
        reduce_gradients_(self.module.parameters(), self.group)
        super().finish()


class DDP(GradSync):
    """zero=0 with plain parameters: torch's DistributedDataParallel (`replicate`) all-reduces
    buckets during backward, on the last micro-batch only (`no_sync` before it)."""

    def micro_batch(self, last: bool):
        return contextlib.nullcontext() if last else self.module.no_sync()


class FSDP(GradSync):
    """zero=2/3: FSDP2 reduce-scatters (and under HSDP all-reduces) inside backward."""

    def __init__(self, model: nn.Module, zero: int):
        super().__init__(model)
        self.zero = zero

    def micro_batch(self, last: bool):
        set_last_micro_batch(self.module, self.zero, last)
        return contextlib.nullcontext()
