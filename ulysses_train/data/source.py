"""`build_data`: the data package's whole interface to the trainer.

It returns a `DataSource` (datasource.py: global batches as a pure function of seed, step and
split) for synthetic tokens, passkey prompts, one text corpus (text_source.py) or a weighted
mixture of sources (mixed.py).
"""
from __future__ import annotations

import os
from typing import Callable

from ..config.errors import ConfigError
from ..config.schema import DataConfig
from .build import SPLITS
from .datasource import DataSource
from .mixed import build_mixture
from .passkey import PasskeyTokens, WordTokenizer, min_length
from .synthetic import EOS_ID, SyntheticTokens
from .text_source import given_tokenizer, text_source
from .tokenizer_files import init_from_dirs, model_in


def _silent(_: str) -> None:
    pass


def _synthetic(cfg: DataConfig, seed: int, global_batch_size: int, vocab: int) -> DataSource:
    streams = {s: SyntheticTokens(vocab, cfg.seq_len, seed=seed, split=s) for s in SPLITS}
    return DataSource(streams, vocab_size=vocab, eos_id=EOS_ID,
                      global_batch_size=global_batch_size, summary=streams["train"].describe(),
                      document_positions=cfg.document_mask)


def _passkey(cfg: DataConfig, seed: int, global_batch_size: int, vocab: int) -> DataSource:
    words = WordTokenizer()
    if len(words) > vocab:
        raise ConfigError("model.vocab_size", f"data=passkey needs {len(words)} ids, the model "
                          f"has {vocab}; raise model.vocab_size")
    if cfg.seq_len < min_length(words):
        raise ConfigError("data.seq_len", f"{cfg.seq_len} is too short for a passkey prompt; "
                          f"use at least {min_length(words)}")
    streams = {s: PasskeyTokens(cfg.seq_len, seed=seed, split=s) for s in SPLITS}
    return DataSource(streams, vocab_size=len(words), eos_id=words.eos_id,
                      global_batch_size=global_batch_size, summary=streams["train"].describe(),
                      document_positions=cfg.document_mask)


def build_data(cfg: DataConfig, *, seed: int, global_batch_size: int, model_vocab_size: int,
               log: Callable[[str], None] = print, is_main: bool = True, init_from: str = "",
               max_tokenizer_vocab: int = 0) -> DataSource:
    """The DataSource for `cfg`, building (once, under a lock) or reusing its token cache.

    `model_vocab_size`: the model's real vocabulary, `model.vocab_size` (not its padded row
    count: the padding columns' logits are -inf, model/vocab.py, so a padded id must never be a
    target); synthetic tokens are drawn below it. `max_tokenizer_vocab` (default:
    `model_vocab_size`): the most ids a tokenizer may have, the model's unpadded
    `model.vocab_size` (padding rows are dropped on export). `init_from`:
    `model.init_from`, whose tokenizer files are the default (tokenizer_files.py).
    Every process of a job may call this at the same time: one builds, the others wait and read
    the same files. Only `is_main` logs. Bad input raises `ConfigError` naming the key.
    """
    if global_batch_size < 1:
        raise ConfigError("train.global_batch_size", f"must be positive, got {global_batch_size}")
    if cfg.seq_len < 1:
        raise ConfigError("data.seq_len", f"must be positive, got {cfg.seq_len}")
    log = log if is_main else _silent
    if cfg.name in ("synthetic", "passkey") and not cfg.sources:
        if init_from and any(model_in(d) for d in init_from_dirs(os.path.expanduser(init_from))):
            log(f"warning: data={cfg.name} uses its own token ids, not the tokenizer of "
                f"model.init_from={init_from}: fine for a model trained on data={cfg.name}, "
                "meaningless for one pretrained on text")
        make = _synthetic if cfg.name == "synthetic" else _passkey
        return make(cfg, seed, global_batch_size, model_vocab_size)
    limit = max_tokenizer_vocab or model_vocab_size
    given = given_tokenizer(cfg, init_from, limit, log)
    make = build_mixture if cfg.sources else text_source  # a weighted mixture: data/mixed.py
    return make(cfg, seed=seed, global_batch_size=global_batch_size, given=given, limit=limit,
                log=log, is_main=is_main)
