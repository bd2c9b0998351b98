"""The on-disk cache of tokenized corpora: keyed, locked, published atomically.

Layout: `<cache_dir>/<name>/` holds the tokenizer, one flat token file and one offsets file per
split, and `meta.json`. A cache directory only ever appears by `os.replace` of a finished
temporary directory, and `meta.json` (the completion marker) is the last file written into it,
so a reader that finds the marker finds everything. Builds happen under a `FileLock` per name:
among processes that start together (ranks, runs) exactly one builds; the others wait on the
lock and then read. Leftovers of a crashed build (temporary directories, a directory without a
marker) are only ever removed by the lock holder, so they are never read and never race.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

FORMAT_VERSION = 1  # bump whenever the files' layout or meaning changes
MARKER = "meta.json"
_TMP_INFIX = ".tmp-"


def cache_key(parts: dict) -> str:
    """A short, stable hash of everything the cached files depend on."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type holding ids in [0, vocab_size)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_files(split: str) -> tuple[str, str]:
    """File names of a split's tokens and document offsets inside a cache directory."""
    return f"{split}.bin", f"{split}_offsets.npy"


def read_complete(path: Path) -> dict | None:
    """The meta of a finished cache directory, or None if it is missing, unmarked or damaged."""
    try:
        meta = json.loads((path / MARKER).read_text())
        if meta.get("format") != FORMAT_VERSION:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, n_tokens in meta["n_tokens"].items():
            tokens_file, offsets_file = split_files(split)
            if (path / tokens_file).stat().st_size != n_tokens * itemsize:
                return None
            if not (path / offsets_file).is_file():
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_leftovers(root: Path, name: str) -> None:
    """Delete what crashed builds of `name` left behind. Call only while holding its lock."""
    for stale in root.glob(f".{name}{_TMP_INFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / name
    if final.exists() and read_complete(final) is None:
        shutil.rmtree(final, ignore_errors=True)


def _write_marker(directory: Path, meta: dict) -> None:
    """Write meta.json durably, last: its presence is what says 'complete'."""
    tmp = directory / (MARKER + ".part")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MARKER)


def open_or_build(root: Path, name: str, build: Callable[[Path], dict], *,
                  log: Callable[[str], None], is_main: bool) -> tuple[Path, dict, bool]:
    """Return (directory, meta, built_now) of cache `name`, building it with `build(tmp_dir)`
    if no complete copy exists.

    `build` fills an empty directory and returns the meta to record; this function adds the
    format, a build id and the time taken, then publishes the directory atomically.
    """
    from filelock import FileLock, Timeout

    final = root / name
    meta = read_complete(final)
    if meta is not None:
        return final, meta, False
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if is_main:
            log(f"data: waiting for another process to finish building {final} ...")
        lock.acquire()
    try:
        meta = read_complete(final)  # someone may have finished while we waited
        if meta is not None:
            return final, meta, False
        _remove_leftovers(root, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}{_TMP_INFIX}", dir=root))
        try:
            start = time.perf_counter()
            meta = build(tmp)
            meta.update(format=FORMAT_VERSION, build_id=uuid.uuid4().hex,
                        build_seconds=round(time.perf_counter() - start, 2))
            _write_marker(tmp, meta)
            os.chmod(tmp, 0o755)  # mkdtemp made it private; a shared cache must be readable
            os.replace(tmp, final)  # atomic publish: readers see all of it or nothing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, meta, True
    finally:
        lock.release()


def load_split(path: Path, meta: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's tokens (read-only memmap) and document offsets."""
    tokens_file, offsets_file = split_files(split)
    offsets = np.load(path / offsets_file)
    n = int(meta["n_tokens"][split])
    if n == 0:  # numpy cannot memmap an empty file
        return np.zeros(0, dtype=meta["dtype"]), offsets
    tokens = np.memmap(path / tokens_file, dtype=meta["dtype"], mode="r", shape=(n,))
    return tokens, offsets
