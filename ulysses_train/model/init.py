"""Layout-independent, name-seeded parameter initialisation.

The problem (docs/architecture.md §1): random init applied to an already-sharded parameter gives
each shard its own random stream, so a tp=2 run would start from different weights than a single
process. The scheme here makes the initial value of every parameter a pure function of (seed,
parameter name, shape, device type):

1. a 63-bit generator seed is derived from `sha256(f"{seed}:{name}")` (stable across processes
   and Python versions, unlike `hash()`, which is salted per process);
2. the *full* (global-shape) tensor is drawn from a fresh `torch.Generator` with that seed;
3. the full tensor is copied into the parameter, or, for a DTensor, the slice this rank owns is
   cut out locally (`distribute_tensor(..., src_data_rank=None)`: no communication, every rank
   drew the same full tensor) and copied into the local shard.

Consequences: the value of a parameter does not depend on module creation order, on how many
other parameters exist, on the sharding layout, or on the dtype of the parameter (drawn in fp32,
then cast). It *does* depend on the device type: the full tensor is drawn on the parameter's
device, because CPU and CUDA generators produce different streams and drawing an 8B-parameter
model on the CPU would take minutes. Every rank of one job has the same device type, so layouts
compare equal; a CPU run and a GPU run start from different (equally distributed) weights.

Names are canonicalised first, so wrappers applied before `init_weights` (activation
checkpointing, `torch.compile`, FSDP1) do not change the stream.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch

# Prefixes that module wrappers insert into parameter names; stripped so that a wrapped model
# draws exactly the values of the unwrapped one.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """The parameter name with module-wrapper components removed."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def param_seed(seed: int, name: str) -> int:
    """A stable 63-bit generator seed for (run seed, canonical parameter name)."""
    digest = hashlib.sha256(f"{seed}:{canonical_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import (
        DTensor,  # lazy: plain single-device use never needs it
    )

    return isinstance(t, DTensor)


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (global-shape) tensor into `param`, keeping only the local shard of a DTensor.

    This is the one place that knows about sharded parameters; the model itself never does.
    """
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"full tensor {tuple(full.shape)} does not match parameter {tuple(param.shape)}")
    with torch.no_grad():
        if _is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            # src_data_rank=None: slice locally instead of scattering from rank 0; valid because
            # every rank drew the identical full tensor from the same seed.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)


def _local_device(param: torch.Tensor) -> torch.device:
    return param.to_local().device if _is_dtensor(param) else param.device


def init_param_(
    param: torch.Tensor, name: str, seed: int, fill: Callable[[torch.Tensor, torch.Generator], None]
) -> None:
    """Draw the full fp32 tensor for `name` with `fill(tensor, generator)` and copy it in."""
    device = _local_device(param)
    if device.type == "meta":
        raise RuntimeError(f"{name} is on the meta device: call model.to_empty(device=...) first")
    generator = torch.Generator(device=device).manual_seed(param_seed(seed, name))
    full = torch.empty(tuple(param.shape), dtype=torch.float32, device=device)
    fill(full, generator)
    copy_full_(param, full)
