"""What each block keeps for backward: activation checkpointing, CPU offload, compile.

Applied from `parallelize.build_model` after tensor parallelism and before FSDP2
(docs/architecture.md §3), to the single-device blocks through their `checkpoint_fn` hook, so
parameter names (and therefore checkpoints) are the same whatever is chosen here.

`train.activation_checkpointing`:
- none: autograd keeps every intermediate; fastest while it fits.
- full: each block keeps only its input and is recomputed in backward (one extra forward).
- selective: recompute the cheap ops (norms, projections, RoPE, MLP) but keep what is expensive
  to redo: the attention kernel's outputs (at long context attention is most of the FLOPs) and
  the Ulysses all-to-all results (recomputing them would repeat the communication), and the
  ring attention ops' output and LSE (recomputing would re-run the whole ring, or re-send a
  sliding-window layer's halo). Uses
  torch's selective-checkpoint policy API (`create_selective_checkpoint_contexts`).

`train.activation_offload` (with full/selective): the block inputs the checkpoints keep are
moved to pinned CPU memory as they are saved and copied back ahead of their backward on a side
stream (`ActivationOffload`), so GPU memory per layer drops to what one block needs.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)


@functools.cache
def _saved_ops() -> frozenset:
    """Ops whose outputs selective checkpointing keeps (those that exist in this torch build)."""
    names = ["aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
             "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
             "aten._flash_attention_forward", "aten._efficient_attention_forward",
             "_c10d_functional.all_to_all_single", "_c10d_functional.wait_tensor",
             "ulysses_train.ring_attention",  # registered by the ring import above
             "ulysses_train.ring_window_attention"]  # the sliding-window ring (ring_window.py)
    ops = set()
    for name in names:
        namespace, op = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None:
            ops.add(packet.default)
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    return frozenset(ops)


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _saved_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def _checkpoint_fn(mode: str):
    """`fn(run, *args, **kwargs)` for Block.checkpoint_fn (None for mode 'none')."""
    if mode == "none":
        return None
    kw = {"use_reentrant": False, "preserve_rng_state": False}  # no dropout: no RNG to replay
    if mode == "selective":
        kw["context_fn"] = _selective_context
    elif mode != "full":
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    return functools.partial(checkpoint, **kw)


def apply_activation_checkpointing(model: nn.Module, mode: str, offload: bool = False) -> None:
    """Set every block's checkpoint_fn for `mode`; with `offload`, also offload the saved inputs."""
    fn = _checkpoint_fn(mode)
    for block in model.layers:
        block.checkpoint_fn = fn
    if offload:
        if fn is None:
            raise ValueError("activation offload moves checkpointed block inputs: it needs "
                             "activation checkpointing full or selective")
        ActivationOffload().attach(model)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block (one compiled graph shared by all blocks: same code, and
    parameters are graph inputs). Blocks, not the whole model: graphs stay small and the tiled
    loss stays outside. A tiled MLP's autograd function is not traced (graph break): compile
    then fuses the attention half of the block only. `backend` is for tests (aot_eager)."""
    for block in model.layers:
        block.compile(backend=backend)


class ActivationOffload:
    """saved_tensors_hooks that park large saved activations in (pinned) CPU memory.

    Active for the whole model forward (entered and left by forward hooks on the root).
    Inside a checkpointed block the checkpoint's own hooks take precedence, so what reaches these
    hooks is what lives *between* blocks: the checkpoint inputs (block inputs, and cos/sin) and
    the tensors saved outside blocks. Tensors below `min_bytes` are kept as they are. A tensor
    saved again (cos/sin, given to every block) is parked once and counted as used once more.
    Parked tensors keep their dtype: under bf16 the block inputs are parked as bf16 (the
    residual stream's dtype), cos/sin as fp32 — what the precision policy keeps, no more.

    Backward, on CUDA, copies run on a side stream and overlap compute. Each unpack starts the
    host-to-device copy of the nearest earlier-parked tensor still on the host (backward runs
    the blocks in reverse order), at most one ahead of use: while a prefetched tensor waits for
    its unpack no other is started. A tensor saved several times stays on the device from its
    first unpack to its last one, so it is copied back once; any tensor is dropped from the
    device at its last unpack. `_Parked.fetches` counts the copies back (tests assert 1 each).
    """

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self.stream = None
        self._handles: list[_Parked] = []
        self._by_id: dict[int, tuple[weakref.ref, _Parked]] = {}
        self._ahead: _Parked | None = None  # the prefetched tensor not yet unpacked
        self._hooks = None

    @property
    def parked_bytes(self) -> int:
        """Host bytes held by the tensors parked in the last forward (each counted once)."""
        return sum(p.cpu.numel() * p.cpu.element_size() for p in self._handles)

    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._exit)

    def _enter(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return
        self._handles, self._by_id, self._ahead = [], {}, None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def _exit(self, module, args, output) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def _pack(self, t: torch.Tensor):
        if t.numel() * t.element_size() < self.min_bytes:
            return t
        seen = self._by_id.get(id(t))
        if seen is not None and seen[0]() is t:
            seen[1].uses += 1
            return seen[1]
        if t.is_cuda and self.stream is None:
            self.stream = torch.cuda.Stream(t.device)
        parked = _Parked(t, len(self._handles), self.stream)
        self._handles.append(parked)
        self._by_id[id(t)] = (weakref.ref(t), parked)
        return parked

    def _unpack(self, packed):
        if not isinstance(packed, _Parked):
            return packed
        out = packed.get()
        self._prefetch_before(packed.index)
        return out

    def _prefetch_before(self, index: int) -> None:
        """Start copying back the nearest tensor parked before `index` that is neither on the
        device nor used up, unless a prefetched one still waits for its unpack."""
        ahead = self._ahead
        if ahead is not None and ahead.fetched is not None and ahead.unpacked == 0:
            return
        for parked in reversed(self._handles[:index]):
            if parked.fetched is None and parked.unpacked < parked.uses:
                parked.prefetch()
                self._ahead = parked
                return


class _Parked:
    """One offloaded tensor: a host copy, and (during backward) its device copy.

    `uses`: how many times autograd saved it; `unpacked`: how many of those it has given back;
    `fetches`: host-to-device copies made (on CPU the "device copy" is the host copy itself,
    so the accounting and the prefetch order are the same and testable without a GPU).
    """

    def __init__(self, t: torch.Tensor, index: int, stream):
        self.index, self.device, self.stream = index, t.device, stream
        self.uses, self.unpacked, self.fetches = 1, 0, 0
        self.fetched, self.event = None, None
        if t.is_cuda:
            self.cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written
            with torch.cuda.stream(stream):
                self.cpu.copy_(t, non_blocking=True)
            t.record_stream(stream)  # the allocator must not reuse t before the copy is done
        else:  # CPU runs (tests): a copy, so the mechanics are the same
            self.cpu = t.detach().clone()

    def prefetch(self) -> None:
        if self.fetched is not None:
            return
        self.fetches += 1
        if self.device.type != "cuda":
            self.fetched = self.cpu
            return
        with torch.cuda.stream(self.stream):
            self.fetched = self.cpu.to(self.device, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(self.stream)

    def get(self) -> torch.Tensor:
        self.prefetch()  # no-op when prefetched or still on the device from an earlier use
        out = self.fetched
        self.unpacked += 1
        if self.unpacked >= self.uses:  # its last use: the device copy goes with the graph
            self.fetched = None
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self.event)
            out.record_stream(torch.cuda.current_stream(self.device))
        return out
