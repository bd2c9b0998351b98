"""`DataSource`: global batches as a pure function of (seed, step, split).

Row r of step t is global sample g = t * global_batch_size + r, and each split's stream maps g
to a sequence without reference to any other row. So the data never depends on the number of
processes or on micro-batching, resuming at step t needs no state but t, and a data-parallel
rank materializes only its own rows (`rows=`), which equal the same rows of the full batch.
With `data.document_mask` positions restart at each document, computed here on whole rows.
A mixture (data/mixed.py) also serves each source alone (`for_source`) and says how many
samples (hence tokens) each source gave (`source_samples`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Protocol, Sequence

from ..config.errors import ConfigError
from .batch import Batch
from .build import SPLITS
from .tokenizer import MODEL_FILES, open_tokenizer
from .tokenizer_files import save_run_tokenizer


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
        # A mixture's sources (data/mixed.py): name -> {split: that source's own stream}.
        self.sources: dict[str, dict[str, TokenStream]] = {}
        self.tokenizer = None  # the given tokenizer when no cache holds a copy of it

    def describe(self) -> str:
        return self._summary

    def save_tokenizer(self, out: str) -> bool:
        """Copy the tokenizer these tokens were made with into the folder `out` (one rank
        only; tokenizer_files.py); False if it already holds it or the data is synthetic."""
        if self.tokenizer is not None:  # a mixture of pre-tokenized sources only
            return save_run_tokenizer(self.tokenizer, out)
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

    def for_source(self, name: str) -> DataSource:
        """This mixture's source `name` alone: its own streams (global sample g = that
        source's sample g), e.g. for validation loss per source. KeyError for an unknown name."""
        alone = copy.copy(self)
        alone.streams = self.sources[name]
        alone.splits = tuple(alone.streams)
        alone.sources = {}
        return alone

    def source_samples(self, steps: int, split: str = "train") -> dict[str, int]:
        """How many of the first `steps` global batches' rows each source served (a mixture;
        {} otherwise). Each row is data.seq_len tokens, so these are the token shares."""
        mixture = self.streams.get(split)
        if not self.sources or mixture is None:
            return {}
        counts = mixture.samples_before(steps * self.global_batch_size)
        return dict(zip(self.sources, (int(c) for c in counts)))
