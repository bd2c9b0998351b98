"""Shared helpers of the data tests (a plain module: a second `conftest` would clash by name)."""
from __future__ import annotations

from ulysses_train.config import DataConfig
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
