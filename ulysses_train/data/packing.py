"""Packing and sampling: fixed-length windows over one split's flat token stream.

The stream is every document of the split concatenated, each ended by EOS; `doc_offsets` holds
where each document starts, plus the stream length at the end. Window k is the S+1 tokens
starting at k*S, so consecutive windows share one token and every input token, including the
last, has its true next token as label. Sample g (a global index: step * global_batch_size +
row) reads window perm_e[g % n_windows] of epoch e = g // n_windows, where perm_e is a
permutation seeded by (seed, epoch, split). Nothing depends on who asks or in what order, so any
row of any step can be produced alone, in O(1) once the epoch's permutation exists.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..config.errors import ConfigError
from .batch import Batch, batch_from_windows

SPLIT_CODES = {"train": 0, "val": 1}  # folded into seeds so the splits draw independently


def as_seed(value: int) -> int:
    """Map any Python int (negative seeds included) onto the unsigned range numpy seeds need."""
    return int(value) % (1 << 64)


class PackedTokens:
    """Windows of `seq_len + 1` tokens over one split, sampled by global index.

    Invariants: `tokens` is 1-D (any integer dtype, memmaps welcome: only the rows asked for are
    read); `doc_offsets` is 1-D, starts at 0, is non-decreasing and ends at `len(tokens)`.
    """

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, seq_len: int, *,
                 seed: int = 0, split: str = "train"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise ValueError("doc_offsets must start at 0 and end at len(tokens)")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("doc_offsets must be non-decreasing")
        self.tokens = tokens
        self.doc_offsets = offsets
        self.seq_len = seq_len
        self.seed = as_seed(seed)
        self.split = split
        # The last window must still have its S+1-th token, hence the -1.
        self.n_windows = max(0, (len(tokens) - 1) // seq_len)
        self._perms: dict[int, np.ndarray] = {}
        if self.n_windows == 0:
            fixes = "raise data.val_fraction or add data" if split == "val" else "add data"
            raise ConfigError("data.seq_len", f"{seq_len} is too long: the {split} split has only "
                              f"{len(tokens)} tokens; lower data.seq_len, {fixes}")

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of one epoch, a pure function of (seed, epoch, split).

        Only the two most recent epochs are kept: a run moves forward through epochs, and an
        epoch boundary can fall inside one global batch.
        """
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, epoch, SPLIT_CODES.get(self.split, 2)])
            perm = rng.permutation(self.n_windows)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm
        return perm

    def window_index(self, g: int) -> int:
        """Which window global sample g reads."""
        epoch, k = divmod(g, self.n_windows)
        return int(self.permutation(epoch)[k])

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Window k: its S+1 tokens (int64) and the document id of each of its first S tokens.

        Document ids come from the offsets (searchsorted), counted from the row's first
        document, so an EOS at position p is in the same document as p-1 and the id steps up at
        p+1 (docs/architecture.md §1: EOS belongs to the document it ends).
        """
        start = k * self.seq_len
        tokens = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        positions = np.arange(start, start + self.seq_len)
        # doc of position p = number of document starts <= p, minus one.
        docs = np.searchsorted(self.doc_offsets, positions, side="right") - 1
        return tokens, docs - docs[0]

    def batch(self, sample_indices: Sequence[int]) -> Batch:
        """The Batch whose row i is global sample `sample_indices[i]`."""
        s = self.seq_len
        windows = np.empty((len(sample_indices), s + 1), dtype=np.int64)  # (N, S+1)
        docs = np.empty((len(sample_indices), s), dtype=np.int64)  # (N, S)
        for i, g in enumerate(sample_indices):
            windows[i], docs[i] = self.window(self.window_index(g))
        return batch_from_windows(torch.from_numpy(windows), torch.from_numpy(docs))
