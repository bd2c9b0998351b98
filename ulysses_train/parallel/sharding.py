"""ZeRO-style sharding over the flattened dp × sp mesh with FSDP2 (`fully_shard`).

Sequence-parallel ranks hold the same weights but see different tokens, so for sharding they
count as data parallel, as in DeepSpeed: parameters, gradients and optimizer state are sharded
over `dp_sp`, the same group the loss and token counts are summed over.

How `parallel.zero` maps to FSDP2:
- 0: not sharded. Every rank keeps full parameters, gradients and optimizer state; gradients
  are summed over dp_sp by `data_parallel.reduce_gradients_` (one coalesced all-reduce).
- 2: `fully_shard(reshard_after_forward=False)`. Gradients and optimizer state are sharded
  (reduce-scattered); parameters are gathered once per micro-batch forward and kept until that
  micro-batch's backward is done, and — with gradient accumulation — kept gathered across the
  step's micro-batches (`set_reshard_after_backward(False)` until the last one). Between steps
  only the shards persist, so "params replicated" holds only inside a step: FSDP2 frees them
  after the last backward.
- 3: `fully_shard(reshard_after_forward=True)`. Parameters are sharded too and re-gathered
  for each block's forward and again for its backward.

Gradients are *summed* (divide factor 1): the loss is already divided by the global token count,
and FSDP2's default average over the mesh would divide a second time (docs/architecture.md §1).

Mixed precision (the policy of `model/precision.py`, the same as zero=0's): parameters are
gathered in the compute dtype (`param_dtype`, bf16 under `train.precision=bf16`), gradients are
reduced and kept in fp32 (`reduce_dtype`), master weights stay fp32. `cast_forward_inputs=False`:
FSDP2 must not cast what a block is given — that would turn the fp32 RoPE cos/sin tables into
bf16 under ZeRO only. The residual stream is already in the compute dtype (the model casts the
embedding output), and the trainer's autocast is active in every layout.
"""
from __future__ import annotations

import torch
from torch import nn

from .mesh import ParallelDims


def fsdp_modules(model: nn.Module):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def apply_sharding(model: nn.Module, dims: ParallelDims, zero: int,
                   param_dtype: torch.dtype | None = None) -> bool:
    """Wrap every block and then the root with `fully_shard` over dp_sp; True if it did.

    Blocks first (bottom-up): each block becomes one all-gather / reduce-scatter group, so
    communication overlaps the neighbouring blocks' compute; the root group holds the
    embedding, final norm and head. Call after tensor parallelism and before `to_empty`.
    """
    if zero == 0 or dims.dp_sp == 1:
        return False  # nothing to shard over: the plain path is exactly the reference
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = dims.meshes["dp_sp"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=zero == 3, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=zero == 3, mp_policy=policy)
    for module in fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            # A factor of 1 would otherwise be sent as PREMUL_SUM, which gloo does not have.
            module.set_force_sum_reduction_for_comms(True)
    return True


def set_last_micro_batch(model: nn.Module, zero: int, last: bool) -> None:
    """ZeRO-2 keeps parameters gathered across a step's micro-batches, freeing them after the last."""
    if zero == 2:
        for module in fsdp_modules(model):
            module.set_reshard_after_backward(last)
