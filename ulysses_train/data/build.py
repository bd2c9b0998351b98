"""Turning a `Corpus` into a cache directory: documents -> tokenizer -> flat token streams.

Steps, each logged with counts and time: (1) read the documents once, spilling each non-empty
one's text into shards on disk (shards.py) and counting, per input, what was skipped; learn
the train/val split from the documents' stable hashes (splits.py); (2) train a tokenizer on a
deterministic sample of the train split, or copy the given one's files (tokenizer.py);
(3) tokenize the shards (sentencepiece and tokenizers encode a batch on all cores; special-token
strings in a document stay text: tokenizer.py), shared with any process that waits for this
build (cache.py); (4) write each split's tokens and document offsets (splits.py). The shards
are deleted; the caller publishes the directory (see cache.py).

Memory does not grow with the corpus: per-document data (hash, size, token count) lives in the
shard files and is read back one shard at a time; what stays in memory is per input (skip
counts) or bounded by a setting (the tokenizer sample, data.tokenizer_sample_bytes); the
transient memory of tokenizing and assembling is per batch / block (shards.py, splits.py).
Measured: docs/benchmarks.md "Token cache builds (issue 23)".
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config.errors import ConfigError
from . import shards
from .cache import TOKENIZER, token_dtype, work_dir
from .corpus import Corpus
from .readers import input_notes
from .shards import (
    ShardWriter,
    help_build,
    shard_index,
    shard_texts,
    tokenize_shards,
    write_plan,
)
from .splits import SplitRule, assemble, assign_val
from .tokenizer import open_tokenizer
from .tokenizer_train import train_tokenizer

__all__ = ["SPLITS", "assign_val", "build_corpus", "help_build"]

SPLITS = ("train", "val")
_SAMPLE_BUCKETS = 1 << 16  # hash buckets of the tokenizer sample's selection


@contextlib.contextmanager
def _quiet_datasets():
    """Silence datasets' progress bars while we build (we log our own progress), and its log
    messages: a file it cannot read is also logged by it, and we report that ourselves as the
    one `error: data.paths: ...` line (docs/architecture.md §2). Both are restored afterwards."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def _train(sample: list[str], vocab_size: int, model_path: str, log) -> str:
    """Train the tokenizer on `sample`, with progress lines; return how it was made."""
    t0 = time.perf_counter()
    mb = sum(len(t) for t in sample) / 1e6
    log(f"data: training a BPE tokenizer (<= {vocab_size} pieces) on {mb:.1f} MB ...")
    pieces = train_tokenizer(sample, vocab_size, model_path, log)
    log(f"data: trained {pieces} pieces in {time.perf_counter() - t0:.1f}s")
    return f"BPE, {pieces} pieces, trained on {mb:.1f} MB"



@dataclass
class _Scan:
    """What reading the corpus once leaves in memory: counts, and the split rule."""

    rule: SplitRule
    n_shards: int = 0
    n_rows: int = 0  # rows generated, placeholders for empty inputs included
    n_bytes: int = 0  # UTF-8 bytes of the documents with text
    bad_files: int = 0
    bad_bytes: int = 0
    rows: Counter = field(default_factory=Counter)  # (input, issue, has text) -> rows


def _scan(corpus: Corpus, work: Path, fraction: float, shard_bytes: int) -> _Scan:
    """Read every row of `corpus`, spilling non-empty documents into shards of `work`."""
    scan, writer = _Scan(SplitRule(fraction)), ShardWriter(work, shard_bytes)
    quiet = _quiet_datasets() if corpus.kind == "hf" else contextlib.nullcontext()
    with quiet:
        for row in corpus.generate(**corpus.gen_kwargs):
            scan.n_rows += 1
            scan.rows[row["source"], row["issue"], row["n_bytes"] > 0] += 1
            if row["bad_bytes"]:
                scan.bad_files += 1
                scan.bad_bytes += row["bad_bytes"]
            if row["n_bytes"]:
                writer.add(row["text"].encode("utf-8"), row["hash"])
                scan.n_bytes += row["n_bytes"]
    scan.n_shards = writer.close()
    for k in range(scan.n_shards):  # the split rule, from the hashes on disk
        scan.rule.add(shard_index(work, k)[0])
    return scan


def _notes(corpus: Corpus, scan: _Scan) -> list[str]:
    """One line per input that was empty or lost rows, e.g. "a.jsonl: 3 of 40 rows without
    'text' (skipped)"; ConfigError naming them all if no document has any text."""
    empty = "empty file" if corpus.kind == "files" else "no rows"
    keys = list(scan.rows)
    notes = input_notes(corpus.inputs, corpus.text_field,
                        np.array([k[0] for k in keys], np.int64),
                        np.array([k[1] for k in keys], object),
                        np.array([k[2] for k in keys], bool), empty,
                        counts=np.array([scan.rows[k] for k in keys], np.int64))
    if scan.rule.n == 0:
        n = len(corpus.inputs)
        what = (f"{n} input{'s' if n > 1 else ''} ({'; '.join(map(': '.join, notes))})"
                if notes else f"{scan.n_rows} {corpus.unit}")
        raise ConfigError(corpus.blame, f"{corpus.label}: no text in {what}; check the inputs "
                          "(and data.text_field)")
    return [f"{name}: {what} (skipped)" for name, what in notes]


def _tokenizer_sample(work: Path, scan: _Scan, budget: int) -> list[str]:
    """Train documents in hash order (deterministic, unbiased by file order), up to `budget`
    bytes; the document that crosses the budget is cut. Two passes over the shard indexes:
    bytes per hash bucket find the bucket where the budget is reached; only the documents up
    to it are then sorted, so memory follows the budget, not the corpus."""
    def train_docs():  # (shard, positions, hashes, sizes, buckets) of each shard's train docs
        first = 0
        for k in range(scan.n_shards):
            hashes, ends = shard_index(work, k)
            sizes = np.diff(ends, prepend=0)
            pos = np.flatnonzero(~scan.rule.is_val(hashes, first))
            first += len(hashes)
            buckets = np.minimum((hashes[pos] * _SAMPLE_BUCKETS).astype(np.int64),
                                 _SAMPLE_BUCKETS - 1)
            yield k, pos, hashes[pos], sizes[pos], buckets

    per_bucket = np.zeros(_SAMPLE_BUCKETS)
    for *_, sizes, buckets in train_docs():
        per_bucket += np.bincount(buckets, weights=sizes, minlength=_SAMPLE_BUCKETS)
    last = min(int(np.searchsorted(np.cumsum(per_bucket), budget)), _SAMPLE_BUCKETS - 1)
    found = [(np.full(len(p), k), p, h, s)  # corpus order, so ties keep it
             for k, pos, hashes, sizes, buckets in train_docs()
             for p, h, s in [(pos[buckets <= last], hashes[buckets <= last],
                              sizes[buckets <= last])]]
    shard, pos, hashes, sizes = (np.concatenate(c) for c in zip(*found))
    order = np.argsort(hashes, kind="stable")
    before = np.cumsum(sizes[order]) - sizes[order]  # bytes taken before each document
    chosen = order[before < budget]
    texts: dict[tuple[int, int], str] = {}
    for k in np.unique(shard[chosen]).tolist():
        mine = pos[chosen][shard[chosen] == k]
        texts.update(zip(((k, int(i)) for i in mine), shard_texts(work, k, mine)))
    sample = [texts[int(shard[i]), int(pos[i])] for i in chosen]
    if sample:
        sample[-1] = sample[-1][:max(1, budget - int(before[len(chosen) - 1]))]
    return sample


def _tokenizer(out: Path, work: Path, scan: _Scan, tokenizer_path: str, vocab_size: int,
               sample_bytes: int, log) -> tuple[str, str]:
    """(model file in `out`, how it was made): the given tokenizer's files, copied under
    their canonical names (tokenizer.py), or one trained on a sample."""
    if tokenizer_path:
        given = open_tokenizer(tokenizer_path)
        for name, path in given.files.items():
            shutil.copyfile(path, out / name)
        return str(out / given.model_name), f"given {tokenizer_path}"
    model_path = str(out / TOKENIZER)
    return model_path, _train(_tokenizer_sample(work, scan, sample_bytes), vocab_size,
                              model_path, log)


def build_corpus(out: Path, corpus: Corpus, *, key: str, vocab_size: int, tokenizer_path: str,
                 sample_bytes: int, val_fraction: float, log: Callable[[str], None],
                 shard_bytes: int = 0, stats: dict | None = None) -> dict:
    """Fill the empty directory `out` with the tokenized corpus; return its meta (see cache.py).

    Shards go to `work_dir(out)` (created if missing, removed at the end), where processes
    waiting for this build help tokenize them (shards.help_build). `shard_bytes`: text per
    shard. `stats`, if given, receives the phases' seconds and sizes (scripts/bench_cache_build).
    `key` names the build in logs only (the cache directory's name carries it)."""
    work = work_dir(out)
    work.mkdir(exist_ok=True)
    try:
        return _build(out, work, corpus, vocab_size, tokenizer_path, sample_bytes, val_fraction,
                      log, shard_bytes or shards.SHARD_BYTES,
                      stats if stats is not None else {})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(out, work, corpus, vocab_size, tokenizer_path, sample_bytes, val_fraction, log,
           shard_bytes, stats) -> dict:
    t0 = time.perf_counter()
    log(f"data: building the {corpus.label} token cache in {out.parent} ...")
    scan = _scan(corpus, work, val_fraction, shard_bytes)
    notes = _notes(corpus, scan)
    n_read = sum(n for (_, issue, _), n in scan.rows.items() if issue == "")
    stats.update(read_seconds=time.perf_counter() - t0, documents=scan.rule.n,
                 text_bytes=scan.n_bytes, shards=scan.n_shards)
    log(f"data: read {n_read} {corpus.unit} ({scan.n_bytes / 1e6:.1f} MB, "
        f"{scan.rule.n_val} for validation) in {stats['read_seconds']:.1f}s")
    model_path, how = _tokenizer(out, work, scan, tokenizer_path, vocab_size, sample_bytes, log)
    tok = open_tokenizer(model_path)
    dtype = token_dtype(tok.vocab_size)

    t0 = time.perf_counter()
    log(f"data: tokenizing {scan.rule.n} documents ...")
    write_plan(work, model_path, scan.n_shards, dtype)  # from here on, waiting processes help
    done = tokenize_shards(work, model_path, scan.n_shards, dtype, wait=True)
    others = sorted({pid for pid in done.values() if pid != os.getpid()})
    if others:
        n = sum(pid != os.getpid() for pid in done.values())
        log(f"data: {n} of {scan.n_shards} shards tokenized by other processes "
            f"(pids {', '.join(map(str, others))})")
    stats.update(tokenize_seconds=time.perf_counter() - t0, shards_by_others=len(others))
    t1 = time.perf_counter()
    n_tokens = assemble(work, scan.n_shards, scan.rule, out, dtype=dtype, eos=tok.eos_id,
                        bos=tok.bos_id if tok.add_bos else None)
    stats.update(assemble_seconds=time.perf_counter() - t1, tokens=sum(n_tokens.values()))
    log(f"data: {n_tokens['train'] / 1e6:.2f}M train / {n_tokens['val'] / 1e6:.2f}M val "
        f"tokens in {time.perf_counter() - t0:.1f}s")
    return {"kind": corpus.kind, "label": corpus.label, "unit": corpus.unit,
            "n_inputs": n_read, "warnings": notes,
            "n_docs": {"train": scan.rule.n - scan.rule.n_val, "val": scan.rule.n_val},
            "n_tokens": n_tokens, "bad_files": scan.bad_files, "bad_bytes": scan.bad_bytes,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": dtype.name,
            "tokenizer": how, "tokenizer_files": sorted(tok.files), "bos_id": tok.bos_id,
            "add_bos": tok.add_bos}

