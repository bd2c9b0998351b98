"""Long-document shaping: which documents of a source are used, and how often.

Context extension trains on long documents, and recipes shape each source's length mix rather
than take it as it comes (ProLong, Gao et al. 2024, filter by length; Fu et al. 2024, "Data
Engineering for Scaling Language Models to 128K Context", upsample long documents within each
domain and keep the domain mix). Per source (`data.sources[i]`, docs/data.md):

- `min_tokens` / `max_tokens`: keep only documents with min_tokens <= L <= max_tokens (0 = no
  bound), L being the tokens the document occupies in the stream (its BOS/EOS included).
  Applied to both splits, so validation measures the shaped distribution.
- `length_upsample = F` (>= 1), `long_tokens = T` (0: data.seq_len): a train document with
  L >= T appears c(d) = floor(F) + [u(d) < F - floor(F)] times, u(d) in [0, 1) a hash of the
  document's index in its split and the seed (not the source's name); so E[c] = F exactly, per
  document, with no state. The stream
  is pass 0 (every kept document, in order), then pass r = 1, 2, ... (the documents with
  c(d) > r, in order): a repeated document is packed with other neighbours each time, and the
  window order is shuffled anyway (`PackedTokens`). The long documents' share of the source's
  tokens goes from p to F p / (F p + 1 - p).

The same hash (`unit_hash`) splits pre-tokenized documents into train and validation by index.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def unit_hash(index: np.ndarray, salt: int) -> np.ndarray:
    """A number in [0, 1) for each index: splitmix64 of (index, salt), float64 `(n,)`.

    A pure function of its inputs (no RNG state), so any subset of documents gets the same
    values as the whole, and a document's fate never depends on which others exist.
    Source: Steele et al. 2014, "Fast splittable pseudorandom number generators" (splitmix64).
    """
    with np.errstate(over="ignore"):
        z = np.asarray(index, dtype=np.uint64) * _GOLDEN + np.uint64(salt % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def keep_by_length(lengths: np.ndarray, min_tokens: int, max_tokens: int) -> np.ndarray:
    """bool `(n,)`: documents with min_tokens <= length <= max_tokens (0 = no bound)."""
    keep = lengths >= max(min_tokens, 1)  # an empty document never enters a stream
    if max_tokens > 0:
        keep &= lengths <= max_tokens
    return keep


def copies(lengths: np.ndarray, factor: float, long_tokens: int, salt: int,
           index: np.ndarray | None = None) -> np.ndarray:
    """int64 `(n,)`: how often each document appears (the module docstring's c(d)); `index`:
    each document's index in its split (default 0..n-1), which u(d) hashes, so a document's
    count does not change when a length filter drops others."""
    out = np.ones(len(lengths), dtype=np.int64)
    if factor == 1.0:
        return out
    whole, frac = int(np.floor(factor)), factor - np.floor(factor)
    index = np.arange(len(lengths)) if index is None else index
    extra = unit_hash(index, salt) < frac
    long = lengths >= long_tokens
    out[long] = whole + extra[long]
    return out


def occurrences(doc_index: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Document indices in stream order: pass 0 all, pass r those with counts > r. `(sum,)`."""
    passes = [doc_index[counts > r] for r in range(int(counts.max(initial=1)))]
    return np.concatenate(passes) if passes else doc_index[:0]


def length_histogram(lengths: np.ndarray, weights: np.ndarray | None = None,
                     edges: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens by document length: (edges, tokens per bin), bins by powers of two from 1.

    `lengths`: int64 `(n,)` document lengths; `weights`: tokens counted per document (default
    its length: a stream's tokens). Returns edges `(k + 1,)` and float64 tokens `(k,)`.
    """
    if edges is None:
        top = max(2, int(lengths.max(initial=1)) + 1)
        edges = 2 ** np.arange(0, int(np.ceil(np.log2(top))) + 1)
    w = lengths.astype(np.float64) if weights is None else weights
    tokens, _ = np.histogram(lengths, bins=edges, weights=w)
    return edges, tokens
