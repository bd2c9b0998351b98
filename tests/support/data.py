"""Shared helpers of the data tests (a plain module: a second `conftest` would clash by name)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from ulysses_train.config.schema import DataConfig
from ulysses_train.data import build_data

VOCAB = 1024  # model vocab for corpus tests: small, so tokenizers train in a blink


def small_stdlib(cache_dir, **overrides) -> DataConfig:
    """30 stdlib files, 64-token sequences, a 200 kB tokenizer sample."""
    values = dict(name="stdlib", seq_len=64, max_docs=30, val_fraction=0.2,
                  tokenizer_sample_bytes=200_000, cache_dir=str(cache_dir))
    values.update(overrides)
    return DataConfig(**values)


def build(cfg: DataConfig, seed: int = 0, batch: int = 6, vocab: int = VOCAB, log=None):
    """build_data with test defaults; `log` collects lines if it is a list."""
    sink = log.append if isinstance(log, list) else (lambda _: None)
    return build_data(cfg, seed=seed, global_batch_size=batch, model_vocab_size=vocab, log=sink)


LINES = [f"Document number {i} talks about {'cats' if i % 2 else 'dogs'} and numbers {i * 7}."
         for i in range(40)]


def files_cfg(tmp_path, paths, **overrides) -> DataConfig:
    values = dict(name="files", paths=[str(p) for p in paths], seq_len=16, val_fraction=0.1,
                  cache_dir=str(tmp_path / "cache"))
    return DataConfig(**{**values, **overrides})


def write_inputs(tmp_path):
    txt = tmp_path / "story.txt"
    txt.write_bytes("A whole file is one document.\nIt has two lines, and a bad byte: ".encode()
                    + b"\xff\xfe.\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(LINES)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": [t.upper() for t in LINES]}), parquet)
    return txt, jsonl, parquet
