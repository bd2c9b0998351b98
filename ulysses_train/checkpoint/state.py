"""What a checkpoint holds and how DCP writes it: the state dicts, eager optimizer state, and a
DCP file writer that remembers which files this rank wrote (so each rank hashes its own).

Why eager optimizer state: AdamW creates a parameter's state (`step`, `exp_avg`, `exp_avg_sq`)
lazily, in its first `step()`. A checkpoint saved before any optimizer step ran — after skipped
non-finite steps, say — would hold no `optim.state.*` entries, while a resuming process asks DCP
for them (DCP's state-dict helpers initialise the optimizer of the loading process), so the
checkpoint could not be loaded. torch's own `_init_optim_state` (called by `get_state_dict`)
does not cover it: it returns early as soon as any parameter has a gradient (the skipped step's
NaN gradients are still there at the save), and where it does run it takes a zero-gradient step
that leaves `step` = 1 — not what the lazy first step creates, so a resume from it would use
other bias corrections than the uninterrupted run. `init_optimizer_state` creates exactly the
lazy state (every tensor zero, `step` 0) without touching parameters or gradients.
"""
from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

from .safe_read import read_metadata

OPTIM_STATE_PREFIX = "optim.state."  # DCP keys of the optimizer's per-parameter state


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Create the state of every trainable parameter that has none yet; return how many.

    The state equals what AdamW's first `step()` would create lazily (moments zero, `step` 0),
    so training on from it is bit-identical to training on without it. How: a `step()` at lr 0
    on zero gradients for just those parameters (others' gradients hidden, so their state and
    values do not move), then the new state zeroed. Parameters are unchanged (lr 0: the update
    and the decoupled weight decay `1 - lr·wd` are exact no-ops); gradients and lr are restored.
    """
    groups = optimizer.param_groups
    fresh = [p for g in groups for p in g["params"]
             if p.requires_grad and not optimizer.state.get(p)]
    if not fresh:
        return 0
    fresh_ids = {id(p) for p in fresh}
    saved_grads = {id(p): p.grad for g in groups for p in g["params"]}
    saved_lrs = [g["lr"] for g in groups]
    try:
        for g in groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p) if id(p) in fresh_ids else None
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        optimizer.step()
    finally:
        for g, lr in zip(groups, saved_lrs):
            g["lr"] = lr
            for p in g["params"]:
                p.grad = saved_grads[id(p)]
    for p in fresh:
        for value in optimizer.state[p].values():
            if isinstance(value, torch.Tensor):
                value.zero_()
    return len(fresh)


def state_to_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  trainer_state: dict) -> dict:
    """The DCP state of a checkpoint: FQN-keyed model and optimizer state, trainer state."""
    init_optimizer_state(optimizer)  # a save before the first optimizer step has state too
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "trainer": dict(trainer_state)}


def state_to_load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  trainer_state: dict) -> tuple[dict, dict]:
    """(what to ask DCP to read from `path`, the whole state it fills in place); both keyed as
    `state_to_save`, sharing their tensors and nested containers.

    A checkpoint written by an older version before any optimizer step holds no optimizer state
    at all: then DCP is not asked for it and the optimizer keeps the zero state that
    `init_optimizer_state` gave it — exactly the (empty) state it was saved with. Reads
    `path/.metadata` (small, restricted: safe_read.RefusedPickle for a disallowed global).
    """
    state = state_to_save(model, optimizer, trainer_state)
    keys = read_metadata(path).state_dict_metadata
    if any(k.startswith(OPTIM_STATE_PREFIX) for k in keys):
        return state, state
    optim = {k: v for k, v in state["optim"].items() if k != "state"}
    return {**state, "optim": optim}, state


class RecordingWriter(dcp.FileSystemWriter):
    """DCP's file writer, remembering the files this rank wrote (`written`, relative paths) from
    DCP's own write results — the shard files are this rank's to hash for the manifest."""

    def __init__(self, path: str):
        super().__init__(path)
        self.written: list[str] = []

    def write_data(self, plan, planner):
        def record(done):
            results = done.value()  # raises if the write failed: the save fails as before
            self.written = sorted({r.storage_data.relative_path for r in results})
            return results

        return super().write_data(plan, planner).then(record)


def load_failure(exc: BaseException) -> str:
    """One line for a load failure: DCP wraps each rank's exception in a CheckpointException
    whose own text is a traceback dump; name the first failing rank's exception instead."""
    failures = getattr(exc, "failures", None) if isinstance(exc, CheckpointException) else None
    if failures:
        rank, wrapped = next(iter(sorted(failures.items(), key=lambda kv: kv[0])))
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return f"rank {rank}: {brief(inner)}"
    return brief(exc)


def brief(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters)."""
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0][:200]}" if first else type(exc).__name__
