"""Weighted mixtures: which source each global sample comes from, as a pure function of it.

Global sample g (row r of step t is g = t * global_batch_size + r: data/source.py) is assigned
by blocks of `BLOCK` consecutive samples. Every block holds exactly n_i samples of source i,
n = the largest-remainder rounding of BLOCK * w (weights normalised to sum 1), in the same
order: slot p goes to the source furthest behind its quota, argmax_i (p + 1) n_i / BLOCK -
(slots of i before p), ties to the earlier source (the greedy rule of Megatron-LM's blended
datasets, here over one block and then repeated). So

- after any n samples, source i has served n n_i / BLOCK of them to within one sample: a run
  of any length gets its shares, and every global batch the same mix up to one row;
- n_i / BLOCK is w_i to within 1 / BLOCK (BLOCK = 16384: 6e-5);
- the k-th sample of source i is that source's sample k, so each source is read in its own
  order (`PackedTokens`: epochs of shuffled windows), and a source that runs out starts its
  next epoch (the rule when a weight asks for more tokens than a source has);
- everything is O(1) per sample, never depends on the layout, and resuming at any step needs
  no state. Randomness is in each source's window order, not in the interleaving.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .batch import Batch

BLOCK = 1 << 14  # samples per block: shares are exact to 1 / BLOCK


def block_counts(weights: Sequence[float]) -> np.ndarray:
    """int64 `(n_sources,)`: samples of each source per block (largest remainder of BLOCK * w).

    Raises ValueError when a weight is not positive (the caller names the key)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("every weight must be a positive number")
    quota = w / w.sum() * BLOCK
    counts = np.floor(quota).astype(np.int64)
    short = BLOCK - int(counts.sum())
    # the largest fractional parts get the leftover samples; ties go to the earlier source
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def interleave(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source of each slot, its rank among that source's slots), int64 `(BLOCK,)` each: the
    greedy order of the module docstring, for per-block counts `counts` (summing to BLOCK)."""
    quota = counts.astype(np.float64) / BLOCK
    served = np.zeros(len(counts), dtype=np.int64)
    source = np.empty(BLOCK, dtype=np.int64)
    rank = np.empty(BLOCK, dtype=np.int64)
    for p in range(BLOCK):
        i = int(np.argmax((p + 1) * quota - served))  # the furthest behind; first on ties
        source[p], rank[p] = i, served[i]
        served[i] += 1
    return source, rank


class MixtureStream:
    """One split of a mixture: `batch(sample_indices)` like any token stream (data/source.py).

    `streams`: each source's stream of this split (anything with `batch(indices) -> Batch`);
    `weights`: their shares (positive; normalised here). The interleaving is a function of
    the weights alone (randomness is in each stream's window order). Raises ValueError for a
    weight so small that it gets no sample in a block.
    """

    def __init__(self, streams: Sequence, weights: Sequence[float]):
        self.streams = list(streams)
        self.counts = block_counts(weights)
        if np.any(self.counts == 0):
            raise ValueError(f"a weight below 1/{BLOCK} of the total gets no sample")
        self.source, self.rank = interleave(self.counts)

    def locate(self, g: int) -> tuple[int, int]:
        """(source, that source's own sample index) of global sample g."""
        b, p = divmod(int(g), BLOCK)
        i = int(self.source[p])
        return i, b * int(self.counts[i]) + int(self.rank[p])

    def samples_before(self, n: int) -> np.ndarray:
        """int64 `(n_sources,)`: how many of the global samples [0, n) each source served."""
        b, p = divmod(int(n), BLOCK)
        return b * self.counts + np.bincount(self.source[:p], minlength=len(self.counts))

    def batch(self, sample_indices: Sequence[int]) -> Batch:
        """The Batch whose row r is global sample `sample_indices[r]`, from its source."""
        where = [self.locate(g) for g in sample_indices]
        rows: list[Batch | None] = [None] * len(where)
        for i, stream in enumerate(self.streams):
            mine = [r for r, (s, _) in enumerate(where) if s == i]
            if mine:
                part = stream.batch([where[r][1] for r in mine])
                for j, r in enumerate(mine):
                    rows[r] = part.slice(rows=slice(j, j + 1))
        fields = ("input_ids", "labels", "position_ids", "document_ids")
        return Batch(**{f: torch.cat([getattr(row, f) for row in rows]) for f in fields})
