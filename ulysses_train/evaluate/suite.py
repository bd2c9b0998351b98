"""The whole evaluation of one model: which held-out batches, which tokenizer, which lengths.

Held-out text = the data pipeline's validation split (the batches `trainer.evaluate` reads:
global batches 0, 1, ... of "val"). The passkey prompts are tokenized with the run's tokenizer:
the word vocabulary of `data=passkey` (also used with `data=synthetic`, whose ids mean nothing),
else the sentencepiece model of the token cache.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import torch

from ..config.errors import ConfigError
from ..config.schema import Config
from ..model.precision import autocast_to
from ..parallel.batching import step_micro_batches
from .loss_by_position import bucket_edges, loss_by_position
from .passkey import passkey_accuracy


class _RunTokenizer:
    """`encode(text) -> ids` (no special tokens) of the tokenizer the run's data was packed
    with (data/tokenizer.py), and `bos_id` when documents were packed after a BOS: a prompt
    then starts with it too, as every training document did."""

    def __init__(self, path: str, bos_id: int | None):
        from ..data.tokenizer import open_tokenizer

        self.tok, self.bos_id = open_tokenizer(path), bos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode_batch([text])[0]


def run_tokenizer(cfg: Config, data):
    """The tokenizer the run's data was made with, or None if unknown (e.g. data=hf streamed
    without a cache)."""
    from ..data.passkey import WordTokenizer
    from ..data.tokenizer_files import MODEL_FILES

    if cfg.data.name in ("passkey", "synthetic"):
        return WordTokenizer()
    cache, files = getattr(data, "cache_path", None), getattr(data, "tokenizer_files", [])
    model = next((n for n in files if n in MODEL_FILES), None)
    if cache is None or model is None:
        return None
    return _RunTokenizer(os.path.join(cache, model), getattr(data, "bos_id", None))


def passkey_lengths(cfg: Config, tok) -> list[int]:
    """eval.passkey_lengths, or seq_len/4, seq_len/2, seq_len (those long enough for a prompt).
    ConfigError for an explicit length shorter than the prompt itself."""
    from ..data.passkey import min_length

    shortest, seq = min_length(tok), cfg.data.seq_len
    if cfg.eval.passkey_lengths:
        too_short = [n for n in cfg.eval.passkey_lengths if n < shortest]
        if too_short:
            raise ConfigError("eval.passkey_lengths", f"{too_short} shorter than the prompt "
                              f"({shortest} tokens with this tokenizer); use longer lengths")
        return [int(n) for n in cfg.eval.passkey_lengths]
    return sorted({n for n in (seq // 4, seq // 2, seq) if n >= shortest})


def held_out_micro_batches(cfg: Config, dims, data, model) -> Iterator[tuple]:
    """This rank's (input_ids, position_ids, labels, mask) of `eval.batches` validation global
    batches: its dp rows, sharded by parallel/batching.py exactly as the trainer shards them, on
    `model`'s device, with `model`'s document mask when `data.document_mask`."""
    layout = dims.sequence_layout(cfg.data.seq_len)
    for i in range(cfg.eval.batches):
        yield from step_micro_batches(data, i, "val", dims, layout, cfg.train.global_batch_size,
                                      cfg.train.micro_batch_size, model, cfg.data.document_mask)


def autocast_for(dtype: torch.dtype, device: torch.device) -> Callable:
    """A context factory: model/precision.py's autocast_to(dtype, device) for each forward."""
    return lambda: autocast_to(dtype, device)


def evaluate_model(model, cfg: Config, dims, data, dtype: torch.dtype,
                   log: Callable[[str], None] = lambda _: None) -> dict:
    """{"loss_by_position": rows, "passkey": rows} of `model` (collective: every rank calls it).

    passkey is [] when eval.passkey_trials is 0 or the run's tokenizer is unknown (logged).
    """
    device = next(iter(model.parameters())).device
    autocast = autocast_for(dtype, device)
    edges = bucket_edges(cfg.data.seq_len, cfg.eval.buckets)
    log(f"eval: loss by position over {cfg.eval.batches} held-out batches ...")
    by_position = loss_by_position(model, dims, held_out_micro_batches(cfg, dims, data, model),
                                   edges, autocast)
    for row in by_position:
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        log(f"eval: positions [{row['start']}, {row['end']}): loss {loss} ({row['tokens']} tokens)")
    passkey: list[dict] = []
    tok, lengths = passkey_plan(cfg, dims, data, log)
    if lengths:
        passkey = passkey_accuracy(model, dims, tok, lengths,
                                   cfg.eval.passkey_depths, cfg.eval.passkey_trials,
                                   cfg.train.micro_batch_size, seed=cfg.train.seed,
                                   seq_len=cfg.data.seq_len, autocast=autocast, log=log)
    return {"loss_by_position": by_position, "passkey": passkey}


def passkey_plan(cfg: Config, dims, data, log: Callable[[str], None] = lambda _: None
                 ) -> tuple[object, list[int]]:
    """(tokenizer, lengths) of the passkey task, or (None, []) when it is skipped (said in a log
    line: off, no known tokenizer, or every default length shorter than the prompt). Cheap and
    collective-free: scripts/eval.py calls it before loading any weights, so bad lengths fail
    first. Raises ConfigError(eval.passkey_lengths) for a length shorter than the prompt, or
    longer than data.seq_len's layout under a ring (tokens.local_piece)."""
    from ..data.passkey import min_length
    from ..parallel.layout import SequenceLayout

    if not cfg.eval.passkey_trials:
        return None, []
    tok = run_tokenizer(cfg, data)
    if tok is None:
        log("eval: passkey skipped: the run's tokenizer is unknown")
        return None, []
    lengths = passkey_lengths(cfg, tok)
    if not lengths:
        log(f"eval: passkey skipped: its prompt needs {min_length(tok)} tokens, more than "
            f"data.seq_len={cfg.data.seq_len}; set eval.passkey_lengths or a longer data.seq_len")
    ring = getattr(dims, "ring", 1)
    limit = SequenceLayout(cfg.data.seq_len, dims.sp, ring).padded_len
    too_long = [n for n in lengths if ring > 1 and n > limit]
    if too_long:
        raise ConfigError("eval.passkey_lengths", f"{too_long} exceed data.seq_len="
                          f"{cfg.data.seq_len}, the length the ring layout (parallel.ring="
                          f"{ring}) is built for; raise data.seq_len to the longest eval length")
    return tok, lengths
