"""Megatron-LM indexed datasets (`PREFIX.idx` + `PREFIX.bin`), read without importing Megatron.

The layout is the one Megatron-LM's `megatron/core/datasets/indexed_dataset.py` writes
(`_IndexWriter`, also used by its `tools/preprocess_data.py` and by datatrove), little-endian:

    .idx  magic     9 bytes  b"MMIDIDX\\x00\\x00"
          version   uint64   1
          dtype     uint8    code of the token type (DTYPE_CODES)
          S         uint64   number of sequences
          D         uint64   number of document indices (= documents + 1)
          lengths   int32[S]  tokens per sequence
          pointers  int64[S]  byte offset of each sequence in the .bin
          doc_idx   int64[D]  document d is sequences doc_idx[d] .. doc_idx[d+1] (doc_idx[0] = 0,
                              doc_idx[-1] = S)
          (modes    int8[S]   multimodal datasets only; ignored here)
    .bin  the tokens of all sequences back to back, in the dtype of the code.

Megatron's writer lays sequences out contiguously (pointer i = bytes of sequences 0..i-1), so a
document is a contiguous token range and the whole `.bin` is one flat token array; we check
that, and that the `.bin` has exactly the bytes the index describes.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..config.errors import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's DType enum: code -> numpy type (6 and 7 are floats: never token ids)
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes


def read_header(idx: Path, key: str) -> tuple[np.dtype, int, int, int]:
    """(dtype, S, D, file size) from the header of `idx`; ConfigError naming it if bad."""
    try:
        size = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(HEADER.size)
    except OSError as e:
        raise ConfigError(key, f"cannot read {idx} ({e.strerror}); check the path") from e
    if len(head) < HEADER.size:
        raise ConfigError(key, f"{idx} has {size} bytes, too short for a Megatron index "
                          f"header ({HEADER.size} bytes); it is truncated or not an index")
    magic, version, code, n_seq, n_idx = HEADER.unpack(head)
    if magic != MAGIC:
        raise ConfigError(key, f"{idx} is not a Megatron index (it starts {magic!r}, not "
                          f"{MAGIC!r}); give the prefix of a .bin/.idx pair written by "
                          "Megatron's preprocess_data.py")
    if version != VERSION:
        raise ConfigError(key, f"{idx} has index version {version}; this reader knows "
                          f"version {VERSION} only")
    if code not in DTYPE_CODES:
        raise ConfigError(key, f"{idx} has unknown dtype code {code} (Megatron's codes are "
                          f"{min(DTYPE_CODES)}-{max(DTYPE_CODES)}); the file is damaged or from "
                          "another format")
    dtype = np.dtype(DTYPE_CODES[code])
    if dtype.kind == "f":
        raise ConfigError(key, f"{idx} has dtype code {code} ({dtype}): float values are not "
                          "token ids")
    return dtype, n_seq, n_idx, size


def read_index(prefix: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The tokens (read-only memmap of `PREFIX.bin`) and the document offsets in tokens (int64,
    (n_docs + 1,), from 0 to len(tokens)) of the Megatron dataset at `prefix`.

    Reads only the `.idx` (12 bytes per sequence, 8 per document). Raises one ConfigError
    (`key`) naming the file for: a missing `.idx` or `.bin`, a bad magic, version or dtype
    code, an `.idx` whose size or arrays are inconsistent, and a `.bin` whose size is not what
    the index describes (shorter: truncated).
    """
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise ConfigError(key, f"{path} not found: a Megatron dataset is a PREFIX.bin + "
                              "PREFIX.idx pair; give the prefix of an existing pair")
    dtype, n_seq, n_idx, size = read_header(idx, key)
    arrays = HEADER.size + 12 * n_seq + 8 * n_idx
    if size not in (arrays, arrays + n_seq):  # + n_seq: a multimodal index's modes
        raise ConfigError(key, f"{idx} has {size} bytes, but its header ({n_seq} sequences, "
                          f"{n_idx} document indices) needs {arrays}: the index is truncated "
                          "or damaged")
    raw = np.memmap(idx, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(raw, np.dtype("<i4"), n_seq, HEADER.size).astype(np.int64)
    pointers = np.frombuffer(raw, np.dtype("<i8"), n_seq, HEADER.size + 4 * n_seq)
    doc_idx = np.frombuffer(raw, np.dtype("<i8"), n_idx, HEADER.size + 12 * n_seq)
    starts = np.zeros(n_seq + 1, dtype=np.int64)  # token offset of each sequence, and the end
    np.cumsum(lengths, out=starts[1:])
    problem = _inconsistency(lengths, pointers, doc_idx, starts, dtype.itemsize)
    if problem:
        raise ConfigError(key, f"{idx} is inconsistent: {problem}; the index is damaged")
    n_tokens = int(starts[-1])
    expected = n_tokens * dtype.itemsize
    have = bin_.stat().st_size
    if have != expected:
        what = "is truncated" if have < expected else "does not match its index"
        raise ConfigError(key, f"{bin_} has {have} bytes, but {idx} indexes {n_tokens} tokens "
                          f"of {dtype} ({expected} bytes): the .bin {what}; rewrite the pair")
    offsets = starts[np.asarray(doc_idx)]
    if n_tokens == 0:  # numpy cannot memory-map an empty file
        tokens = np.zeros(0, dtype=dtype)
        tokens.flags.writeable = False
        return tokens, offsets
    return np.memmap(bin_, dtype=dtype.newbyteorder("<"), mode="r", shape=(n_tokens,)), offsets


def _inconsistency(lengths, pointers, doc_idx, starts, itemsize: int) -> str:
    """What contradicts the index's own arrays, or ""."""
    if len(lengths) and lengths.min() < 0:
        return f"sequence {int(np.argmin(lengths))} has a negative length"
    bad = np.flatnonzero(pointers != starts[:-1] * itemsize)
    if len(bad):
        i = int(bad[0])
        return (f"sequence {i} starts at byte {int(pointers[i])}, not {int(starts[i]) * itemsize}"
                " (sequences must be contiguous, as Megatron writes them)")
    if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != len(lengths):
        return (f"the document indices must run from 0 to the sequence count {len(lengths)}, "
                f"got {doc_idx[:1].tolist()} .. {doc_idx[-1:].tolist()}")
    if np.any(np.diff(doc_idx) < 0):
        return "the document indices decrease"
    return ""
