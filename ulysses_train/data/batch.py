"""`Batch`: what the data package hands the trainer, and the one place windows become batches.

Invariants (DESIGN §1):
- every tensor is int64 and `(N, S)`; row i of each tensor describes the same sequence;
- `labels[:, j]` is the token after `input_ids[:, j]`, computed from a window of S+1 tokens
  *before* any slicing, so the last column of a sequence-parallel slice keeps its label;
- `position_ids` are the positions in the full packed sequence (0..S-1: one stream), so a
  column slice carries its global positions with it;
- `document_ids` count documents from 0 at the start of each row and step up by one right after
  each EOS (an EOS belongs to the document it ends); they are per row, so equality is all a
  document mask needs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy default)


@dataclass
class Batch:
    """A block of packed sequences; see the module docstring for the invariants."""

    input_ids: torch.Tensor  # (N, S) int64
    labels: torch.Tensor  # (N, S) int64, next token; IGNORE_INDEX = no loss
    position_ids: torch.Tensor  # (N, S) int64, global position in the sequence
    document_ids: torch.Tensor  # (N, S) int64, document index within the row

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def slice(self, rows: slice = slice(None), cols: slice = slice(None)) -> Batch:
        """Rows (data parallel) and/or columns (sequence parallel) of every tensor.

        Results are made contiguous: views with strides must not reach collectives (DESIGN §1).
        Labels and positions were fixed on the full sequence, so nothing is recomputed here.
        """
        return Batch(**{f.name: getattr(self, f.name)[rows, cols].contiguous()
                        for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})


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
