"""The document-length profile of the training stream a run really trains on, per source.

A run of T steps reads, from each source of a mixture, the first n_i of that source's samples
(mixture.py); sample k of a source is window perm_e[k mod W] of epoch e = k // W (packing.py),
and window w's input tokens are stream positions [w S, w S + S). So the number of times each
window is read, c_w, is known exactly, and the input tokens each document contributes are
  sum_w c_w * |[a_d, b_d) ∩ [w S, w S + S)|
for the document occupying stream positions [a_d, b_d) (computed per document from prefix sums
of c, O(documents + windows)). `length_profile` bins those tokens by document length (powers of
two), which is what `tokens_by_length.png` shows: what shaping (shaping.py) did to the stream.
"""
from __future__ import annotations

import numpy as np

from .shaping import length_histogram


def window_reads(stream, n_samples: int) -> np.ndarray:
    """int64 `(W,)`: how often each window of `stream` (a PackedTokens) is read by its
    samples 0 .. n_samples-1."""
    full, rest = divmod(int(n_samples), stream.n_windows)
    reads = np.full(stream.n_windows, full, dtype=np.int64)
    if rest:
        reads += np.bincount(stream.permutation(full)[:rest], minlength=stream.n_windows)
    return reads


def tokens_per_document(offsets: np.ndarray, seq_len: int, reads: np.ndarray) -> np.ndarray:
    """int64 `(D,)`: input tokens read from each document (module docstring's sum).

    `offsets`: int64 `(D + 1,)` document starts in the stream, then its length; `reads`:
    `(W,)` reads per window. Positions past the last window are never inputs."""
    a, b = offsets[:-1], offsets[1:]
    s = seq_len
    c = np.concatenate([reads, [0]])  # a position past the windows is read 0 times
    prefix = np.concatenate([[0], np.cumsum(c)])  # prefix[w] = reads of windows < w
    wa = np.minimum(a // s, len(reads))
    wb = np.minimum(np.maximum(b - 1, a) // s, len(reads))
    same = wa == wb
    first = c[wa] * np.where(same, b - a, (wa + 1) * s - a)
    last = np.where(same, 0, c[wb] * (b - wb * s))
    middle = np.where(same, 0, s * (prefix[wb] - prefix[np.minimum(wa + 1, wb)]))
    return (first + last + middle).astype(np.int64)


def length_profile(data, steps: int) -> dict:
    """{"edges": [...], "sources": {name: {"tokens": [...], "epochs": float}}}: input tokens
    by document length (bins edges[k] <= L < edges[k+1]) that `steps` global batches of the
    mixture `data` (a DataSource) read from each source; {} when it is not a mixture."""
    samples = data.source_samples(steps)
    if not samples:
        return {}
    per_source, all_lengths = {}, []
    for name, n in samples.items():
        stream = data.sources[name]["train"]
        reads = window_reads(stream, n)
        tokens = tokens_per_document(stream.doc_offsets, stream.seq_len, reads)
        lengths = np.diff(stream.doc_offsets)
        per_source[name] = (lengths, tokens, n / stream.n_windows)
        all_lengths.append(lengths)
    edges, _ = length_histogram(np.concatenate(all_lengths))
    out = {"edges": [int(e) for e in edges], "sources": {}}
    for name, (lengths, tokens, epochs) in per_source.items():
        _, binned = length_histogram(lengths, tokens.astype(np.float64), edges)
        out["sources"][name] = {"tokens": [int(t) for t in binned], "epochs": round(epochs, 4)}
    return out
