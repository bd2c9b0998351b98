"""Weighted mixtures: which source each global sample comes from, as a pure function of it.

Global sample g (row r of step t is g = t * global_batch_size + r: data/source.py) is assigned
by blocks of `BLOCK` consecutive samples. Every block holds exactly n_i samples of source i,
n = the largest-remainder rounding of BLOCK * w (weights normalised to sum 1), in an order
shuffled by (seed, block, split). So

- source i's share of samples, hence of tokens (every row is seq_len tokens), is n_i / BLOCK
  in every block: within 1 / BLOCK of w_i (BLOCK = 16384: 6e-5), with no drift over a run;
- the k-th sample of source i in block b is that source's sample b * n_i + k, so each source is
  read in its own order (`PackedTokens`: epochs of shuffled windows) and a source that runs out
  starts its next epoch (the rule when a weight asks for more tokens than a source has);
- everything is O(1) per sample given the block's permutation (two blocks are kept), never
  depends on the layout, and resuming at any step needs no state.
The weights of Megatron's BlendedDataset are met the same way to within a sample; its order is
built sequentially and stored, where this one is recomputed per block.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .batch import Batch
from .packing import SPLIT_CODES, as_seed

BLOCK = 1 << 14  # samples per block: shares are exact to 1 / BLOCK
_MIXTURE_CODE = 7  # folded into the block seed, apart from the windows' (seed, epoch, split)


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


class MixtureStream:
    """One split of a mixture: `batch(sample_indices)` like any token stream (data/source.py).

    `streams`: each source's stream of this split (anything with `batch(indices) -> Batch`);
    `weights`: their shares (positive; normalised here). Raises ValueError for a weight so
    small that it gets no sample in a block.
    """

    def __init__(self, streams: Sequence, weights: Sequence[float], *, seed: int, split: str):
        self.streams = list(streams)
        self.counts = block_counts(weights)
        if np.any(self.counts == 0):
            raise ValueError(f"a weight below 1/{BLOCK} of the total gets no sample")
        self.seed = as_seed(seed)
        self.split_code = SPLIT_CODES.get(split, 2)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, its rank among that source's slots), both int64 `(BLOCK,)`."""
        found = self._blocks.get(b)
        if found is None:
            rng = np.random.default_rng([self.seed, _MIXTURE_CODE, b, self.split_code])
            source = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))
            rank = np.empty(BLOCK, dtype=np.int64)
            for i in range(len(self.counts)):
                at = np.flatnonzero(source == i)
                rank[at] = np.arange(len(at))
            self._blocks = {k: v for k, v in self._blocks.items() if k == b - 1}
            found = self._blocks[b] = (source, rank)
        return found

    def locate(self, g: int) -> tuple[int, int]:
        """(source, that source's own sample index) of global sample g."""
        b, p = divmod(int(g), BLOCK)
        source, rank = self._block(b)
        i = int(source[p])
        return i, b * int(self.counts[i]) + int(rank[p])

    def samples_before(self, n: int) -> np.ndarray:
        """int64 `(n_sources,)`: how many of the global samples [0, n) each source served."""
        b, p = divmod(int(n), BLOCK)
        out = b * self.counts
        if p:
            out = out + np.bincount(self._block(b)[0][:p], minlength=len(self.counts))
        return out

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
