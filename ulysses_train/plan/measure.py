"""Measure a training step's peak tensor memory on this rank, to check the memory model.

The step is the trainer's (trainer.py `train_step`): zero_grad, forward + backward per
micro-batch, gradient reduction (zero 0), clipping, AdamW. One step runs first so that AdamW's
moments exist (steady state, what the model predicts); the second is measured with torch's
`MemTracker` (torch.distributed._tools.mem_tracker), which counts the bytes of every live tensor
storage — parameters, gradients, optimizer state, activations, temporaries — not RSS.
"""
from __future__ import annotations

import contextlib

import torch

from ..config.schema import Config
from ..parallel.grad_sync import reduce_gradients_
from ..parallel.parallelize import build_model, resolve_dtype
from ..parallel.sharding import set_last_micro_batch
from ..parallel.tensor import clip_grad_norm_
from ..train.optim import build_optimizer


def _batch(cfg: Config, dims, micro: int):
    """Synthetic (ids, positions, labels) of this rank: (B, S/sp) slices of fixed rows."""
    g = torch.Generator().manual_seed(0)
    rows, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (rows, seq), generator=g)
    pos = torch.arange(seq).expand(rows, seq)
    cols = seq // dims.sp
    sp_i = dims.local_rank("sp")
    part = slice(sp_i * cols, (sp_i + 1) * cols)  # (B, S) -> (B, S/sp)
    return [(ids[:, part], pos[:, part], ids[:, part].clone()) for _ in range(micro)]


class _NoHook:
    def remove(self) -> None:
        pass


@contextlib.contextmanager
def _module_tracker_tolerates_no_grad():
    """MemTracker's module tracker hooks every module input that requires grad; inside the tiled
    MLP's autograd.Function forward (no_grad) a chunk view requires grad but has no grad_fn,
    which its hook registration refuses. Such inputs get no hook (they have no backward)."""
    import torch.distributed._tools.mod_tracker as mod_tracker

    real = mod_tracker.register_multi_grad_hook

    def tolerant(tensors, fn, **kwargs):
        try:
            return real(tensors, fn, **kwargs)
        except AssertionError:  # "Expected gradient function to be set": no backward to track
            return _NoHook()

    mod_tracker.register_multi_grad_hook = tolerant
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = real


def measured_peak(cfg: Config, dims) -> int:
    """Peak live tensor bytes of this rank during the second of two training steps."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = build_model(cfg, dims)
    optimizer = build_optimizer(model, cfg.optim)
    dtype = resolve_dtype(cfg.train.precision, dims.device)
    dp = cfg.parallel.dp if cfg.parallel.dp > 0 else dims.dp
    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    batches = _batch(cfg, dims, micro)
    sharded = cfg.parallel.zero > 0 and dims.dp_sp > 1
    autocast = (contextlib.nullcontext() if dtype == torch.float32
                else torch.autocast(dims.device.type, dtype=dtype))

    def step():
        optimizer.zero_grad(set_to_none=True)
        for i, (ids, pos, labels) in enumerate(batches):
            if sharded:
                set_last_micro_batch(model, cfg.parallel.zero, i == len(batches) - 1)
            with autocast:
                part, _ = model(ids, pos, labels)
            (part / labels.numel()).backward()
        if not sharded:
            reduce_gradients_(model.parameters(), dims.group("dp_sp"))
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with _module_tracker_tolerates_no_grad(), tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")
    return max(v["Total"] for v in snapshot.values())
