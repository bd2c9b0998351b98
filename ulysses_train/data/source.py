"""`build_data` and `DataSource`: the data package's whole interface to the trainer.

A DataSource serves global batches as a pure function of (seed, step, split): row r of step t
is global sample g = t * global_batch_size + r, and each split's stream maps g to a sequence
without reference to any other row. So the data never depends on the number of processes or on
micro-batching, resuming at step t needs no state but t, and a data-parallel rank materializes
only its own rows (`rows=`), which equal the same rows of the full batch. With
`data.document_mask` positions restart at each document, computed here on whole rows.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from ..config.errors import ConfigError
from ..config.schema import DataConfig
from .batch import Batch
from .build import SPLITS, build_corpus
from .cache import cache_key, load_split, open_or_build, tokenizer_files
from .corpus import corpus_for
from .packing import PackedTokens
from .passkey import PasskeyTokens, WordTokenizer, min_length
from .synthetic import EOS_ID, SyntheticTokens
from .tokenizer import KEY as TOKENIZER_KEY
from .tokenizer import (
    MODEL_FILES,
    TEXT_ENCODING,
    Tokenizer,
    open_tokenizer,
    tokenizer_identity,
)
from .tokenizer_files import init_from_dirs, locate, model_in, save_run_tokenizer
from .tokenizer_train import TRAINER_SETTINGS


class TokenStream(Protocol):
    """One split: turns global sample indices into batch rows (PackedTokens, SyntheticTokens)."""

    def batch(self, sample_indices: Sequence[int]) -> Batch: ...


class DataSource:
    """Global batches of one data configuration; see the module docstring for the invariants."""

    def __init__(self, streams: dict[str, TokenStream], *, vocab_size: int, eos_id: int,
                 global_batch_size: int, summary: str, cache_path: Path | None = None,
                 document_positions: bool = False, identity: dict | None = None,
                 bos_id: int | None = None, tokenizer_files: Sequence[str] = ()):
        self.streams = streams
        # What the tokens are, for checkpoints' data identity (checkpoint/identity.py): the tokenizer's
        # sha256 (tokenizer.py, tokenizer_identity), per split [documents, tokens, sha256 of
        # the document offsets], and the cache's name. Empty for synthetic data (a function of
        # the config alone).
        self.identity = identity or {}
        # data.document_mask: positions restart at each document (the mask's other half).
        self.document_positions = document_positions
        self.vocab_size = vocab_size  # ids produced are in [0, vocab_size)
        self.eos_id = eos_id
        self.bos_id = bos_id  # written before each document when not None
        self.global_batch_size = global_batch_size
        self.splits = tuple(streams)
        self.cache_path = cache_path  # None for synthetic data
        self.tokenizer_files = list(tokenizer_files)  # the tokenizer's files in cache_path
        self._summary = summary

    def describe(self) -> str:
        return self._summary

    def save_tokenizer(self, out: str) -> bool:
        """Copy the tokenizer these tokens were made with into the folder `out` (one rank
        only; tokenizer_files.py); False if it already holds it or the data is synthetic."""
        if self.cache_path is None:
            return False
        model = next(n for n in self.tokenizer_files if n in MODEL_FILES)
        return save_run_tokenizer(open_tokenizer(str(self.cache_path / model)), out)

    def global_batch(self, step: int, split: str = "train", rows: slice | None = None) -> Batch:
        """Rows `rows` (default: all) of global batch `step` of `split`, shape (len(rows), S)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self.streams:
            raise ConfigError("data.val_fraction", "is 0, so there is no validation split; "
                              "set data.val_fraction > 0 or turn validation off")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        wanted = range(*(rows or slice(None)).indices(self.global_batch_size))
        first = step * self.global_batch_size
        batch = self.streams[split].batch([first + r for r in wanted])
        return batch.with_document_positions() if self.document_positions else batch


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


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _summary(meta: dict) -> str:
    """One line, e.g. 'stdlib: 1790 files (3 with non-UTF-8 bytes, 41 bytes replaced), ...'."""
    bad = ""
    if meta["bad_files"]:
        bad = f" ({meta['bad_files']} with non-UTF-8 bytes, {meta['bad_bytes']} bytes replaced)"
    docs = meta["n_docs"]
    return (f"{meta['label']}: {meta['n_inputs']} {meta['unit']}{bad}, "
            f"{_count(meta['n_tokens']['train'])} train / {_count(meta['n_tokens']['val'])} "
            f"val tokens in {docs['train']} / {docs['val']} documents, vocab {meta['vocab_size']}")


def _cache_root(cfg: DataConfig) -> Path:
    root = Path(os.path.expanduser(cfg.cache_dir))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("data.cache_dir", f"cannot create {root}: {e}; pick a writable "
                          "directory") from None
    if not os.access(root, os.W_OK):
        raise ConfigError("data.cache_dir", f"{root} is not writable; pick another directory")
    return root


def _given_tokenizer(cfg: DataConfig, init_from: str, limit: int, log) -> Tokenizer | None:
    """The tokenizer `data.tokenizer_path` (or `model.init_from`) names, checked before any
    heavy work; None: train one. Raises ConfigError(data.tokenizer_path)."""
    path = locate(cfg.tokenizer_path, init_from, log)
    if not path:
        return None
    tok = open_tokenizer(path)
    if tok.stream_ids > limit:  # ids only a special token has never reach the model
        used = "" if tok.stream_ids == tok.vocab_size else \
            f" (text and BOS/EOS give ids up to {tok.stream_ids - 1})"
        raise ConfigError(TOKENIZER_KEY, f"{path} has {tok.vocab_size} ids{used} but "
                          f"model.vocab_size is {limit}, so some token ids would have no "
                          "embedding row; raise model.vocab_size or use another tokenizer")
    log(f"data: tokenizer {path}: {tok.describe()}")
    return tok


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
    if cfg.name in ("synthetic", "passkey"):
        if init_from and any(model_in(d) for d in init_from_dirs(os.path.expanduser(init_from))):
            log(f"warning: data={cfg.name} uses its own token ids, not the tokenizer of "
                f"model.init_from={init_from}: fine for a model trained on data={cfg.name}, "
                "meaningless for one pretrained on text")
        make = _synthetic if cfg.name == "synthetic" else _passkey
        return make(cfg, seed, global_batch_size, model_vocab_size)
    corpus = corpus_for(cfg)
    limit = max_tokenizer_vocab or model_vocab_size
    given = _given_tokenizer(cfg, init_from, limit, log)
    if given is not None:
        # TEXT_ENCODING: a cache made when special-token strings in text became control ids
        # has another key. Ours needs none: it has no special piece that text could match.
        tokenizer = {"given_sha256": given.identity(), "text": TEXT_ENCODING}
    else:
        tokenizer = {"settings": TRAINER_SETTINGS, "vocab_size": limit,
                     "sample_bytes": cfg.tokenizer_sample_bytes}
    key = cache_key({"kind": corpus.kind, "inputs": corpus.fingerprint, "tokenizer": tokenizer,
                     "max_docs": cfg.max_docs, "val_fraction": cfg.val_fraction})
    root = _cache_root(cfg)

    def build(tmp: Path) -> dict:
        return build_corpus(tmp, corpus, key=key, vocab_size=limit,
                            tokenizer_path=given.path if given else "",
                            sample_bytes=cfg.tokenizer_sample_bytes,
                            val_fraction=cfg.val_fraction, log=log)

    path, meta, built = open_or_build(root, f"{corpus.kind}-{key}", build, log=log,
                                      is_main=is_main)
    log(f"data: built {path} in {meta['build_seconds']}s" if built else f"data: cached {path}")
    for note in meta["warnings"]:  # inputs skipped in part, e.g. rows without the text field
        log(f"warning: data: {note}")
    streams, tokens = {}, {}
    for split in SPLITS:
        if split == "val" and cfg.val_fraction == 0:
            continue
        if meta["n_tokens"][split] == 0:  # only val can be empty: train always keeps a document
            raise ConfigError("data.val_fraction", f"no document is left for validation (the "
                              f"split is by document and the corpus has {meta['n_docs']['train']}"
                              "); add documents or set data.val_fraction=0")
        ids, offsets = load_split(path, meta, split)
        streams[split] = PackedTokens(ids, offsets, cfg.seq_len, seed=seed, split=split)
        tokens[split] = [int(meta["n_docs"][split]), int(meta["n_tokens"][split]),
                         hashlib.sha256(np.ascontiguousarray(offsets, np.int64)).hexdigest()]
    names = tokenizer_files(meta)
    identity = {"data.tokenizer": tokenizer_identity({n: str(path / n) for n in names}),
                "data.tokens": tokens, "data.cache": path.name}
    return DataSource(streams, vocab_size=meta["vocab_size"], eos_id=meta["eos_id"],
                      global_batch_size=global_batch_size, summary=_summary(meta),
                      cache_path=path, document_positions=cfg.document_mask, identity=identity,
                      bos_id=meta.get("bos_id") if meta.get("add_bos") else None,
                      tokenizer_files=names)
