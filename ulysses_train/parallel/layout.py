"""SequenceLayout: which global token positions each sequence-parallel rank holds.

The one owner of the token layout (issue 12): the data path (tokens, labels, document ids),
RoPE positions, the loss's token count and the ring attention all ask this object, so they
cannot disagree.

Notation: S = `seq_len` (true tokens per row), P = `sp` ranks per sequence, R = `ring` ring
groups, U = P / R Ulysses ranks per ring rank. sp-group rank = ring_rank * U + ulysses_rank
(mesh order dp, ring, ulysses, tp: Ulysses peers are adjacent).

- ring = 1 (Ulysses only): the row is padded to S' = the next multiple of P and rank u holds
  positions [u*S'/P, (u+1)*S'/P) — exactly the layout before rings existed when P divides S.
- ring = R > 1: the row is padded to S' = the next multiple of 2P and cut into 2R equal chunks
  of S'/(2R); ring rank i holds chunks i and 2R-1-i, concatenated in that order (the
  "zig-zag" causal load balance of Megatron-LM's context parallelism: every ring rank then
  does the same amount of causal attention work). After the Ulysses all-to-all a
  ring rank sees exactly those S'/R positions; Ulysses rank u holds the u-th contiguous piece
  of S'/P of them (2P divides S', so each of the two chunks splits into U whole pieces).
Positions >= S are padding: their labels are ignored and they count 0 tokens; under causal
attention no real query can see them (they come after every real token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceLayout:
    """The token layout of one row over a sequence-parallel group.

    Args:
        seq_len: S, true tokens per row (>= 1).
        sp: P, ranks per sequence (Ulysses × ring).
        ring: R, ring degree; must divide P.

    Raises ValueError on sizes that do not fit (config validation reports them first).
    """

    seq_len: int
    sp: int = 1
    ring: int = 1

    def __post_init__(self):
        if self.seq_len < 1 or self.sp < 1 or self.ring < 1 or self.sp % self.ring:
            raise ValueError(f"bad sequence layout: seq_len={self.seq_len}, sp={self.sp}, "
                             f"ring={self.ring} (need seq_len, sp, ring >= 1 and ring | sp)")

    @property
    def ulysses(self) -> int:
        """U = P / R, the Ulysses degree inside one ring rank."""
        return self.sp // self.ring

    @property
    def padded_len(self) -> int:
        """S': S rounded up to a multiple of P (ring = 1) or 2P (ring > 1)."""
        multiple = self.sp if self.ring == 1 else 2 * self.sp
        return -(-self.seq_len // multiple) * multiple

    @property
    def local_len(self) -> int:
        """Tokens per rank, S'/P."""
        return self.padded_len // self.sp

    @property
    def padding(self) -> int:
        """S' - S: padded positions at the end of every row."""
        return self.padded_len - self.seq_len

    def chunk_len(self) -> int:
        """S'/(2R): the length of one load-balancing chunk (ring > 1)."""
        return self.padded_len // (2 * self.ring)

    def ring_positions(self, ring_rank: int) -> torch.Tensor:
        """int64 (S'/R,): global positions ring rank i holds after the Ulysses all-to-all."""
        if self.ring == 1:
            return torch.arange(self.padded_len)
        c = self.chunk_len()
        first = torch.arange(ring_rank * c, (ring_rank + 1) * c)  # chunk i
        j = 2 * self.ring - 1 - ring_rank
        return torch.cat((first, torch.arange(j * c, (j + 1) * c)))  # chunks i, 2R-1-i

    def rank_positions(self, sp_rank: int) -> torch.Tensor:
        """int64 (S'/P,): global positions sp-group rank `sp_rank` holds (before attention)."""
        ring_rank, ulysses_rank = divmod(sp_rank, self.ulysses)
        n = self.local_len
        return self.ring_positions(ring_rank)[ulysses_rank * n:(ulysses_rank + 1) * n]
