"""Helpers for tests/parallel/test_ring.py: groups, document ids, the reference, a recorder."""
from __future__ import annotations

import torch
import torch.distributed as dist

from support.common import fwd_bwd
from ulysses_train.model.attention import sdpa_attention
from ulysses_train.model.masking import DocumentMask
from ulysses_train.parallel import ring as ring_mod
from ulysses_train.parallel import ring_kernels


def hybrid_groups(sp: int, ring: int):
    """((ulysses_group, ring_group), sp_rank, ring_rank) with the world cut into sp groups.

    sp-group rank = ring_rank * U + ulysses_rank (parallel/layout.py). Collective: every rank
    creates every group, in the same order.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    u = sp // ring
    mine = [None, None]
    for start in range(0, world, sp):
        for j in range(ring):
            ranks = [start + j * u + i for i in range(u)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[0] = group
        for i in range(u):
            ranks = [start + j * u + i for j in range(ring)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[1] = group
    sp_rank = rank % sp
    return tuple(mine), sp_rank, sp_rank // u


def doc_ids(batch: int, seq_len: int, padded_len: int, seed: int = 3,
            lengths: tuple[int, int] = (1, 9)) -> torch.Tensor:
    """(B, S') document ids: random document lengths in `lengths` (inclusive; by default 1..9:
    boundaries fall inside chunks, so some rows see no key in some ring steps); padded
    positions get id -1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, padded_len), -1, dtype=torch.long)
    for b in range(batch):
        lengths_b = torch.randint(lengths[0], lengths[1] + 1, (seq_len,), generator=g)
        ids[b, :seq_len] = torch.repeat_interleave(torch.arange(seq_len), lengths_b)[:seq_len]
    return ids


def dense_mask(seq: int, ids: torch.Tensor | None) -> torch.Tensor:
    """(B or 1, S, S) bool: query i sees key j (causal, and same document when ids are given)."""
    past = torch.ones(seq, seq, dtype=torch.bool).tril()
    if ids is None:
        return past.unsqueeze(0)
    return (ids[:, :, None] == ids[:, None, :]) & past


def reference(q, k, v, grad, ids):
    """One-process attention over the whole (unpadded) rows: out, dq, dk, dv."""
    return fwd_bwd(sdpa_attention, q, k, v, grad, mask=None if ids is None else DocumentMask(ids))


class Recorder:
    """Logs the ring's kernel calls and P2P posts/waits, in order, while active.

    events: one letter per event, in order: F / B a forward / backward sub-block kernel call;
    p / w the post / wait of a K/V transfer; q / x the post / wait of a dK/dV transfer.
    empty_rows: how many masked sub-blocks had a query row that sees no key.
    """

    def __init__(self):
        self.events = ""
        self.empty_rows = 0
        self._saved = {}

    def __enter__(self) -> "Recorder":
        fwd, bwd, bias = ring_kernels.block_forward, ring_kernels.block_backward, ring_kernels.document_bias
        base, rec = ring_mod.Transfer, self
        self._saved = {"block_forward": fwd, "block_backward": bwd, "document_bias": bias}

        class Logged(base):
            def __init__(self, send, group, tag):
                self.tag = tag
                rec.events += "pq"[tag]
                super().__init__(send, group, tag)

            def wait(self):
                out = super().wait()
                rec.events += "wx"[self.tag]
                return out

        def logged(name, fn):
            def call(*args, **kw):
                rec.events += name
                return fn(*args, **kw)
            return call

        def counted_bias(*args, **kw):
            bias_t, empty = bias(*args, **kw)
            rec.empty_rows += int(empty.any())
            return bias_t, empty

        ring_kernels.block_forward = logged("F", fwd)
        ring_kernels.block_backward = logged("B", bwd)
        ring_kernels.document_bias = counted_bias
        ring_mod.Transfer, self._transfer = Logged, base
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(ring_kernels, name, fn)
        ring_mod.Transfer = self._transfer
