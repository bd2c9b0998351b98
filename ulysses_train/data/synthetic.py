"""Synthetic tokens: instant, file-free data that a model can still visibly learn.

Tokens are drawn i.i.d. from a fixed Zipf-like unigram distribution (p(rank r) ~ (r + 2.7)^-1.1),
whose entropy is well below log V (6.6 vs 9.0 nats at V = 8192), so the loss falls clearly as the
model learns the unigram statistics. EOS (id 0, never drawn otherwise) appears with probability
1/mean_doc at each position, cutting rows into pseudo-documents of random (geometric) length.
Row g of a split is generated from a torch.Generator seeded by (seed, split, g) alone, so any row
is produced without the others and the data does not depend on how many processes read it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .batch import Batch, batch_from_windows
from .packing import SPLIT_CODES, as_seed

EOS_ID = 0
ZIPF_EXPONENT = 1.1
ZIPF_OFFSET = 2.7  # flattens the head a little, as real token frequencies are
_STREAM_TAG = 0x5E17  # keeps these seeds apart from other users of (seed, ...) tuples


def zipf_cdf(vocab_size: int) -> torch.Tensor:
    """Cumulative probabilities over the ids 1..vocab_size-1 (id 0 is EOS), float64."""
    ranks = torch.arange(1, vocab_size, dtype=torch.float64)
    probs = (ranks + ZIPF_OFFSET) ** -ZIPF_EXPONENT
    return torch.cumsum(probs / probs.sum(), 0)


def mean_document_length(seq_len: int) -> int:
    """About four documents per row, within sane bounds, so document ids are never trivial."""
    return int(min(2048, max(8, seq_len // 4)))


class SyntheticTokens:
    """Rows of random Zipf tokens for one split; row g depends only on (seed, split, g)."""

    def __init__(self, vocab_size: int, seq_len: int, *, seed: int, split: str):
        if vocab_size < 2:
            raise ValueError(f"synthetic data needs a vocab of at least 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = as_seed(seed)
        self.split = split
        self.mean_doc = mean_document_length(seq_len)
        self._cdf = zipf_cdf(vocab_size).to(torch.float32)

    def _generator(self, g: int) -> torch.Generator:
        words = np.random.SeedSequence(
            [self.seed, SPLIT_CODES.get(self.split, 2), g, _STREAM_TAG]).generate_state(2)
        return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))

    def row(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global sample g: a window of S+1 tokens and the document id of each of its first S."""
        gen = self._generator(g)
        n = self.seq_len + 1
        u = torch.rand(n, generator=gen)
        # Inverse-CDF sampling; the clamp guards against the float32 CDF ending just below 1.
        ranks = torch.searchsorted(self._cdf, u).clamp_(max=self.vocab_size - 2)
        tokens = ranks + 1  # rank r -> id r+1; id 0 is reserved for EOS
        is_eos = torch.rand(n, generator=gen) < 1.0 / self.mean_doc
        tokens[is_eos] = EOS_ID
        # An EOS ends its own document, so a token's id counts the EOS strictly before it.
        eos_before = torch.cumsum(is_eos[:-1].long(), 0) - is_eos[:-1].long()
        return tokens, eos_before

    def batch(self, sample_indices: Sequence[int]) -> Batch:
        rows = [self.row(g) for g in sample_indices]
        if not rows:
            empty = torch.empty(0, self.seq_len + 1, dtype=torch.int64)
            return batch_from_windows(empty, empty[:, :-1])
        windows = torch.stack([w for w, _ in rows])  # N x (S+1,) -> (N, S+1)
        docs = torch.stack([d for _, d in rows])  # N x (S,) -> (N, S)
        return batch_from_windows(windows, docs)

    def describe(self) -> str:
        return (f"synthetic: Zipf({ZIPF_EXPONENT}) tokens over vocab {self.vocab_size}, "
                f"EOS every ~{self.mean_doc} tokens")
