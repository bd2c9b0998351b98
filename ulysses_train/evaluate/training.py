"""`eval.every=N` in training: the held-out loss by position, logged with the step's row.

The trainer calls `due` in its report and merges `row_of(...)` into the metrics row: one
key per bucket, `loss_by_position/<start>-<end>` (nats per token), so metrics.jsonl stays one
flat row per step and wandb plots each bucket as its own curve.
"""
from __future__ import annotations

from .loss_by_position import bucket_edges, loss_by_position
from .suite import autocast_for, held_out_micro_batches


def due(eval_cfg, step: int, last: bool) -> bool:
    """True at every eval.every-th step and at the last one (when eval.every > 0)."""
    return eval_cfg.every > 0 and (step % eval_cfg.every == 0 or last)


def row_of(model, cfg, dims, data, dtype) -> dict:
    """{"loss_by_position/<start>-<end>": loss} of `model` over eval.batches validation global
    batches, sharded and micro-batched exactly as the trainer's own validation
    (suite.held_out_micro_batches). Collective: every rank calls it at the same step."""
    edges = bucket_edges(cfg.data.seq_len, cfg.eval.buckets)
    batches = held_out_micro_batches(cfg, dims, data, model)
    rows = loss_by_position(model, dims, batches, edges, autocast_for(dtype, dims.device))
    return {f"loss_by_position/{r['start']}-{r['end']}": r["loss"] for r in rows}
