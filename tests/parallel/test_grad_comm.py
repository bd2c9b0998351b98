"""Gradient communication: when it is issued and how much of it a step does, per ZeRO stage.

One 4-rank spawn (sp=2 x dp=2, micro-batches of 1: two per step, blocks L=2, so FSDP2 groups
G = L + 1 with the root's embedding/norm/head) runs two real `Trainer.train_step`s per layout and
records, in order, every forward start, every parameter's gradient becoming ready
(`register_post_accumulate_grad_hook`) and every torch.distributed collective with its group
size. The second step is the one asserted (DDP rebuilds its buckets after the first).
- Overlap: at zero=0, DDP issues bucket all-reduces while backward is still producing
  gradients (with buckets of ~20 KB, so the tiny model has several); the old flatten-after-
  backward reduction issued its one all-reduce after every gradient. No gradient collective on
  the micro-batch before the last.
- Counts: the collectives between the first forward and the gradient clipping, per stage, are
  FSDP2's and DDP's own; they are asserted against the formulas documented in
  docs/architecture.md §5 ("Collectives per step") and printed for docs/parallelism.md.
"""
from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch.distributed as dist

from support.common import small_config
from support.spawn import run_distributed

WORLD, L, MICRO = 4, 2, 2  # ranks, blocks, micro-batches per step
G = L + 1  # FSDP2 parameter groups: every block, then the root
KINDS = {"all_gather": ("all_gather_into_tensor", "all_gather_single"),
         "reduce_scatter": ("reduce_scatter_tensor", "reduce_scatter_single"),
         "all_reduce": ("all_reduce",)}
STAGES = {  # name: parallel overrides (dp=2 x sp=2 on 4 ranks)
    "zero0": {"zero": 0},
    "zero2": {"zero": 2},
    "zero3": {"zero": 3},
    "hsdp-zero2": {"zero": 2, "shard_group": 2},
    "hsdp-zero3": {"zero": 3, "shard_group": 2},
}


class Recorder:
    """Patches torch.distributed's collectives (every name FSDP2/DDP use in torch 2.8..2.13) and
    records ("comm", kind, group size) next to the events the trainer's hooks add."""

    def __init__(self):
        self.events: list[tuple] = []
        self._saved: dict[str, object] = {}

    def __enter__(self):
        for kind, names in KINDS.items():
            for name in names:
                original = getattr(dist, name, None)
                if original is not None:
                    self._saved[name] = original
                    setattr(dist, name, self._wrap(kind, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def _wrap(self, kind, original):
        @functools.wraps(original)
        def recorded(*args, **kwargs):
            self.events.append(("comm", kind, dist.get_world_size(kwargs.get("group"))))
            return original(*args, **kwargs)
        return recorded


def _record_step(rank, world, parallel, bucket_cap_mb):
    """Events of the second train_step of a dp=2 x sp=2 trainer with `parallel` overrides."""
    from ulysses_train.parallel import ParallelDims, parallelize
    from ulysses_train.parallel.grad_sync import replicate
    from ulysses_train.train import trainer as trainer_mod

    cfg = small_config(parallel={"dp": 2, "sp": 2, **parallel}, data={"seq_len": 32},
                       train={"steps": 2, "micro_batch_size": 1},
                       checkpoint={"resume": "never"})
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    saved_replicate, saved_clip = parallelize.replicate, trainer_mod.clip_grad_norm_
    rec = Recorder()
    parallelize.replicate = functools.partial(replicate, bucket_cap_mb=bucket_cap_mb)
    trainer_mod.clip_grad_norm_ = lambda *a, **k: (rec.events.append(("clip",)),
                                                   saved_clip(*a, **k))[1]
    try:
        trainer = trainer_mod.Trainer(cfg, "/nonexistent-run-dir", dims)
        # prepend: before FSDP2's own pre-forward hook, whose all-gathers belong to this forward
        trainer.model.register_forward_pre_hook(lambda *_: rec.events.append(("forward",)),
                                                prepend=True)
        for name, p in trainer.model.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda _, name=name: rec.events.append(("grad", name)))
        trainer.train_step()
        rec.events.clear()
        with rec:
            trainer.train_step()
    finally:
        parallelize.replicate, trainer_mod.clip_grad_norm_ = saved_replicate, saved_clip
    return rec.events


def _all_stages(rank, world):
    out = {name: _record_step(rank, world, parallel, None) for name, parallel in STAGES.items()}
    out["zero0-small-buckets"] = _record_step(rank, world, {"zero": 0}, 0.02)
    return out


@pytest.fixture(scope="module")
def events():
    return run_distributed(_all_stages, WORLD, timeout=300)[0]


def _micro_batches(events):
    """The events from each forward start up to the next one / the clipping, by micro-batch."""
    starts = [i for i, e in enumerate(events) if e[0] == "forward"]
    end = next(i for i, e in enumerate(events) if e[0] == "clip")
    return [events[a:b] for a, b in zip(starts, starts[1:] + [end])]


def _counts(segment) -> Counter:
    return Counter((e[1], e[2]) for e in segment if e[0] == "comm")


def test_zero0_bucket_all_reduces_start_during_backward(events):
    """DDP reduces buckets as their gradients become ready: the first all-reduce comes before
    the last gradient of the step is ready (the flatten-after-backward path fails this)."""
    first, last = _micro_batches(events["zero0-small-buckets"])
    assert not _counts(first), "the micro-batch before the last must not communicate"
    kinds = [e[0] if e[0] != "comm" else e[1] for e in last]
    reduces = [i for i, k in enumerate(kinds) if k == "all_reduce"]
    grads = [i for i, k in enumerate(kinds) if k == "grad"]
    assert len(reduces) >= 3, kinds  # several buckets at ~20 KB
    assert reduces[0] < grads[-1], kinds
    between = [k for k in kinds[reduces[0]:] if k == "grad"]
    print(f"zero0, 20 KB buckets: {len(reduces)} bucket all-reduces, {len(between)} of "
          f"{len(grads)} gradients became ready after the first was issued")


# Per micro-batch (first, last) counts of FSDP2's/DDP's collectives, as (kind, group size).
# ZeRO-3 gathers every group twice per micro-batch (forward, backward), the root included: it
# is wrapped with reshard_after_forward=True like the blocks.
EXPECTED = {
    "zero0": ({}, {("all_reduce", 4): 1}),  # one 25 MB DDP bucket holds the tiny model
    "zero2": ({("all_gather", 4): G}, {("reduce_scatter", 4): G}),
    "zero3": ({("all_gather", 4): 2 * G, ("reduce_scatter", 4): G},
              {("all_gather", 4): 2 * G, ("reduce_scatter", 4): G}),
    "hsdp-zero2": ({("all_gather", 2): G}, {("reduce_scatter", 2): G, ("all_reduce", 2): G}),
    "hsdp-zero3": ({("all_gather", 2): 2 * G, ("reduce_scatter", 2): G},
                   {("all_gather", 2): 2 * G, ("reduce_scatter", 2): G, ("all_reduce", 2): G}),
}


@pytest.mark.parametrize("stage", EXPECTED)
def test_collectives_per_step(events, stage):
    """Gradient/parameter collectives of one step (2 micro-batches, L=2 blocks): no_sync at
    zero=0 and zero=2, reduce-scatter each micro-batch at zero=3 with the HSDP all-reduce only
    on the last; HSDP gathers and reduce-scatters inside the 2-rank shard group and all-reduces
    across the 2 replicas."""
    got = tuple(dict(_counts(seg)) for seg in _micro_batches(events[stage]))
    total = Counter((e[1], e[2]) for e in events[stage] if e[0] == "comm")
    print(f"{stage}: per micro-batch {got}; whole step {dict(total)}")
    assert got == EXPECTED[stage]
