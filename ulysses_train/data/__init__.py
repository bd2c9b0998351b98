"""The data package: corpora, tokenizer, token cache, packing and global batches.

The trainer needs only `build_data(...)` and `Batch`:

    source = build_data(cfg.data, seed=..., global_batch_size=..., model_vocab_size=...)
    batch = source.global_batch(step, "train", rows=slice(lo, hi))   # this rank's rows

Global batches are a pure function of (seed, step, split) — see source.py. Heavy dependencies
(datasets, sentencepiece, filelock) are imported only inside the functions that build caches, so
importing this package costs little more than torch and numpy.
"""
from .batch import IGNORE_INDEX, Batch
from .datasource import DataSource
from .packing import PackedTokens
from .source import build_data

__all__ = ["Batch", "DataSource", "IGNORE_INDEX", "PackedTokens", "build_data"]
