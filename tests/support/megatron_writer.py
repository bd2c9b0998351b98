"""A writer of Megatron-LM indexed datasets (`PREFIX.bin` + `PREFIX.idx`) for tests.

Follows the layout of Megatron-LM's `megatron/core/datasets/indexed_dataset.py`
(`IndexedDatasetBuilder` + `_IndexWriter`) byte for byte: the `.bin` holds every sequence's
tokens back to back in the dataset's dtype; the `.idx` holds the 9-byte magic
b"MMIDIDX\\x00\\x00", version 1 (uint64), the dtype code (uint8), the sequence count S (uint64),
the document-index count D = documents + 1 (uint64), then int32[S] sequence lengths, int64[S]
sequence byte pointers and int64[D] document indices (starting at 0, each entry the sequence
count after that document), all little-endian. Written independently of ulysses_train's reader
so that a test compares two readings of the format, not one with itself.
"""
from __future__ import annotations

import struct

import numpy as np

# Megatron's DType enum (code <- numpy type name)
CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6,
         "float32": 7, "uint16": 8}


def write_megatron(prefix, documents, dtype="uint16", code=None, version=1):
    """Write `documents` (each a list of sequences, each a list of ids) as PREFIX.bin/.idx.

    `code` / `version` override what the header says (for tests of damaged files). Returns
    (bin path, idx path).
    """
    dtype = np.dtype(dtype)
    lengths, doc_idx = [], [0]
    with open(f"{prefix}.bin", "wb") as data:
        for doc in documents:
            for seq in doc:
                data.write(np.asarray(seq, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes())
                lengths.append(len(seq))
            doc_idx.append(len(lengths))  # IndexedDatasetBuilder.end_document
    pointers, at = [], 0
    for n in lengths:  # _IndexWriter._sequence_pointers: byte offset of each sequence
        pointers.append(at)
        at += n * dtype.itemsize
    with open(f"{prefix}.idx", "wb") as idx:
        idx.write(b"MMIDIDX\x00\x00")
        idx.write(struct.pack("<Q", version))
        idx.write(struct.pack("<B", CODES[dtype.name] if code is None else code))
        idx.write(struct.pack("<Q", len(lengths)))
        idx.write(struct.pack("<Q", len(doc_idx)))
        idx.write(np.asarray(lengths, dtype="<i4").tobytes())
        idx.write(np.asarray(pointers, dtype="<i8").tobytes())
        idx.write(np.asarray(doc_idx, dtype="<i8").tobytes())
    return f"{prefix}.bin", f"{prefix}.idx"
