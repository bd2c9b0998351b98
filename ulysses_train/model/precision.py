"""The mixed-precision policy, and the two helpers that let every code path follow it.

Policy (the same for every layout: zero 0/2/3, tp, sp; docs/parallelism.md, "Mixed precision"):
- master weights, gradients as stored and optimizer state: fp32;
- matmuls and attention: the compute dtype (bf16 under `train.precision=bf16`, by autocast, or
  by FSDP2's `param_dtype` gathering the weights in bf16 — both round each weight once to bf16);
- the residual stream between blocks: the compute dtype (the embedding output is cast to it);
- RoPE cos/sin: computed and kept fp32; the rotation runs in fp32 and returns q/k's dtype;
- RMSNorm statistics: fp32, output in the compute dtype, the weight rounded to the compute
  dtype first (so a fp32 master weight under autocast and FSDP2's bf16 copy give the same result);
- softmax / log-sum-exp inside attention kernels, log-softmax and cross-entropy: fp32;
- gradient reduction across ranks: fp32 (FSDP2 `reduce_dtype`, and the plain all-reduce of
  fp32 `.grad`s).
With `train.precision=fp32` the compute dtype is fp32 and every rule above is the identity.

`compute_dtype` is how model code finds the compute dtype without being told: it is the
autocast dtype when autocast is on for the tensor's device, else the tensor's own dtype.
`capture_autocast` / `restore_autocast` are the device-agnostic form of
`torch.amp.custom_fwd` / `custom_bwd` (those fix the device type at decoration time, and our
autograd Functions run on CPU in tests and CUDA in training): a backward or a recompute enters
the autocast state its forward saw, since the autograd engine runs backward outside the
caller's `torch.autocast` block (and, on CUDA, on another thread).
"""
from __future__ import annotations

import contextlib

import torch

AutocastState = tuple[str, bool, torch.dtype]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype activations are computed in at `x`: autocast's dtype when autocast is enabled
    for `x.device.type`, else `x.dtype`."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def capture_autocast(device_type: str) -> AutocastState:
    """(device type, enabled, dtype) of the current autocast state, for `restore_autocast`."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def restore_autocast(state: AutocastState) -> torch.autocast:
    """A context that re-enters a captured autocast state (disabled if it was disabled)."""
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype `train.precision` means on `device`: `auto` = fp32 on CPU, bf16 on GPU.
    bf16 is autocast (and FSDP2's param_dtype); master weights stay fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def autocast_to(dtype: torch.dtype, device: torch.device):
    """The context a forward runs in: autocast to `dtype` on `device`, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
