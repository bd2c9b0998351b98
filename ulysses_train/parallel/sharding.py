"""ZeRO-style sharding over the flattened dp × sp mesh with FSDP2 (`fully_shard`), or hybrid
sharding (HSDP) within groups of `parallel.shard_group` ranks.

Sequence-parallel ranks hold the same weights but see different tokens, so for sharding they
count as data parallel, as in DeepSpeed: parameters, gradients and optimizer state are sharded
over `dp_sp`, the same group the loss and token counts are summed over.

How `parallel.zero` maps to FSDP2:
- 0: not sharded. Every rank keeps full parameters, gradients and optimizer state; gradients
  are summed over dp_sp by DDP during backward (grad_sync.DDP), or with tp > 1 by one coalesced
  all-reduce after it (grad_sync.Plain).
- 2: `fully_shard(reshard_after_forward=False)`. Gradients and optimizer state are sharded
  (reduce-scattered); parameters are gathered once per micro-batch forward and kept until that
  micro-batch's backward is done, and — with gradient accumulation — kept gathered across the
  step's micro-batches (`set_reshard_after_backward(False)` until the last one). Between steps
  only the shards persist, so "params replicated" holds only inside a step: FSDP2 frees them
  after the last backward.
- 3: `fully_shard(reshard_after_forward=True)`. Parameters are sharded too and re-gathered
  for each block's forward and again for its backward.

Hybrid sharding (`parallel.shard_group=N` < dp × sp, docs/architecture.md §5): FSDP2's own 2-D
mesh (replicate, shard) — the mesh's "hsdp" view, shard groups of N consecutive ranks. Each
block's gradients are reduce-scattered inside the shard group and then all-reduced across the
dp_sp/N replicas (one all-reduce per block, over the slow links); parameters are all-gathered
inside the group only. The optimizer state is sharded N ways and replicated.

Gradient accumulation (what FSDP2's docs offer: `set_requires_gradient_sync`, the equivalent of
FSDP1's `no_sync`, and `set_requires_all_reduce` for HSDP). Micro-batches before the last:
- zero=2: no gradient communication at all. The parameters are kept gathered through the step
  anyway, so the unsharded gradients accumulate beside them (one more fp32 copy of a block's
  gradient per block) and are reduced once, on the last micro-batch.
- zero=3: reduce-scatter every micro-batch — keeping unsharded gradients across micro-batches
  would hold a whole unsharded gradient, which is what ZeRO-3 exists to avoid. Under HSDP the
  cross-group all-reduce waits for the last micro-batch (FSDP2 accumulates the partial sums).

Prefetching is set explicitly, one block ahead: in forward each block issues the next block's
all-gather after its own; in backward each block issues the previous block's. That is FSDP2's
default overlap made explicit (issued earlier from the CPU in forward); more than one ahead
would hold more gathered blocks in memory.

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
    """Wrap every block and then the root with `fully_shard` over dp_sp (or the 2-D HSDP mesh
    when `dims.hsdp`); True if it did.

    Blocks first (bottom-up): each block becomes one all-gather / reduce-scatter group, so
    communication overlaps the neighbouring blocks' compute; the root group holds the
    embedding, final norm and head. Call after tensor parallelism and before `to_empty`.
    """
    if zero == 0 or dims.dp_sp == 1:
        return False  # nothing to shard over: the plain path is exactly the reference
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = dims.meshes["hsdp" if dims.hsdp else "dp_sp"]  # 2-D (replicate, shard) or 1-D
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
    set_prefetch(list(model.layers))
    return True


def set_prefetch(blocks: list) -> None:
    """One block ahead in each direction (see the module docstring), set explicitly."""
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])


def set_last_micro_batch(model: nn.Module, zero: int, last: bool) -> None:
    """Before micro-batch `last` or not of a step: what FSDP2 keeps and communicates.

    ZeRO-2 keeps parameters gathered across a step's micro-batches (freed after the last) and
    reduces gradients only on the last; ZeRO-3 reduce-scatters every micro-batch and, under
    HSDP, all-reduces across shard groups only on the last (module docstring).
    """
    # `model` is the root FSDP module: each setter recurses into every block
    if zero == 2:
        model.set_reshard_after_backward(last)
        model.set_requires_gradient_sync(last)
    else:
        model.set_requires_all_reduce(last)  # no-op without a replicate dimension
