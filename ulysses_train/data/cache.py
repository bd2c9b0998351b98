"""The on-disk cache of tokenized corpora: keyed, locked, checksummed, published atomically.

Layout: `<cache_dir>/<name>/` holds the tokenizer's files (`tokenizer.model` or
`tokenizer.json`, and its configs: data/tokenizer.py), one flat token file and one offsets file
per split, and `meta.json`. A cache directory only ever appears by `os.replace` of a finished
temporary directory, and `meta.json` (the completion marker) is the last file written into it,
so a reader that finds the marker finds everything. Builds happen under a `FileLock` per name:
among processes that start together (ranks, runs) exactly one builds and publishes; the others
wait on the lock (helping with the build's work meanwhile, see below) and then read. Leftovers of a crashed build (temporary directories, a directory without a
marker) are only ever removed by the lock holder, so they are never read and never race.

Shared builds: the waiters need not idle. While it builds, the lock holder keeps a work
directory beside its temporary one (`work_dir`) and holds that directory's `alive.lock`; a
build may publish a plan of independent work there (data/shards.py: document shards to
tokenize). A waiter passed `help` calls it on every live work directory it finds (one whose
`alive.lock` is held: a crashed builder's leftovers are skipped), then waits again; `help`
claims pieces of work under locks of their own, which the OS releases if the helper dies, so
the holder finishes whatever a helper left. The work directory is removed before publishing;
only the holder publishes, so exactly one result appears, whoever did the work.

Checksums: `meta.json` records the size and content hash of every other file of the directory,
and a hash of its own content. Opening a cache verifies all of them; a cache that fails (a
truncated token file, one changed offset, a damaged tokenizer model or marker, an older format)
is rebuilt with a one-line warning naming it and what failed. Hash: `hashing.default_algorithm`
(xxh3-128 where `xxhash` is installed, else sha256). Every file is hashed whole,
except token files over `FULL_HASH_BYTES` (big corpora; they are memory-mapped, so a run reads
only the rows it samples): those are checked by size plus `SAMPLE_BLOCKS` evenly spaced 1 MiB
blocks, first and last included. Measured on the 2-core dev machine: xxh3 reads 1 GiB from the
page cache in 0.66 s (sha256 2.3 s; 3.3 s for xxh3 with the machine busy and the file partly on
disk); verifying the whole default stdlib cache (17.7 MB, vocab 32000) takes 41-49 ms per
process (sha256: 78-91 ms); a sampled 4 GiB token file 0.34 s. So a check costs ~0.7 s per GiB
of offsets and of token files up to 1 GiB, and ~0.3 s per larger token file whatever its size,
which catches truncation always but a changed token in an unsampled block not at all.
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

from ..config.errors import ConfigError
from ..utils.atomic import atomic_write
from ..utils.hashing import default_algorithm, hash_file, new_hasher

FORMAT_VERSION = 2  # bump whenever the files' layout or meaning changes (2: checksums)
MARKER = "meta.json"
TOKENIZER = "tokenizer.model"
_TMP_INFIX = ".tmp-"
FULL_HASH_BYTES = 1 << 30  # files up to this size are hashed whole when a cache is opened
SAMPLE_BLOCKS = 256  # blocks hashed in larger files
_BLOCK = 1 << 20
WORK_SUFFIX = "-work"  # a build's work directory: the temporary directory's name + this
ALIVE = "alive.lock"  # held by the builder for as long as its work directory is live
POLL_SECONDS = 0.5  # how often a waiter looks for work to help with


def cache_key(parts: dict) -> str:
    """A short, stable hash of everything the cached files depend on."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_files(meta: dict) -> list[str]:
    """Names of the tokenizer's files in a cache (caches built before Hugging Face tokenizers
    were read hold only our sentencepiece model, and do not list it)."""
    return list(meta.get("tokenizer_files", [TOKENIZER]))


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type holding ids in [0, vocab_size)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_files(split: str) -> tuple[str, str]:
    """File names of a split's tokens and document offsets inside a cache directory."""
    return f"{split}.bin", f"{split}_offsets.npy"


def file_digest(path: Path, algorithm: str) -> str:
    """Content hash of `path`. Token files (`.bin`, memory-mapped, so only the rows a run asks
    for are ever read) over FULL_HASH_BYTES: of SAMPLE_BLOCKS blocks of 1 MiB spaced evenly from
    the first to the last (their size is checked separately). Any other file: of all of it."""
    size = path.stat().st_size
    if size <= FULL_HASH_BYTES or path.suffix != ".bin":
        return hash_file(str(path), algorithm)
    h = new_hasher(algorithm)
    with open(path, "rb", buffering=0) as f:
        for start in np.linspace(0, size - _BLOCK, SAMPLE_BLOCKS).astype(np.int64):
            f.seek(int(start))
            h.update(f.read(_BLOCK))
    return h.hexdigest()


def _meta_digest(meta: dict, algorithm: str) -> str:
    """Hash of the marker's content, itself excluded: a changed or half-written value fails."""
    body = {k: v for k, v in meta.items() if k != "meta_hash"}
    h = new_hasher(algorithm)
    h.update(json.dumps(body, sort_keys=True).encode())
    return h.hexdigest()


def add_checksums(directory: Path, meta: dict) -> dict:
    """Record size and digest of every file of `directory` (the marker excepted), and the
    marker's own digest, in `meta`; return it."""
    algorithm = default_algorithm()
    meta["checksums"] = {"algorithm": algorithm, "files": {
        f.name: {"size": f.stat().st_size, "hash": file_digest(f, algorithm)}
        for f in sorted(directory.iterdir()) if f.is_file() and f.name != MARKER}}
    meta["meta_hash"] = _meta_digest(meta, algorithm)
    return meta


def check_cache(path: Path) -> tuple[dict | None, str]:
    """(meta, "") for a finished, intact cache directory; else (None, what is wrong), e.g.
    "train_offsets.npy does not match its checksum". "" with None means: there is none."""
    try:
        text = (path / MARKER).read_text()
    except FileNotFoundError:
        return None, "has no meta.json (an unfinished build)" if path.exists() else ""
    except OSError as e:
        return None, f"meta.json is unreadable ({e.strerror})"
    try:
        meta = json.loads(text)
        if meta.get("format") != FORMAT_VERSION:
            return None, f"has format {meta.get('format')}, this version reads {FORMAT_VERSION}"
        algorithm, files = meta["checksums"]["algorithm"], meta["checksums"]["files"]
        new_hasher(algorithm)
        if meta["meta_hash"] != _meta_digest(meta, algorithm):
            return None, "meta.json does not match its checksum"
        needed = {n for split in meta["n_tokens"] for n in split_files(split)}
        needed |= set(tokenizer_files(meta))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"meta.json is damaged ({type(e).__name__}: {e})"
    except ImportError:
        return None, f"was checksummed with {algorithm}, which this machine lacks"
    unlisted = sorted(needed - set(files))
    if unlisted:
        return None, f"meta.json has no checksum for {unlisted[0]}"
    for name, entry in files.items():
        try:
            size = (path / name).stat().st_size
            if size != entry["size"]:
                return None, f"{name} has {size} bytes, expected {entry['size']}"
            if file_digest(path / name, algorithm) != entry["hash"]:
                return None, f"{name} does not match its checksum"
        except OSError as e:
            return None, f"{name} is missing or unreadable ({e.strerror})"
    return meta, ""


def read_complete(path: Path) -> dict | None:
    """The meta of a finished, intact cache directory, or None (see `check_cache`)."""
    return check_cache(path)[0]


def _remove_leftovers(root: Path, name: str, damaged: bool) -> None:
    """Delete what crashed builds of `name` left behind, and the cache itself if `damaged`.
    Call only while holding its lock."""
    for stale in root.glob(f".{name}{_TMP_INFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if damaged:
        shutil.rmtree(root / name)


def _write_marker(directory: Path, meta: dict) -> None:
    """Write meta.json durably, last: its presence is what says 'complete'."""
    atomic_write(str(directory / MARKER), json.dumps(meta, indent=1, sort_keys=True), durable=True)


def work_dir(tmp: Path) -> Path:
    """The work directory of the build filling `tmp` (see the module docstring)."""
    return tmp.with_name(tmp.name + WORK_SUFFIX)


def _live_work_dirs(root: Path, name: str) -> list[Path]:
    """Work directories of `name` whose builder is alive (holds their ALIVE lock)."""
    from filelock import FileLock, Timeout

    live = []
    for work in sorted(root.glob(f".{name}{_TMP_INFIX}*{WORK_SUFFIX}")):
        probe = FileLock(str(work / ALIVE))
        try:
            probe.acquire(timeout=0)
        except Timeout:
            live.append(work)
        except OSError:  # removed meanwhile: published or cleaned up
            continue
        else:  # nobody holds it: a crashed build's leftover
            probe.release()
    return live


def _wait_helping(lock, root: Path, name: str, help: Callable[[Path], None] | None) -> None:
    """Acquire `lock`; until then, run `help` once on each live work directory of `name`.
    A work directory that vanishes or turns unreadable under `help` (the build finished or
    crashed) ends that help; the lock holder does whatever is left."""
    from filelock import Timeout

    helped: set[Path] = set()
    while True:
        for work in _live_work_dirs(root, name) if help is not None else ():
            if work not in helped:
                helped.add(work)
                try:
                    help(work)
                except (OSError, ConfigError):
                    pass
        try:
            lock.acquire(timeout=POLL_SECONDS)
            return
        except Timeout:
            continue


def open_or_build(root: Path, name: str, build: Callable[[Path], dict], *,
                  log: Callable[[str], None], is_main: bool,
                  help: Callable[[Path], None] | None = None) -> tuple[Path, dict, bool]:
    """Return (directory, meta, built_now) of cache `name`, building it with `build(tmp_dir)`
    if no complete, intact copy exists (a damaged one is replaced, with a warning).

    `build` fills an empty directory and returns the meta to record; this function adds the
    format, a build id, the time taken and the checksums, then publishes the directory
    atomically. `build` may share its work through `work_dir(tmp_dir)`; a process that waits
    for another's build runs `help(work directory)` on it (module docstring). Raises
    ConfigError (data.cache_dir) if a damaged cache cannot be removed.
    """
    from filelock import FileLock, Timeout

    final = root / name
    meta, _ = check_cache(final)
    if meta is not None:
        return final, meta, False
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if is_main:
            log(f"data: waiting for another process to finish building {final} ...")
        _wait_helping(lock, root, name, help)
    try:
        meta, problem = check_cache(final)  # someone may have finished while we waited
        if meta is not None:
            return final, meta, False
        if problem:
            log(f"warning: data: token cache {final} {problem}; rebuilding it")
        try:
            _remove_leftovers(root, name, damaged=final.exists())
        except OSError as e:
            raise ConfigError("data.cache_dir", f"token cache {final} {problem} and cannot be "
                              f"removed ({e.strerror}); delete it or set another "
                              "data.cache_dir") from e
        return final, _build_and_publish(root, name, build), True
    finally:
        lock.release()


def _build_and_publish(root: Path, name: str, build: Callable[[Path], dict]) -> dict:
    """Build into a temporary directory, checksum it, and rename it to `root/name`; the
    build's work directory lives (ALIVE held) until then."""
    from filelock import FileLock

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}{_TMP_INFIX}", dir=root))
    work = work_dir(tmp)
    alive = FileLock(str(work / ALIVE))
    try:
        work.mkdir()
        alive.acquire(timeout=0)
        start = time.perf_counter()
        meta = build(tmp)
        meta.update(format=FORMAT_VERSION, build_id=uuid.uuid4().hex,
                    build_seconds=round(time.perf_counter() - start, 2))
        _write_marker(tmp, add_checksums(tmp, meta))
        os.chmod(tmp, 0o755)  # mkdtemp made it private; a shared cache must be readable
        os.replace(tmp, root / name)  # atomic publish: readers see all of it or nothing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        alive.release()
        shutil.rmtree(work, ignore_errors=True)
    return meta


def load_split(path: Path, meta: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's tokens (read-only memmap) and document offsets."""
    tokens_file, offsets_file = split_files(split)
    offsets = np.load(path / offsets_file)
    n = int(meta["n_tokens"][split])
    if n == 0:  # numpy cannot memmap an empty file
        return np.zeros(0, dtype=meta["dtype"]), offsets
    tokens = np.memmap(path / tokens_file, dtype=meta["dtype"], mode="r", shape=(n,))
    return tokens, offsets
