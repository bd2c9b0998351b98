"""The mixed-precision policy, the helpers that let every code path follow it, and
`WeightCasts`: one compute-dtype copy of each weight per step where FSDP2 does not gather them.

Policy (the same for every layout: zero 0/2/3, tp, sp; docs/parallelism.md, "Mixed precision"):
- master weights, gradients as stored and optimizer state: fp32;
- matmuls and attention: the compute dtype (bf16 under `train.precision=bf16`, by autocast, by
  `WeightCasts`' per-step copies, or by FSDP2's `param_dtype` gathering the weights in bf16 —
  all round each weight once to bf16);
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
from typing import Callable

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


class _CachedCast(torch.autograd.Function):
    """`weight.to(low.dtype)` whose forward returns the precomputed `low` (no cast) and whose
    backward is the cast's: the low-precision gradient upcast to the weight's dtype, exactly
    autograd's `ToCopyBackward` for the cast autocast would have made."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        ctx.dtype = weight.dtype
        return low.view_as(low)  # an alias: the cached copy is never written in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class WeightCasts:
    """One compute-dtype copy of each fp32 weight per optimizer step, instead of autocast's cast
    at every use: every micro-batch, every recompute (activation checkpointing, tiled MLP/loss).

    Used where FSDP2 does not gather the weights in the compute dtype (one rank, DDP, tp at
    zero=0; parallel/parallelize.py). A forward pre-hook on every module that owns fp32
    parameters puts their low-precision copies in its place for the call (autocast then has
    nothing to cast) and a forward hook puts the fp32 parameters back, so the optimizer, the
    gradient reduction and the state dict only ever see fp32 master weights.

    The arithmetic is autocast's, bit for bit: the copy is `weight.to(dtype)` (the same
    rounding), and the autograd graph has what autocast's cache builds — one cast node per
    weight per forward of the root module (the uses inside one forward sum their bf16
    gradients before the upcast, as autocast's cache does), and a fresh node per module call
    outside it (a recompute during backward: each tiled-MLP chunk upcasts its own gradient, as
    each chunk's own autocast context does today).

    Kept as fp32 per use (autocast, as before): `nn.Embedding` tables for the lookup (the lookup
    of a fp32 table and its fp32 backward are the policy; where the table is also the tied head,
    the head's function is wrapped with `around`); and a module with a `weight_fn` (the
    tensor-parallel QK-norm, whose gradient must be summed over tp in fp32 before any rounding).

    Invalidation: a copy is valid while its weight's version counter is unchanged (an optimizer
    step, a checkpoint load, any in-place write through autograd-visible ops bumps it; writes
    through `.data` or a DTensor's local tensor do not — those happen before training only,
    and `release` after each step drops every copy anyway). `release()` frees the copies: the
    gradient sync calls it after a step's last backward (they are stale once the optimizer
    steps, so holding them longer would only cost memory).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.copies: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id -> (w, version, low)
        self.nodes: dict[int, torch.Tensor] | None = None  # inside a root forward: id -> node
        self.casts = 0  # casts made so far (tests count them)
        hooks = [(model, self._open, self._close)]
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) or getattr(module, "weight_fn", None):
                continue
            if any(self._castable(p) for p in module.parameters(recurse=False)):
                hooks.append((module, self._swap_in, self._swap_out))
        self.handles = [h for module, pre, post in hooks
                        for h in (module.register_forward_pre_hook(pre),
                                  module.register_forward_hook(post, always_call=True))]

    def around(self, fn: Callable, module: torch.nn.Module) -> Callable:
        """`fn` with `module`'s weights in the compute dtype during each call: for code that
        reads them outside `module`'s own forward (the tied head reads the embedding table;
        the tiled loss calls it again in backward)."""
        def call(*args, **kwargs):
            swapped = self.handles and self._put_low(module)  # nothing once removed
            try:
                return fn(*args, **kwargs)
            finally:
                if swapped:
                    self._swap_out(module, args, None)
        return call

    def remove(self) -> None:
        """Undo: the model casts at every use under autocast again (tests compare the two)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.release()

    @staticmethod
    def _castable(p: torch.Tensor) -> bool:
        return p.dtype == torch.float32

    def low(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` in the compute dtype: the step's cached copy, cast now if there is none or
        the weight changed; with autograd on, behind one `_CachedCast` node per root forward."""
        key = id(weight)
        entry = self.copies.get(key)
        if entry is None or entry[0] is not weight or entry[1] != weight._version:
            entry = (weight, weight._version, weight.detach().to(self.dtype))
            self.copies[key] = entry
            self.casts += 1
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return entry[2]
        if self.nodes is None:  # a recompute in backward: its own node, as its own autocast
            return _CachedCast.apply(weight, entry[2])
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = _CachedCast.apply(weight, entry[2])
        return node

    def release(self) -> None:
        """Drop every cached copy (after a step's last backward)."""
        self.copies.clear()

    # ---- hooks ---------------------------------------------------------------------------
    def _open(self, module, args):
        self.nodes = {}

    def _close(self, module, args, output):
        self.nodes = None

    def _swap_in(self, module, args) -> None:  # a pre-hook: returning a value replaces args
        self._put_low(module)

    def _put_low(self, module) -> bool:
        """Put `module`'s low-precision weights in place; False if they already are."""
        if "_saved_fp32" in module.__dict__:
            return False
        module._saved_fp32 = dict(module._parameters)
        for name, p in module._saved_fp32.items():
            if p is not None and self._castable(p):
                # bypasses nn.Module.__setattr__, which admits only Parameters (FSDP2 does the same)
                module._parameters[name] = self.low(p)
        return True

    def _swap_out(self, module, args, output):
        saved = module.__dict__.pop("_saved_fp32", None)
        if saved is not None:
            module._parameters.update(saved)
