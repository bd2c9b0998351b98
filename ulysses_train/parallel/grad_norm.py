"""The global gradient norm and clipping over a mix of plain and DTensor parameters.

`torch.nn.utils.clip_grad_norm_` cannot mix them; the trainer's parameters are plain (one
process, DDP), FSDP2 DTensors on the dp_sp mesh, tensor-parallel DTensors on the tp mesh, or
both at once. Split from tensor.py (the tp plan and the vocab-parallel loss), which it shares
only the functional all-reduce with.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .tensor import all_reduce


def grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The global gradient norm over a mix of plain and DTensor parameters; same on every rank.

    `torch.nn.utils.clip_grad_norm_` cannot mix them (its foreach norm refuses plain tensors
    next to DTensors, and DTensors on different meshes). Here every gradient contributes its
    *local* |g|^p sum (max for inf), reduced over exactly the mesh dims on which it is sharded:
    a sharded dim (Shard, or the _StridedShard FSDP2 uses on top of TP) holds distinct pieces
    (summed), a Replicate dim holds copies (counted once), and plain tensors are taken as
    replicated (the trainer has already reduced them over dp_sp).
    Every |g|^p sum is accumulated in float64 (`_local_power_sum`) and reduced in float64:
    torch's fp32 `vector_norm` drifts by ~1e-5..1e-3 relative on multi-million-element CPU
    tensors, and by a different amount per layout, since each shard rounds on its own.
    Returns a float64 scalar tensor (torch returns the gradients' dtype), the same on every rank.
    A Partial gradient (not yet reduced) is an error. Collective: every rank must call it with
    the same parameters, in the same order.
    """
    inf = norm_type == float("inf")
    totals: dict[tuple[str, ...], list[torch.Tensor]] = {}  # shard groups -> local sums
    groups: dict[str, dist.ProcessGroup] = {}
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        key: tuple[str, ...] = ()
        if isinstance(grad, DTensor):
            if any(pl.is_partial() for pl in grad.placements):
                raise ValueError(f"grad_norm: a gradient is still Partial {grad.placements}; "
                                 "reduce it first")
            for dim, pl in enumerate(grad.placements):
                if not pl.is_replicate():  # Shard, or FSDP2's _StridedShard (not a Shard)
                    group = grad.device_mesh.get_group(dim)
                    groups[group.group_name] = group
                    key += (group.group_name,)
            grad = grad.to_local()
        totals.setdefault(key, []).append(_local_power_sum(grad, norm_type))
    device = next((t[0].device for t in totals.values()), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for key, parts in totals.items():  # same keys, same order on every rank
        part = torch.stack(parts).max() if inf else torch.stack(parts).sum()
        for name in key:
            part = all_reduce(part, "max" if inf else "sum", groups[name])
        total = torch.maximum(total, part) if inf else total + part
    return total if inf else total.pow(1.0 / norm_type)


# Elements cast to float64 at a time: a 32 MiB temporary, never an fp64 copy of a whole
# gradient (a 128k x 4096 embedding gradient would need 4 GiB).
_FP64_CHUNK = 1 << 22


def _local_power_sum(grad: torch.Tensor, norm_type: float) -> torch.Tensor:
    """sum(|g|^p) of a local tensor as a float64 scalar (max |g| for p = inf).

    Chunks of `_FP64_CHUNK` elements are upcast before squaring: an fp32 (or bf16) value
    squared is exact in float64 (48 of 53 mantissa bits), so the only rounding left is the
    float64 sum (relative error ~1e-16 * log2(numel)). A max needs no upcast: it is exact.
    """
    if norm_type == float("inf"):
        return torch.linalg.vector_norm(grad, norm_type).double()
    total = torch.zeros((), dtype=torch.float64, device=grad.device)
    for chunk in grad.reshape(-1).split(_FP64_CHUNK):  # (numel,) -> chunks of <= 4M elements
        total += torch.linalg.vector_norm(chunk, norm_type, dtype=torch.float64).pow(norm_type)
    return total


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float,
                    norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for mixed plain/DTensor gradients (see `grad_norm`).

    Scales every gradient by min(1, max_norm / (norm + 1e-6)), torch's formula, on the local
    tensors (no communication beyond the norm). Returns the global norm before clipping, a
    float64 scalar tensor accumulated in float64 (`grad_norm`); the scale is applied in each
    gradient's own dtype.
    """
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grad.mul_(coef.to(grad.dtype))
    return total
