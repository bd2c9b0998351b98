"""Hugging Face safetensors weights into an already built (and possibly sharded) GPT.

Each rank reads only the slices it owns, straight into its local shards:
- every tensor but the vocabulary ones goes through DCP with its `HuggingFaceStorageReader`: a
  state dict {HF name: our parameter} (plain tensors, TP DTensors, FSDP2 shards, or both) is
  planned by DCP, which asks each rank's reader for exactly the rows/columns that rank's shard
  covers (`safe_open(...).get_slice(name)[rows, cols]`, memory-mapped) and copies them in,
  converting the dtype on the way (`copy_`: HF bf16 -> our fp32 master weights);
- the embedding and untied head have `vocab_size` rows in the checkpoint but `padded_vocab`
  rows here (model/gpt.py pads to a multiple of 128), which DCP refuses as a size mismatch, so
  `copy_rows_` reads the same way by hand: this rank's row range clipped to the checkpoint's
  rows, and the padding rows set to zero.

Why zero padding rows: they are never inputs (no token id reaches them), never targets, and
their logits are masked to -inf (model/vocab.py), so their values change no result; zero is a
defined value where `init_weights`' random rows would be arbitrary, and what a tied
embedding's unused rows export as before they are dropped.

No rank holds more than its own shards plus one slice in the checkpoint's dtype at a time; no
rank materialises the whole model in fp32 (docs/benchmarks.md has the measured peak memory).
"""
from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader

from ..model.init import _is_dtensor, canonical_name
from .weights_dir import TensorInfo

VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")


def local_box(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(this rank's local tensor of `param`, the global index of its first element per dim).

    A DTensor's local shard is one box of the global tensor for the placements our layouts use
    (TP Shard(0)/Shard(1), FSDP2 Shard(0), and FSDP2 over TP); torch computes where it starts
    exactly as DCP does.
    """
    if not _is_dtensor(param):
        return param.data, (0,) * param.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"local shard {tuple(local.shape)} != computed {tuple(shape)}")
    return local, tuple(offset)


@torch.no_grad()
def copy_rows_(param: torch.Tensor, name: str, info: TensorInfo) -> None:
    """Load HF tensor `name` ((V, d) in `info.file`) into the first V rows of `param` (Vpad, d),
    this rank's shard only; rows >= V (the padding) become zero."""
    local, (row0, col0) = local_box(param)  # local: (n_rows, n_cols) of this rank
    n_rows, n_cols = local.shape
    take = max(0, min(row0 + n_rows, info.shape[0]) - row0)  # rows of ours that exist there
    if take:
        with safe_open(info.file, framework="pt") as f:
            piece = f.get_slice(name)[row0:row0 + take, col0:col0 + n_cols]  # (take, n_cols)
        local[:take].copy_(piece)
    local[take:].zero_()


def load_hf_weights(model: torch.nn.Module, path: str, mapping: dict[str, str],
                    table: dict[str, TensorInfo], distributed: bool) -> int:
    """Load the HF tensors of `mapping` ({ours: HF name}, checked by `check_tensors` against
    `table`) into `model`; return the number of parameters loaded (global, padding excluded).

    A collective when `distributed` (DCP plans the read over every rank of the default group).
    """
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    if set(params) != set(mapping):
        raise RuntimeError(f"model parameters {sorted(set(params) ^ set(mapping))[:3]} do not "
                           "match the checkpoint's names")  # config and model disagree: a bug
    state = {mapping[ours]: p for ours, p in params.items() if ours not in VOCAB_PARAMS}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(path), no_dist=not distributed)
    for ours in VOCAB_PARAMS:
        if ours in params:
            copy_rows_(params[ours], mapping[ours], table[mapping[ours]])
    return sum(torch.Size(table[theirs].shape).numel() for theirs in mapping.values())
