"""Held-out loss per position bucket: does the model use its longer context?

A model that uses its context predicts later tokens better: the loss falls with the position.
Buckets are [start, end) ranges of the token's position (its RoPE position: the position in the
row, or in its document under `data.document_mask`); the loss of a bucket is the sum of its
tokens' losses over the sum of their count — token-weighted, like the training loss, so every
layout gives the same value: each rank adds the tokens it holds and the sums are all-reduced
over dp x sp once (tp ranks hold the same tokens and the same, tp-reduced, values).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch

from ..data import IGNORE_INDEX
from ..parallel.grad_sync import all_reduce_
from .tokens import token_stats

FIRST_EDGE = 64  # the first bucket is [0, 64): fewer tokens make a noisy point


def bucket_edges(seq_len: int, edges: Sequence[int] = ()) -> list[int]:
    """`edges` if given, else 0, 64, 128, ... (powers of two) and `seq_len` last.

    E.g. seq_len 1000 -> [0, 64, 128, 256, 512, 1000]; seq_len <= 64 -> [0, seq_len].
    """
    if edges:
        return [int(e) for e in edges]
    out, edge = [0], FIRST_EDGE
    while edge < seq_len:
        out.append(edge)
        edge *= 2
    return out + [seq_len]


def bucket_sums(loss: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                edges: Sequence[int]) -> torch.Tensor:
    """(2, n_buckets) float64: per bucket the loss sum and the valid-token count, of tokens with
    labels != -100 and edges[i] <= position < edges[i+1]. loss, labels, positions: (B, S)."""
    bounds = torch.tensor(list(edges), device=positions.device)
    bucket = torch.bucketize(positions, bounds, right=True) - 1  # (B, S): index of the bucket
    keep = (labels != IGNORE_INDEX) & (bucket >= 0) & (bucket < len(edges) - 1)
    out = torch.zeros(2, len(edges) - 1, dtype=torch.float64, device=loss.device)
    out[0].index_add_(0, bucket[keep], loss[keep].double())
    out[1].index_add_(0, bucket[keep], torch.ones_like(loss[keep], dtype=torch.float64))
    return out


def rows_of(sums: torch.Tensor, edges: Sequence[int]) -> list[dict]:
    """[{"start", "end", "loss", "tokens"}] from reduced (2, n_buckets) sums; loss None (null
    in JSON) for a bucket without tokens."""
    total, count = sums.tolist()
    return [{"start": int(edges[i]), "end": int(edges[i + 1]),
             "loss": total[i] / count[i] if count[i] else None, "tokens": int(count[i])}
            for i in range(len(edges) - 1)]


def loss_by_position(model: torch.nn.Module, dims, micro_batches: Iterable[tuple],
                     edges: Sequence[int], autocast=contextlib.nullcontext) -> list[dict]:
    """Rows of `rows_of` over the held-out tokens of `micro_batches`.

    micro_batches: this rank's (input_ids, position_ids, labels, attn_mask) as the trainer's
    `_micro_batches` yields them ((mb, S/sp) each; the same number on every rank). Collective:
    every rank of the job calls it together.
    """
    device = next(iter(model.parameters())).device
    sums = torch.zeros(2, len(edges) - 1, dtype=torch.float64, device=device)
    for input_ids, position_ids, labels, mask in micro_batches:
        loss, _ = token_stats(model, input_ids, position_ids, labels, mask, autocast)
        sums += bucket_sums(loss, labels, position_ids, edges)
    return rows_of(all_reduce_(sums, dims.group("dp_sp")), edges)
