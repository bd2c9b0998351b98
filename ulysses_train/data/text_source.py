"""Text corpora (data.name = stdlib | files | hf): their token cache, tokenizer and streams.

`text_cache` builds (once, under a lock: cache.py) or reuses the cache of one corpus with a
given or newly trained tokenizer; `text_source` turns it into a `DataSource`. A mixture's text
sources (data/mixed.py) use the same cache, one per source.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..config.errors import ConfigError
from ..config.schema import DataConfig
from .build import SPLITS, build_corpus, help_build
from .cache import cache_key, load_split, open_or_build, tokenizer_files
from .corpus import corpus_for
from .datasource import DataSource
from .packing import PackedTokens
from .tokenizer import KEY as TOKENIZER_KEY
from .tokenizer import TEXT_ENCODING, Tokenizer, open_tokenizer, tokenizer_identity
from .tokenizer_files import locate
from .tokenizer_train import TRAINER_SETTINGS


def count_str(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def summary(meta: dict) -> str:
    """One line, e.g. 'stdlib: 1790 files (3 with non-UTF-8 bytes, 41 bytes replaced), ...'."""
    bad = ""
    if meta["bad_files"]:
        bad = f" ({meta['bad_files']} with non-UTF-8 bytes, {meta['bad_bytes']} bytes replaced)"
    docs = meta["n_docs"]
    return (f"{meta['label']}: {meta['n_inputs']} {meta['unit']}{bad}, "
            f"{count_str(meta['n_tokens']['train'])} train / {count_str(meta['n_tokens']['val'])} "
            f"val tokens in {docs['train']} / {docs['val']} documents, vocab {meta['vocab_size']}")


def cache_root(cfg: DataConfig) -> Path:
    """`data.cache_dir`, created; ConfigError when it cannot be created or written."""
    root = Path(os.path.expanduser(cfg.cache_dir))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("data.cache_dir", f"cannot create {root}: {e}; pick a writable "
                          "directory") from None
    if not os.access(root, os.W_OK):
        raise ConfigError("data.cache_dir", f"{root} is not writable; pick another directory")
    return root


def given_tokenizer(cfg: DataConfig, init_from: str, limit: int, log) -> Tokenizer | None:
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


def text_cache(cfg: DataConfig, given: Tokenizer | None, limit: int, *, log,
               is_main: bool) -> tuple[Path, dict]:
    """(directory, meta) of the token cache of the text corpus `cfg` describes (data.name in
    stdlib | files | hf), building it once under a lock (cache.py) with the `given` tokenizer,
    or one trained on the corpus with at most `limit` ids. Raises ConfigError for bad input."""
    corpus = corpus_for(cfg)
    if given is not None:
        # TEXT_ENCODING: a cache made when special-token strings in text became control ids
        # has another key. Ours needs none: it has no special piece that text could match.
        tokenizer = {"given_sha256": given.identity(), "text": TEXT_ENCODING}
    else:
        tokenizer = {"settings": TRAINER_SETTINGS, "vocab_size": limit,
                     "sample_bytes": cfg.tokenizer_sample_bytes}
    key = cache_key({"kind": corpus.kind, "inputs": corpus.fingerprint, "tokenizer": tokenizer,
                     "max_docs": cfg.max_docs, "val_fraction": cfg.val_fraction})
    root = cache_root(cfg)

    def build(tmp: Path) -> dict:
        return build_corpus(tmp, corpus, key=key, vocab_size=limit,
                            tokenizer_path=given.path if given else "",
                            sample_bytes=cfg.tokenizer_sample_bytes,
                            val_fraction=cfg.val_fraction, log=log)

    path, meta, built = open_or_build(root, f"{corpus.kind}-{key}", build, log=log,
                                      is_main=is_main, help=help_build)
    log(f"data: built {path} in {meta['build_seconds']}s" if built else f"data: cached {path}")
    for note in meta["warnings"]:  # inputs skipped in part, e.g. rows without the text field
        log(f"warning: data: {note}")
    return path, meta




def load_text_splits(path: Path, meta: dict, cfg: DataConfig):
    """Yield (split, tokens memmap, document offsets) of a text cache: train, then val unless
    data.val_fraction is 0. Raises ConfigError when validation would be empty."""
    for split in SPLITS:
        if split == "val" and cfg.val_fraction == 0:
            continue
        if meta["n_tokens"][split] == 0:  # only val can be empty: train always keeps a document
            raise ConfigError("data.val_fraction", f"no document is left for validation (the "
                              f"split is by document and the corpus has {meta['n_docs']['train']}"
                              "); add documents or set data.val_fraction=0")
        ids, offsets = load_split(path, meta, split)
        yield split, ids, offsets


def offsets_digest(offsets: np.ndarray) -> str:
    """sha256 of document offsets as int64: the identity of a stream's document layout."""
    return hashlib.sha256(np.ascontiguousarray(offsets, np.int64)).hexdigest()


def cache_tokenizer_identity(path: Path, meta: dict) -> str:
    """The identity of the tokenizer whose files a cache holds (tokenizer.py)."""
    return tokenizer_identity({n: str(path / n) for n in tokenizer_files(meta)})


def text_source(cfg: DataConfig, *, seed: int, global_batch_size: int, given: Tokenizer | None,
                limit: int, log, is_main: bool) -> DataSource:
    """The DataSource of one text corpus: its cache's splits, packed (PackedTokens)."""
    path, meta = text_cache(cfg, given, limit, log=log, is_main=is_main)
    streams, tokens = {}, {}
    for split, ids, offsets in load_text_splits(path, meta, cfg):
        streams[split] = PackedTokens(ids, offsets, cfg.seq_len, seed=seed, split=split)
        tokens[split] = [int(meta["n_docs"][split]), int(meta["n_tokens"][split]),
                         offsets_digest(offsets)]
    identity = {"data.tokenizer": cache_tokenizer_identity(path, meta),
                "data.tokens": tokens, "data.cache": path.name}
    return DataSource(streams, vocab_size=meta["vocab_size"], eos_id=meta["eos_id"],
                      global_batch_size=global_batch_size, summary=summary(meta),
                      cache_path=path, document_positions=cfg.document_mask, identity=identity,
                      bos_id=meta.get("bos_id") if meta.get("add_bos") else None,
                      tokenizer_files=tokenizer_files(meta))
