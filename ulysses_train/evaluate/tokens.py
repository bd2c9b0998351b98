"""Per-token loss and top-1 correctness from a built model, in any training layout.

The model's forward with labels calls its injected `model.loss_fn(logits, labels)` on each tile
of the sequence (`train.loss_chunk`, model/tiling.py): plain logits alone, vocab-sharded
DTensor logits under tensor parallelism. `token_stats` swaps in a recorder for one forward, so
the head runs exactly as in training (tiled: never the full S x V logits) and every tile's
per-token values are kept instead of being summed.

Per token, with logits z over the padded vocabulary (its padding columns already -inf,
model/vocab.py: exp gives them 0, so they take no probability and are never top-1) and target t:
    loss = log(sum_v exp(z_v - m)) - (z_t - m),  m = max_v z_v     (cross-entropy, stable form)
    correct = z_t >= m                                                (t is a top-1 token)
Under tensor parallelism m, the exp-sum and z_t are all-reduced over the tp group (Megatron's
vocab-parallel cross-entropy, Shoeybi et al. 2019, sec. 3), so both values are the
one-process ones, replicated on the tp ranks. Ties count as correct.
"""
from __future__ import annotations

import contextlib

import torch

from ..config.errors import ConfigError
from ..data import IGNORE_INDEX
from ..data.batch import Batch
from ..parallel.batching import dp_rows, shard_batch
from ..parallel.layout import SequenceLayout
from ..parallel.tensor import vocab_parallel_terms


def _vocab_shard(logits) -> tuple[torch.Tensor, int, object]:
    """(local logits (..., V/tp), first vocab id of the shard, tp group or None)."""
    if hasattr(logits, "to_local"):  # a DTensor sharded on the vocab dim (tensor.py's plan)
        mesh, local = logits.device_mesh, logits.to_local()
        return local, mesh.get_local_rank() * local.shape[-1], mesh.get_group()
    return logits, 0, None


@torch.no_grad()
def loss_and_correct(logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (fp32 loss, bool top-1 correct), both (B, c), for logits (B, c, V) — plain or
    a vocab-sharded DTensor — and labels (B, c). Ignored labels get loss 0 and False. The terms
    are the training loss's own (parallel/tensor.py vocab_parallel_terms)."""
    local, start, group = _vocab_shard(logits)
    z = local.float().reshape(-1, local.shape[-1])  # (B, c, V/tp) -> (B*c, V/tp), a copy
    if z.data_ptr() == local.data_ptr():
        z = z.clone()  # fp32 logits already: the terms overwrite their input
    _, sum_exp, target, valid, _, _ = vocab_parallel_terms(z, labels.reshape(-1), start, group)
    loss = torch.where(valid, sum_exp.log() - target, 0.0)
    return loss.view(labels.shape), (valid & (target >= 0)).view(labels.shape)


class _Recorder:
    """A `model.loss_fn` that keeps each tile's per-token values and returns the usual sums."""

    def __init__(self):
        self.loss: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []

    def __call__(self, logits, labels: torch.Tensor):
        loss, correct = loss_and_correct(logits, labels)
        self.loss.append(loss)
        self.correct.append(correct)
        return loss.sum(), (labels != IGNORE_INDEX).sum()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module, recorder: _Recorder):
    saved, was_training = model.loss_fn, model.training
    model.loss_fn = recorder
    model.eval()
    try:
        yield
    finally:
        model.loss_fn = saved
        model.train(was_training)


@torch.no_grad()
def token_stats(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor, attn_mask=None, autocast=contextlib.nullcontext
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (loss, correct), (B, S_local) each, of this rank's tokens (its rows and sp
    columns, as the trainer feeds them). Collective under tp/sp like a training forward: every
    rank of the job must call it with the same shapes."""
    recorder = _Recorder()
    with _eval_mode(model, recorder), autocast():
        model(input_ids, position_ids, labels, attn_mask=attn_mask)
    # tiles run left to right along the sequence: (B, c) x tiles -> (B, S_local)
    return torch.cat(recorder.loss, dim=1), torch.cat(recorder.correct, dim=1)


def local_piece(dims, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, seq_len: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of a whole batch (N, L) that every rank holds: its dp rows and its sp
    columns (parallel/layout.py's SequenceLayout, which pads L to a multiple of sp; padding
    has label -100 and comes after every real token, so causal attention never lets a real
    token see it). Rows are padded with ignored copies of row 0 to a multiple of dp, so every
    dp rank runs the same number of forwards (FSDP2 gathers are collective).

    Returns (input_ids, position_ids, labels, row_index), the first three (N/dp, L'/sp), the
    last (N/dp,) global row numbers, -1 for a padding row. position_ids default to 0..L-1.

    With a ring (`dims.ring > 1`) the attention layer was built for the layout of `seq_len`
    (data.seq_len, parallel/parallelize.py), so rows are padded to that layout: L must be <= seq_len
    (ConfigError otherwise). Without one, any L works.
    """
    n, length = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(length).expand(n, length)  # (L,) -> (N, L)
    ring = getattr(dims, "ring", 1)
    layout = SequenceLayout(seq_len if ring > 1 and seq_len else length, dims.sp, ring)
    if length > layout.padded_len:
        raise ConfigError("eval.passkey_lengths", f"{length} tokens exceed data.seq_len="
                          f"{seq_len}, the length the ring layout (parallel.ring={ring}) was "
                          "built for; raise data.seq_len to the longest eval length")
    rows_per_dp = -(-n // dims.dp)
    pad_rows = rows_per_dp * dims.dp - n
    row_index = torch.cat([torch.arange(n), torch.full((pad_rows,), -1)])
    batch = Batch(  # (N, L) -> (N', L): ignored copies of row 0 fill the last dp rank's share
        input_ids=torch.cat([input_ids, input_ids[:1].expand(pad_rows, length)]),
        labels=torch.cat([labels, torch.full((pad_rows, length), IGNORE_INDEX)]),
        position_ids=torch.cat([position_ids, position_ids[:1].expand(pad_rows, length)]),
        document_ids=torch.zeros(n + pad_rows, length, dtype=torch.int64))
    rows = dp_rows(dims, n + pad_rows)
    (mb,) = shard_batch(batch.slice(rows), dims, layout, rows_per_dp)  # one forward per dp rank
    return mb.input_ids, mb.position_ids, mb.labels, row_index[rows]
