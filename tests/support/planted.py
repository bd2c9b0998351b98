"""Checkpoints with a planted pickle: what a malicious download looks like.

Each helper rewrites a real step directory so that reading it with plain `pickle` would call
`open(marker, "w")` — a file appears, nothing else changes — and then rewrites `manifest.json`
so the content hashes match again (whoever plants a file can rewrite the manifest too).
"""
from __future__ import annotations

import os
import pickle
import struct
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ulysses_train.checkpoint.manifest import DCP_METADATA, write_manifest


def _call_open(marker: str) -> bytes:
    """Protocol-2 opcodes that call `open(marker, "w")` and drop the result: GLOBAL, MARK, two
    BINUNICODE strings, TUPLE, REDUCE, POP (pickletools' names). No memo entries, so the bytes
    can precede the body of any protocol-2 pickle."""
    def text(s: str) -> bytes:
        raw = s.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw

    return b"cbuiltins\nopen\n(" + text(marker) + text("w") + b"tR0"


def plant_in_metadata(step: str, marker: str) -> None:
    """Replace `step/.metadata` by a pickle that opens `marker` for writing and then yields the
    checkpoint's real metadata, so a plain reader goes on and loads it; manifest rewritten."""
    path = os.path.join(step, DCP_METADATA)
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # our own, untampered file
    body = pickle.dumps(metadata, protocol=2)  # b"\x80\x02" + body + b"."
    with open(path, "wb") as f:
        f.write(body[:2] + _call_open(marker) + body[2:])
    write_manifest(step)


class _OpensMarker:
    """Pickles as `open(marker, "w")` (an object nobody would put in a checkpoint)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_in_trainer_state(step: str, marker: str, key: str = "trainer.step") -> None:
    """Re-save checkpoint `step` (same entries, same values) with the non-tensor entry `key`
    replaced by a pickled `open(marker, "w")` — DCP stores such entries as BYTE_IO items inside
    a `.distcp` file, read back with `torch.load`; manifest rewritten."""
    md = dcp.FileSystemReader(step).read_metadata().state_dict_metadata  # our own file
    state = {k: torch.empty(tuple(e.size), dtype=e.properties.dtype)
             if isinstance(e, TensorStorageMetadata) else None for k, e in md.items()}
    with warnings.catch_warnings():  # "assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=step, no_dist=True)
        state[key] = _OpensMarker(marker)
        for name in os.listdir(step):
            if name.endswith(".distcp") or name == DCP_METADATA:
                os.remove(os.path.join(step, name))
        dcp.save(state, checkpoint_id=step, no_dist=True)
    write_manifest(step)
