"""Document shards of a cache build: text spilled once, tokenized by any process of the node.

The build (build.py) reads the corpus once and spills each non-empty document's UTF-8 text
into shards of at most `SHARD_BYTES` bytes / `SHARD_DOCS` documents, in corpus order:
`shard-K.txt` (the texts back to back) and `shard-K.idx.npy` (per document its split hash,
float64, then its end offset in the text, int64: an (n, 2) float64 array would lose offsets
over 2**53, so two arrays, saved one after the other). So per-document data lives on disk, not
in the builder's memory, and the tokenizing pass reads plain text instead of re-parsing inputs.

Tokenizing shard K writes `shard-K.bin` (its documents' ids back to back, the cache's dtype,
no BOS/EOS) and `shard-K.len.npy` (ids per document), then, atomically, the marker
`shard-K.done` (JSON: the pid that did it), which alone says the shard is done. A process claims
a shard with a `FileLock` of its own (`timeout=0`) and only the holder writes its files; the OS
releases the lock if the holder dies, and a shard without its marker is simply done again
(its files rewritten from the start). `plan.json` (the tokenizer's model file, the shard count, the dtype) is
written once the tokenizer exists: from then on processes waiting for the build (cache.py,
`help`) tokenize shards too; the builder takes the rest, waits for the ones others hold, and
assembles the split files from the shards in order.

Encoding overlaps the conversion of ids to numpy: the tokenizer encodes batch k+1 (sentencepiece
and tokenizers release the GIL) while this thread converts and writes batch k.

Memory (issue 23): nothing here grows with the corpus. A shard's text is memory-mapped (page
cache, not anonymous memory) and copied out one encode batch at a time; a batch (BATCH_BYTES of
text) bounds the ids held as Python lists (~36 bytes per token: two batches in flight);
the spill index is 16 bytes per document of the open shard; and after each shard glibc's free
heap pages are given back (`release_free_memory`): without that, they stayed resident and the
peak crept up shard after shard (docs/benchmarks.md, "Token cache builds").
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import mmap
import os
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_write
from .tokenizer import open_tokenizer

SHARD_BYTES = 16 << 20  # text per shard: the unit of work a process claims
SHARD_DOCS = 1 << 16  # documents per shard at most (bounds the per-shard index in memory)
BATCH_BYTES = 1 << 18  # text per encode call: bounds the ids held as Python lists
# (1 MB batches held ~14 MB of them; 256 kB keeps the rate: docs/benchmarks.md)
BATCH_DOCS = 4096
PLAN = "plan.json"


def _name(k: int, suffix: str) -> str:
    return f"shard-{k:06d}{suffix}"


def threads() -> int:
    """CPUs this process may use (its affinity mask, which schedulers and launchers set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class ShardWriter:
    """Spills documents into text shards (see the module docstring); `close()` returns the
    number of shards."""

    def __init__(self, work: Path, shard_bytes: int = SHARD_BYTES, shard_docs: int = SHARD_DOCS):
        self.work, self.shard_bytes, self.shard_docs = work, shard_bytes, shard_docs
        self.n_shards = 0
        self._file = None
        self._hashes, self._ends = array("d"), array("q")  # 16 bytes per document

    def add(self, data: bytes, doc_hash: float) -> None:
        """Append one document's UTF-8 text `data` (non-empty) and its split hash."""
        if self._file is None:
            self._file = open(self.work / _name(self.n_shards, ".txt"), "wb")
        self._file.write(data)
        self._hashes.append(doc_hash)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(data))
        if self._ends[-1] >= self.shard_bytes or len(self._ends) >= self.shard_docs:
            self._flush()

    def _flush(self) -> None:
        if self._file is None:
            return
        self._file.close()
        with open(self.work / _name(self.n_shards, ".idx.npy"), "wb") as f:
            np.save(f, np.frombuffer(self._hashes, np.float64))
            np.save(f, np.frombuffer(self._ends, np.int64))
        self._file, self._hashes, self._ends = None, array("d"), array("q")
        self.n_shards += 1

    def close(self) -> int:
        self._flush()
        return self.n_shards


def shard_index(work: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(split hashes, text end offsets) of shard k's documents."""
    with open(work / _name(k, ".idx.npy"), "rb") as f:
        return np.load(f), np.load(f)


@contextlib.contextmanager
def _mapped(work: Path, k: int):
    """Shard k's text, memory-mapped: read from the page cache, slices copied out one by one,
    so the shard never sits in anonymous memory (a shard has text: it is made by `add`)."""
    with open(work / _name(k, ".txt"), "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


def shard_texts(work: Path, k: int, which: np.ndarray | None = None) -> list[str]:
    """Texts of shard k's documents (those at positions `which`, in that order: default all)."""
    hashes, ends = shard_index(work, k)
    starts = np.concatenate([[0], ends[:-1]])
    which = range(len(ends)) if which is None else which
    with _mapped(work, k) as data:
        return [data[starts[i]:ends[i]].decode("utf-8") for i in which]


def shard_tokens(work: Path, k: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(ids per document, all ids back to back: read-only memmap) of tokenized shard k."""
    lengths = np.load(work / _name(k, ".len.npy"))
    total = int(lengths.sum())
    if total == 0:  # numpy cannot memmap an empty file
        return lengths, np.zeros(0, dtype)
    return lengths, np.memmap(work / _name(k, ".bin"), dtype=dtype, mode="r", shape=(total,))


def write_plan(work: Path, model_path: str, n_shards: int, dtype: np.dtype) -> None:
    """Open the shards to every process that helps (written last, atomically)."""
    atomic_write(str(work / PLAN), json.dumps({"model": model_path, "n_shards": n_shards,
                                               "dtype": np.dtype(dtype).name}))


def help_build(work: Path) -> None:
    """What a process waiting for a cache build does (cache.open_or_build's `help`): tokenize
    unclaimed shards of the live build in `work` until none is left. Returns at once when
    there is no plan yet. Raises OSError / ConfigError when the build vanishes meanwhile."""
    try:
        plan = json.loads((work / PLAN).read_text())
    except FileNotFoundError:
        return
    tokenize_shards(work, plan["model"], plan["n_shards"], np.dtype(plan["dtype"]), wait=False)


def tokenize_shards(work: Path, model_path: str, n_shards: int, dtype: np.dtype, *,
                    wait: bool) -> dict[int, int]:
    """Tokenize every shard nobody has done or holds; with `wait` (the builder), then wait for
    each shard others hold and do it if they died. Returns {shard: pid} of the shards done
    (complete only with `wait`)."""
    from filelock import FileLock, Timeout

    done: dict[int, int] = {}
    for blocking in (False, True) if wait else (False,):
        for k in range(n_shards):
            if k not in done and (pid := _done_by(work, k)) is not None:
                done[k] = pid
            if k in done:
                continue
            claim = FileLock(str(work / _name(k, ".lock")))
            try:
                claim.acquire(timeout=-1 if blocking else 0)
            except Timeout:
                continue
            try:
                pid = _done_by(work, k)
                if pid is None:
                    _tokenize_shard(work, k, open_tokenizer(model_path), dtype)
                    pid = os.getpid()
                done[k] = pid
            finally:
                claim.release()
    return done


def _done_by(work: Path, k: int) -> int | None:
    try:
        return json.loads((work / _name(k, ".done")).read_text())["pid"]
    except FileNotFoundError:
        return None


def ranges(sizes: np.ndarray, limit: int, max_count: int = 0) -> list[tuple[int, int]]:
    """(first, stop) ranges of consecutive items, in order, covering all `sizes`: the items of a
    range start within the same `limit` units (so a range holds at most `limit` + its last
    item's size) and, with `max_count`, number at most that."""
    starts = np.cumsum(sizes) - sizes
    group = starts // limit
    cuts = np.diff(group) != 0
    if max_count:
        cuts |= np.diff(np.arange(len(sizes)) // max_count) != 0
    bounds = [0, *(np.flatnonzero(cuts) + 1).tolist(), len(sizes)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _to_numpy(ids: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
    return lengths, flat


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).
    Between shards: otherwise the free memory that the encoder threads' and numpy's transient
    allocations leave in glibc's arenas stays resident, more of it shard after shard."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (a CDLL per call leaves ctypes types as garbage)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _tokenize_shard(work: Path, k: int, tok, dtype: np.dtype) -> None:
    """Encode shard k's documents, batch k+1 encoding while batch k is converted and written;
    its marker last. Call only while holding the shard's lock."""
    _, ends = shard_index(work, k)
    lengths = []
    n = threads()
    with _mapped(work, k) as data, open(work / _name(k, ".bin"), "wb") as out, \
            ThreadPoolExecutor(1) as encoder:
        pending = None
        for first, stop in ranges(np.diff(ends, prepend=0), BATCH_BYTES, BATCH_DOCS):
            start = int(ends[first - 1]) if first else 0
            bounds = [start, *ends[first:stop].tolist()]
            texts = [data[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:])]
            submitted = encoder.submit(tok.encode_batch, texts, n)
            if pending is not None:
                lengths.append(_write(pending.result(), dtype, out))
            pending = submitted
        if pending is not None:
            lengths.append(_write(pending.result(), dtype, out))
    release_free_memory()
    np.save(work / _name(k, ".len.npy"), np.concatenate(lengths) if lengths else np.zeros(0, np.int64))
    atomic_write(str(work / _name(k, ".done")),
                 json.dumps({"pid": os.getpid(), "time": time.time()}))


def _write(ids: list[list[int]], dtype: np.dtype, out) -> np.ndarray:
    lengths, flat = _to_numpy(ids, dtype)
    flat.tofile(out)
    return lengths
