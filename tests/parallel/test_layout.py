"""SequenceLayout and the data path's sharding by it, in-process: padding arithmetic, which
positions each sp rank holds, and `Batch.pad_to` / `Batch.take`.

The multi-rank proof that the sharded, padded rows train the one-process model is
tests/train/test_trainer_sequence.py; here every rule is checked from the numbers alone.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from ulysses_train.data.batch import IGNORE_INDEX, Batch, batch_from_windows
from ulysses_train.parallel.layout import SequenceLayout

# (seq_len, sp, ring): divisible and not, ring 1 / hybrid / pure ring, seq_len < 2 sp.
CASES = [(s, p, r) for s, (p, r) in itertools.product(
    (1, 5, 7, 16, 64, 250), ((1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (4, 2), (8, 4), (8, 2),
                             (4, 4), (3, 3), (6, 2)))]


@pytest.mark.parametrize("seq,sp,ring", CASES)
def test_padding_is_the_smallest_multiple(seq, sp, ring):
    layout = SequenceLayout(seq, sp, ring)
    multiple = sp if ring == 1 else 2 * sp  # each of 2R chunks splits over sp/ring ranks
    assert layout.padded_len % multiple == 0
    assert seq <= layout.padded_len < seq + multiple
    assert layout.padding == layout.padded_len - seq
    assert layout.local_len * sp == layout.padded_len


@pytest.mark.parametrize("seq,sp,ring", CASES)
def test_every_position_has_exactly_one_owner(seq, sp, ring):
    layout = SequenceLayout(seq, sp, ring)
    held = [layout.rank_positions(r) for r in range(sp)]
    assert all(h.dtype == torch.int64 and h.shape == (layout.local_len,) for h in held)
    assert torch.equal(torch.cat(held).sort().values, torch.arange(layout.padded_len))
    u = sp // ring
    for ring_rank in range(ring):  # a ring rank's Ulysses ranks hold its positions, in order
        mine = torch.cat(held[ring_rank * u:(ring_rank + 1) * u])
        assert torch.equal(mine, layout.ring_positions(ring_rank))


@pytest.mark.parametrize("seq,sp", [(64, 4), (250, 4), (5, 8), (33, 2)])
def test_without_a_ring_ranks_hold_consecutive_slices(seq, sp):
    """ring = 1 is exactly the layout before rings: rank r holds [r S'/P, (r+1) S'/P)."""
    layout = SequenceLayout(seq, sp)
    n = layout.local_len
    for r in range(sp):
        assert torch.equal(layout.rank_positions(r), torch.arange(r * n, (r + 1) * n))


def test_ring_ranks_hold_the_zigzag_chunks():
    """sp=8, ring=4, seq 64: chunks of 8; ring rank i holds chunks i and 7-i, split over U=2."""
    layout = SequenceLayout(64, 8, 4)
    assert layout.chunk_len() == 8
    chunk = lambda j: torch.arange(8 * j, 8 * (j + 1))  # noqa: E731
    for i in range(4):
        assert torch.equal(layout.ring_positions(i), torch.cat([chunk(i), chunk(7 - i)]))
        assert torch.equal(layout.rank_positions(2 * i), chunk(i))
        assert torch.equal(layout.rank_positions(2 * i + 1), chunk(7 - i))


@pytest.mark.parametrize("seq,sp,ring,padding_only", [
    (5, 4, 1, [3]),  # padded to 8: rank 3 holds 6, 7
    (3, 4, 1, [3]),  # padded to 4
    (5, 4, 2, [1]),  # padded to 8, chunks of 2: ring 0 holds 0,1 | 6,7 -> Ulysses rank 1: 6, 7
    (1, 8, 8, list(range(1, 8))),  # one real token; chunks of 1 on 8 ring ranks
])
def test_short_rows_leave_some_ranks_only_padding(seq, sp, ring, padding_only):
    """seq_len < 2 sp: those ranks must count 0 tokens (their labels are all IGNORE_INDEX)."""
    layout = SequenceLayout(seq, sp, ring)
    only = [r for r in range(sp) if (layout.rank_positions(r) >= seq).all()]
    assert only == padding_only


def _batch(seq: int, rows: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seq)
    windows = torch.randint(1, 50, (rows, seq + 1), generator=g)
    docs = (torch.rand(rows, seq, generator=g) < 0.2).long().cumsum(1)  # a few documents a row
    return batch_from_windows(windows, docs).with_document_positions()


def test_padding_is_inert():
    """Padded columns: no label (out of loss and count), their own document after the row's
    last, positions = column index; the real columns unchanged."""
    batch, length = _batch(13), 16
    padded = batch.pad_to(length)
    assert padded.shape == (3, length)
    for name in ("input_ids", "labels", "position_ids", "document_ids"):
        assert torch.equal(getattr(padded, name)[:, :13], getattr(batch, name)), name
    assert (padded.labels[:, 13:] == IGNORE_INDEX).all()
    assert torch.equal(padded.position_ids[:, 13:], torch.arange(13, 16).expand(3, 3))
    last = batch.document_ids[:, -1:]
    assert (padded.document_ids[:, 13:] == last + 1).all()  # one new document, after the row's
    assert batch.pad_to(13) is batch
    with pytest.raises(ValueError):
        batch.pad_to(12)


@pytest.mark.parametrize("seq,sp", [(64, 4), (16, 2), (250, 5)])
def test_take_of_a_consecutive_layout_is_the_old_slice(seq, sp):
    """ring = 1 with no padding: what each rank gets is exactly today's column slice."""
    batch = _batch(seq)
    layout = SequenceLayout(seq, sp)
    assert layout.padding == 0
    n = seq // sp
    for r in range(sp):
        got = batch.pad_to(layout.padded_len).take(layout.rank_positions(r))
        want = batch.slice(cols=slice(r * n, (r + 1) * n))
        for name in ("input_ids", "labels", "position_ids", "document_ids"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (r, name)
            assert getattr(got, name).is_contiguous()


def test_take_follows_the_ring_layout():
    """Every rank's tokens under a ring put back by their positions give the padded rows."""
    batch = _batch(250)
    layout = SequenceLayout(250, 6, 3)
    padded = batch.pad_to(layout.padded_len)
    rebuilt = torch.full_like(padded.input_ids, -1)
    for r in range(6):
        pos = layout.rank_positions(r)
        got = padded.take(pos)
        rebuilt[:, pos] = got.input_ids
        assert torch.equal(got.position_ids, padded.position_ids[:, pos])
    assert torch.equal(rebuilt, padded.input_ids)
