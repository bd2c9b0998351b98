"""The one way a batch of whole sequences becomes this rank's micro-batches.

Training (train/trainer.py), evaluation (evaluate/) and the planner's measurement (plan/measure.py,
which runs the trainer's step) all shard through `shard_batch`, so a change of the token layout
(`SequenceLayout`) reaches all three at once.

A dp rank holds its rows of the global batch (`dp_rows`); each row is padded to the layout's
length S' (`Batch.pad_to`: inert padding) and an sp rank keeps the columns
`SequenceLayout.rank_positions` gives it — S'/sp consecutive tokens under Ulysses alone, two
zig-zag chunks with a ring. Labels and global positions were fixed on the whole sequence before
sharding (labels shifted before slicing, positions global), so nothing is lost at the cuts. The
document ids stay whole and padded, (mb, S'): a document mask describes the whole row, which
attention sees after its all-to-all (docs/architecture.md, "Ulysses").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..data.batch import Batch
from .layout import SequenceLayout
from .mesh import ParallelDims


@dataclass
class MicroBatch:
    """One forward's worth of this rank's tokens."""

    input_ids: torch.Tensor  # (mb, S'/sp) int64
    position_ids: torch.Tensor  # (mb, S'/sp) int64, global positions
    labels: torch.Tensor  # (mb, S'/sp) int64, IGNORE_INDEX = no loss
    document_ids: torch.Tensor  # (mb, S') int64: the whole padded rows, for a document mask

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(*(t.to(device, non_blocking=True) for t in
                            (self.input_ids, self.position_ids, self.labels, self.document_ids)))


def dp_rows(dims: ParallelDims, rows: int) -> slice:
    """This rank's rows of a global batch of `rows` sequences (`rows` % dp == 0)."""
    per_dp = rows // dims.dp
    dp_i = dims.local_rank("dp")
    return slice(dp_i * per_dp, (dp_i + 1) * per_dp)


def shard_batch(batch: Batch, dims: ParallelDims, layout: SequenceLayout,
                micro_batch_size: int) -> Iterator[MicroBatch]:
    """This rank's micro-batches of `batch`, which holds this dp rank's rows `(R, S)` of whole
    sequences (S <= layout.padded_len): rows padded to S', the sp rank's columns kept, then cut
    into micro-batches of `micro_batch_size` rows (the last one may be shorter). On the CPU;
    `MicroBatch.to` moves one. Raises ValueError if S exceeds the layout's length."""
    full = batch.pad_to(layout.padded_len)  # (R, S) -> (R, S')
    local = full.take(layout.rank_positions(dims.local_rank("sp")))  # (R, S') -> (R, S'/sp)
    for start in range(0, local.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)  # (R, ...) -> (mb, ...)
        yield MicroBatch(local.input_ids[rows], local.position_ids[rows], local.labels[rows],
                         full.document_ids[rows])


def step_micro_batches(data, step: int, split: str, dims: ParallelDims, layout: SequenceLayout,
                       global_batch_size: int, micro_batch_size: int, model,
                       document_mask: bool) -> Iterator[tuple]:
    """This rank's (input_ids, position_ids, labels, mask) micro-batches of global batch `step`
    of `split` (a data.DataSource): its dp rows, read alone, sharded by `shard_batch`, on
    `model`'s device. `mask`: None, or with `document_mask` the model's DocumentMask of the whole
    padded rows, as attention sees them. What the trainer trains and validates on, and what
    evaluation holds out: one function, so they cannot shard differently."""
    device = next(model.parameters()).device
    batch = data.global_batch(step, split, rows=dp_rows(dims, global_batch_size))  # (G/dp, S)
    for host in shard_batch(batch, dims, layout, micro_batch_size):
        mb = host.to(device)
        # the CPU ids go with the mask: what it decides on the host (the ring's block skipping,
        # varlen's cu_seqlens) then never waits on the device
        mask = (model.document_mask(mb.document_ids, host.document_ids) if document_mask
                else None)
        yield mb.input_ids, mb.position_ids, mb.labels, mask
