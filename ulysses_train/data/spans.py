"""`DocumentSpans`: a token stream made of chosen documents, read in place from token files.

A source's training stream is its documents back to back. When every document is used once, in
file order, that stream is the token file itself (`PackedTokens` over the cache's `.bin`). Once
documents are split off for validation by index, filtered by length or repeated
(`data/shaping.py`), or live in several pre-tokenized files (`data/pretokenized.py`), the stream
is a list of *occurrences*: (where the document starts in the files, how long it is). This class
serves that list as if it were one flat array, so `PackedTokens` windows it exactly as it windows
a file: `spans[a:b]` gathers the tokens of virtual positions [a, b) from the files, and
`offsets` are the virtual document starts. No token is copied until a window asks for it; the
index costs 16 bytes per occurrence (its file position and its virtual start).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class DocumentSpans:
    """The virtual concatenation of document occurrences over one or more token arrays.

    `parts`: 1-D integer arrays (memmaps welcome), thought of as concatenated: position p of
    the whole is `parts[i][p - base[i]]`. `starts`, `lengths`: int64 `(n,)`, occurrence j is
    positions [starts[j], starts[j] + lengths[j]) of the whole, which must lie inside one part
    (a document never straddles two files). Occurrences may repeat a document.
    Raises ValueError when an occurrence leaves its part.
    """

    def __init__(self, parts: Sequence[np.ndarray], starts: np.ndarray, lengths: np.ndarray):
        self.parts = list(parts)
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        self.base = np.concatenate([[0], np.cumsum(sizes)])  # (n_parts + 1,)
        self.starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        # offsets: virtual start of each occurrence, then the total: (n + 1,)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if len(self.starts):
            part = np.searchsorted(self.base, self.starts, side="right") - 1
            if np.any(self.starts + lengths > self.base[np.minimum(part + 1, len(sizes))]):
                raise ValueError("a document occurrence crosses the end of its token file")
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """int64 (n,): tokens of each occurrence."""
        return np.diff(self.offsets)

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) of the concatenated parts (inside one part)."""
        i = int(np.searchsorted(self.base, start, side="right")) - 1
        return np.asarray(self.parts[i][start - self.base[i]:stop - self.base[i]])

    def __getitem__(self, index: slice) -> np.ndarray:
        """Tokens of virtual positions `index` (a slice with step 1), as one new array."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("DocumentSpans supports only contiguous slices")
        a, b, _ = index.indices(len(self))
        if b <= a:
            return np.zeros(0, dtype=self.dtype)
        out = np.empty(b - a, dtype=self.dtype)
        # occurrences overlapping [a, b): first is the one holding a, last the one holding b-1
        j = int(np.searchsorted(self.offsets, a, side="right")) - 1
        at = a
        while at < b:
            lo, hi = self.offsets[j], self.offsets[j + 1]
            take = min(b, hi) - at
            src = self.starts[j] + (at - lo)
            out[at - a:at - a + take] = self._read(int(src), int(src + take))
            at += take
            j += 1
        return out
