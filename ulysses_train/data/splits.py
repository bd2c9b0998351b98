"""The train/val split of a cache build and the split files it ends in.

`SplitRule` decides a document's split from its stable hash alone, plus at most two documents
named by index (so that small corpora still get a validation document and train keeps one),
and it is learned in one streaming pass: the build keeps no per-document array for it.
`assemble` then writes, per split, the documents' tokens back to back, each followed by EOS
(and preceded by BOS when the tokenizer's config says add_bos_token; these are the stream's
only BOS/EOS), as one flat array (`<split>.bin`) plus document start offsets
(`<split>_offsets.npy`, int64, ending with the stream length), reading the tokenized shards
(shards.py) in corpus order, one shard at a time and, within it, in blocks of about
BLOCK_TOKENS tokens (so the arrays of a block, not of a shard, are what the assembly holds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import split_files
from .shards import ranges, release_free_memory, shard_index, shard_tokens

BLOCK_TOKENS = 1 << 18  # tokens per assembled block: bounds its arrays (a few MB)


@dataclass
class SplitRule:
    """Validation: the documents whose hash is below `fraction`. If that leaves none (and
    fraction > 0, and there are two documents or more), the lowest-hash document (the first
    of equals) is validation; if it leaves train none, the highest-hash one is train. So a
    document's split never depends on which other documents exist, except in those cases."""

    fraction: float
    n: int = 0  # documents seen
    n_below: int = 0  # of them with hash < fraction
    min_hash: float = math.inf
    min_at: int = -1
    max_hash: float = -math.inf
    max_at: int = -1

    def add(self, hashes: np.ndarray) -> None:
        """Learn from the next documents' hashes (in corpus order)."""
        if len(hashes):
            low, high = int(np.argmin(hashes)), int(np.argmax(hashes))
            if hashes[low] < self.min_hash:  # strict: the first of equals stays
                self.min_hash, self.min_at = float(hashes[low]), self.n + low
            if hashes[high] > self.max_hash:
                self.max_hash, self.max_at = float(hashes[high]), self.n + high
        self.n_below += int((hashes < self.fraction).sum())
        self.n += len(hashes)

    def _exceptions(self) -> tuple[int, int]:
        """(index made validation, index kept for train); -1: none."""
        to_val = self.min_at if self.fraction > 0 and self.n_below == 0 and self.n >= 2 else -1
        n_val = self.n_below + (to_val >= 0)
        to_train = self.max_at if self.n and n_val == self.n else -1
        return to_val, to_train

    @property
    def n_val(self) -> int:
        to_val, to_train = self._exceptions()
        return self.n_below + (to_val >= 0) - (to_train >= 0)

    def is_val(self, hashes: np.ndarray, first: int) -> np.ndarray:
        """Which of the documents `first`, `first + 1`, ... (these hashes) are validation."""
        out = hashes < self.fraction
        for index, value in zip(self._exceptions(), (True, False)):
            if first <= index < first + len(hashes):
                out[index - first] = value
        return out


def assign_val(hashes: np.ndarray, nonempty: np.ndarray, fraction: float) -> np.ndarray:
    """`SplitRule` over whole arrays: which documents are validation (empty ones never)."""
    rule, where = SplitRule(fraction), np.flatnonzero(nonempty)
    rule.add(hashes[where])
    is_val = np.zeros(len(hashes), bool)
    is_val[where] = rule.is_val(hashes[where], 0)
    return is_val


class _Offsets:
    """A split's offsets file written as it grows: the .npy header np.save would write for
    `n_docs + 1` int64 values, then the values."""

    def __init__(self, path: Path, n_docs: int):
        self.f, self.expected, self.end, self.n = open(path, "wb"), n_docs + 1, 0, 1
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)),
                  "fortran_order": False, "shape": (self.expected,)}
        np.lib.format.write_array_header_1_0(self.f, header)
        np.zeros(1, np.int64).tofile(self.f)

    def add(self, lengths: np.ndarray) -> None:
        ends = self.end + np.cumsum(lengths, dtype=np.int64)
        ends.tofile(self.f)
        self.end, self.n = (int(ends[-1]), self.n + len(ends)) if len(ends) else (self.end, self.n)

    def close(self) -> int:
        self.f.close()
        if self.n != self.expected:
            raise RuntimeError(f"{self.f.name}: wrote {self.n} offsets, expected {self.expected}")
        return self.end


def _stream(tokens: np.ndarray, lengths: np.ndarray, chosen: np.ndarray, bos: int | None,
            eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The chosen documents as [BOS] + ids + EOS back to back, and each one's length.
    Memory: about 1 + 2 x the dtype's bytes per token of `tokens`."""
    ids = tokens[np.repeat(chosen, lengths)]
    kept = lengths[chosen].astype(np.int64)
    ends = np.cumsum(kept)  # EOS goes before each document's end index
    where, what = ends, np.full(len(ends), eos)
    if bos is not None:  # and BOS at each start; np.insert keeps this order at equal
        # indices: (start_i, BOS), (end_i, EOS), (start_i+1 = end_i, BOS), ...
        where = np.stack([ends - kept, ends], axis=1).ravel()
        what = np.tile([bos, eos], len(ends))
    return np.insert(ids, where, what).astype(dtype, copy=False), kept + 1 + (bos is not None)


def assemble(work: Path, n_shards: int, rule: SplitRule, out: Path, *, bos: int | None,
             eos: int, dtype: np.dtype) -> dict[str, int]:
    """Write both splits' token and offsets files into `out` from the tokenized shards of
    `work`; return tokens per split."""
    n_docs = {"train": rule.n - rule.n_val, "val": rule.n_val}
    files = {s: open(out / split_files(s)[0], "wb") for s in n_docs}
    offsets = {s: _Offsets(out / split_files(s)[1], n) for s, n in n_docs.items()}
    try:
        first = 0  # corpus index of the shard's first document
        for k in range(n_shards):
            hashes, _ = shard_index(work, k)
            lengths, tokens = shard_tokens(work, k, dtype)
            is_val = rule.is_val(hashes, first)
            ends = np.cumsum(lengths)
            for a, b in ranges(lengths, BLOCK_TOKENS):  # bounded arrays, not the shard's
                block = tokens[ends[a] - lengths[a]:ends[b - 1]]
                for split, chosen in (("train", ~is_val[a:b]), ("val", is_val[a:b])):
                    stream, doc_lengths = _stream(block, lengths[a:b], chosen, bos, eos, dtype)
                    stream.tofile(files[split])
                    offsets[split].add(doc_lengths)
            first += len(hashes)
            release_free_memory()
    finally:
        for f in files.values():
            f.close()
    return {s: o.close() for s, o in offsets.items()}
