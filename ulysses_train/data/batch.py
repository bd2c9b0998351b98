"""`Batch`: what the data package hands the trainer, and the one place windows become batches.

Invariants (docs/architecture.md §1):
- every tensor is int64 and `(N, S)`; row i of each tensor describes the same sequence;
- `labels[:, j]` is the token after `input_ids[:, j]`, computed from a window of S+1 tokens
  *before* any slicing, so the last column of a sequence-parallel slice keeps its label;
- `position_ids` are the positions in the full packed sequence (0..S-1: one stream), or, with
  `data.document_mask`, positions within each document (restarting at 0 at each document start,
  `with_document_positions`); either way they are fixed on the whole row, so a column slice
  carries its global positions with it;
- `document_ids` count documents from 0 at the start of each row and step up by one right after
  each EOS (an EOS belongs to the document it ends); they are per row, so equality is all a
  document mask needs.
Sequence parallelism cuts whole rows, never windows: `pad_to` pads a row to the layout's
length and `take` keeps a rank's columns (positions from `parallel.layout.SequenceLayout`, the
one owner of who holds which token).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy default)


@dataclass
class Batch:
    """A block of packed sequences; see the module docstring for the invariants."""

    input_ids: torch.Tensor  # (N, S) int64
    labels: torch.Tensor  # (N, S) int64, next token; IGNORE_INDEX = no loss
    position_ids: torch.Tensor  # (N, S) int64, global position in the sequence (or document)
    document_ids: torch.Tensor  # (N, S) int64, document index within the row

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def slice(self, rows: slice = slice(None), cols: slice = slice(None)) -> Batch:
        """Rows (data parallel) and/or columns (sequence parallel) of every tensor.

        Results are made contiguous: views with strides must not reach collectives
        (docs/architecture.md §1). Labels and positions were fixed on the full sequence, so nothing
        is recomputed here.
        """
        return Batch(**{f.name: getattr(self, f.name)[rows, cols].contiguous()
                        for f in fields(self)})

    def pad_to(self, length: int) -> Batch:
        """Every row padded at the end to `length` columns (`SequenceLayout.padded_len`).

        The padding is inert, so the loss, gradients and token count are those of the
        unpadded rows: input token 0; label IGNORE_INDEX (out of the loss and of the count of
        valid labels); position = its column index (real tokens keep theirs: positions stay
        global); document id = the row's last id + 1, a document of its own, so under a
        document mask no real token attends to padding. Under plain causal attention no real
        token sees it either: it comes after every real token. Returns self if nothing to pad.
        """
        n, s = self.shape
        if length < s:
            raise ValueError(f"cannot pad {s} columns to {length}")
        if length == s:
            return self
        pad = length - s
        cols = torch.arange(s, length, dtype=torch.int64).expand(n, pad)  # (pad,) -> (N, pad)
        fill = {"input_ids": torch.zeros(n, pad, dtype=torch.int64),
                "labels": torch.full((n, pad), IGNORE_INDEX, dtype=torch.int64),
                "position_ids": cols,
                "document_ids": (self.document_ids[:, -1:] + 1).expand(n, pad)}
        # (N, S) + (N, S' - S) -> (N, S') per tensor
        return Batch(**{name: torch.cat([getattr(self, name), extra.to(getattr(self, name).device)],
                                        dim=1) for name, extra in fill.items()})

    def take(self, positions: torch.Tensor) -> Batch:
        """Columns `positions` (int64 `(S'/P,)`, `SequenceLayout.rank_positions`) of every
        tensor, in that order: one sequence-parallel rank's tokens `(N, S'/P)`, contiguous
        (index_select copies). Consecutive positions give exactly `slice(cols=...)`."""
        return Batch(**{f.name: getattr(self, f.name).index_select(1, positions.to(
            getattr(self, f.name).device)) for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    def with_document_positions(self) -> Batch:
        """This batch with positions restarting at 0 at each document (`data.document_mask`).

        Only on whole rows, before any sequence-parallel slicing: a slice's first token is not
        a document start, and the positions, like the mask, belong to the global row.
        """
        return replace(self, position_ids=document_positions(self.document_ids))


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(N, S) position of each token within its document: 0 at each start, then 1, 2, ...

    A document starts at column 0 and wherever the id changes; documents are contiguous in a
    row, so a running maximum of start columns gives each token its document's first column.
    """
    n, s = document_ids.shape
    cols = torch.arange(s, device=document_ids.device).expand(n, s)  # (S,) -> (N, S)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, cols, 0).cummax(dim=1).values  # (N, S): column of the doc start
    return (cols - first).contiguous()


def batch_from_windows(windows: torch.Tensor, document_ids: torch.Tensor) -> Batch:
    """Build a Batch from token windows `(N, S+1)` and the document id of each input `(N, S)`.

    Window row i holds S+1 consecutive tokens; the shift happens here, once, on the full window.
    """
    n, s_plus_1 = windows.shape
    seq_len = s_plus_1 - 1
    windows = windows.to(torch.int64)
    positions = torch.arange(seq_len, dtype=torch.int64).expand(n, seq_len)  # (S,) -> (N, S)
    return Batch(
        input_ids=windows[:, :-1].contiguous(),  # (N, S+1) -> (N, S): tokens 0..S-1
        labels=windows[:, 1:].contiguous(),  # (N, S+1) -> (N, S): tokens 1..S
        position_ids=positions.contiguous(),
        document_ids=document_ids.to(torch.int64).contiguous(),
    )
