"""Counting the casts of parameters to bf16 in a training step (tests/train/test_precision.py).

A weight cast is an op that reads a parameter's fp32 memory and writes bf16: autocast's per-use
`_to_copy`, WeightCasts' one per step (model/precision.py), or FSDP2's copy of a shard into its
bf16 all-gather buffer. Counted below autograd (a TorchDispatchMode), so whichever code casts is
seen, and keyed by storage, so a DTensor's local shard counts for its parameter.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

FP32, BF16 = torch.float32, torch.bfloat16


class CastCounter(TorchDispatchMode):
    """Counts, per parameter, the casts of its fp32 memory to bf16: `_to_copy` (autocast's
    per-use cast, WeightCasts' one) and the copies FSDP2 makes of a shard into its bf16
    all-gather buffer (`copy_` / `_foreach_copy_`). Keyed by the parameter's (local) storage;
    `ops` names the ops that cast."""

    COPIES = ("aten.copy_.default", "aten._foreach_copy_.default")

    def __init__(self, model):
        super().__init__()
        self.names = {_storage(_local(p)): name for name, p in model.named_parameters()}
        self.per_param, self.ops = Counter(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name == "aten._to_copy.default" or name in self.COPIES:
            sources, _ = tree_flatten(args[1] if name in self.COPIES else args[0])
            targets, _ = tree_flatten(args[0] if name in self.COPIES else out)
            for src, dst in zip(sources, targets):
                param = self.names.get(_storage(_local(src)))
                if param is not None and src.dtype == FP32 and dst.dtype == BF16:
                    self.per_param[param] += 1
                    self.ops.add(name)
        return out


def _local(t):
    return t._local_tensor if hasattr(t, "_local_tensor") else t  # a DTensor's local shard


def _storage(t) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (AttributeError, RuntimeError):  # not a tensor, or FSDP2's freed unsharded storage
        return None


def count_casts(trainer, steps) -> list[tuple[Counter, set]]:
    """Wraps `trainer.train_step`: the (casts per parameter, cast ops) of each step in `steps`
    (1-based), appended to the returned list as they run."""
    counts, train_step = [], trainer.train_step

    def counted():
        if trainer.step + 1 not in steps:
            return train_step()
        with CastCounter(trainer.model) as counter:
            out = train_step()
        counts.append((counter.per_param, counter.ops))
        return out
    trainer.train_step = counted
    return counts
