"""A checkpoint's manifest: the size and content hash of every file, written last at a save and
checked before a resume reads the checkpoint (DCP has no checksums of its own; the manifest is
how a truncated, missing or bit-flipped file is found and reported by path).

Hash: xxh3-128 (the `xxhash` package, which datasets and wandb already depend on) when it is
installed, else sha256 (utils/hashing.py). Measured on a 1 GiB checkpoint in the page cache on the
(busy) 2-core dev machine: xxh3 0.3-0.5 s/GiB (the file read dominates: the hash alone runs at
~30 GB/s), sha256 ~1.5 s/GiB (SHA-NI). The manifest names its algorithm; a reader that lacks it
checks sizes only and says so. A defence against torn writes and bad disks, not against
tampering (a planted pickle cannot run code: safe_read.py).

Only verified corruption (a missing file, a size or a hash that differs) is reported as a
problem; any other read error (EIO, EACCES, no memory) is `read_error` (exit 1): nothing shows
the checkpoint is bad, so nothing falls back past it.
"""
from __future__ import annotations

import errno
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from ..config.errors import InputUnreadable
from ..utils.atomic import write_durably
from ..utils.hashing import can_hash, default_algorithm, hash_file

# The files of a committed step directory that are ours or DCP's index (store.is_complete).
MANIFEST = "manifest.json"
META = "meta.json"  # step, model config, torch version, data identity (store.read_meta)
DCP_METADATA = ".metadata"


_MAX_THREADS = 8  # hashing releases the GIL: files of several ranks hash in parallel


def _hash_many(path: str, names: list[str], algorithm: str) -> list[str]:
    if len(names) <= 1:
        return [hash_file(os.path.join(path, n), algorithm) for n in names]
    with ThreadPoolExecutor(min(_MAX_THREADS, len(names))) as pool:
        return list(pool.map(lambda n: hash_file(os.path.join(path, n), algorithm), names))


def hash_files(path: str, names: Iterable[str], algorithm: str) -> dict[str, dict]:
    """Manifest entries {name: {"size": bytes, "hash": hex}} of files `names` under `path`.

    Each rank calls this for the files it wrote itself, all ranks at once, so a save's hashing
    costs one rank's share of the bytes rather than the whole checkpoint read by rank 0."""
    names = sorted(names)
    hashes = _hash_many(path, names, algorithm)
    return {n: {"size": os.path.getsize(os.path.join(path, n)), "hash": h}
            for n, h in zip(names, hashes)}


def write_manifest(path: str, hashed: dict[str, dict] | None = None,
                   algorithm: str | None = None) -> dict:
    """Write `path/manifest.json` (durably) covering every file under `path`; return it.

    `hashed`: entries the ranks already computed (`hash_files`, with `algorithm`) for the files
    they wrote; the rest (DCP's `.metadata`, `meta.json`, anything unexpected) is hashed here."""
    algorithm = algorithm or default_algorithm()
    names = sorted(os.path.relpath(os.path.join(root, f), path)
                   for root, _, files in os.walk(path) for f in files if f != MANIFEST)
    hashed = {n: e for n, e in (hashed or {}).items() if n in names}
    entries = {**hashed, **hash_files(path, [n for n in names if n not in hashed], algorithm)}
    manifest = {"version": 1, "algorithm": algorithm,
                "files": {n: entries[n] for n in names}}
    write_durably(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def read_error(path: str, why: str) -> InputUnreadable:
    """A checkpoint could not be read for a reason other than verified corruption (an I/O
    error, no memory, a bug): the run stops with exit code 1 and one line, touching nothing on
    disk — falling back would abandon a checkpoint that may be perfectly good."""
    return InputUnreadable("checkpoint.resume", f"{path} could not be read ({why}); nothing "
                           "shows it is corrupt, so not falling back to an older one: fix the "
                           "cause and rerun (every checkpoint is kept)", why)


def _problem_or_raise(path: str, exc: OSError) -> str:
    """A missing file is corruption ('PATH: missing'); any other OSError (EIO, EACCES...) is not
    evidence of it and stops the run (`read_error`, exit 1)."""
    where = exc.filename or path
    if exc.errno == errno.ENOENT:
        return f"{where}: missing"
    raise read_error(path, f"{where}: {exc.strerror or exc}") from exc


def read_manifest(path: str) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, what is wrong with it)."""
    where = os.path.join(path, MANIFEST)
    try:
        with open(where) as f:
            manifest = json.load(f)
        manifest["files"].items()
        return manifest, None
    except OSError as exc:
        return None, _problem_or_raise(path, exc)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # torn or not ours
        return None, f"{where}: unreadable ({type(exc).__name__})"


def check_sizes(path: str, manifest: dict) -> list[str]:
    """Missing files and size mismatches, each as 'PATH: what'. One stat per file."""
    problems = []
    for name, entry in manifest["files"].items():
        where = os.path.join(path, name)
        try:
            size = os.path.getsize(where)
        except OSError as exc:
            problems.append(_problem_or_raise(path, exc))
            continue
        if size != entry["size"]:
            problems.append(f"{where}: {size} bytes, the manifest says {entry['size']}")
    return problems


def check_hashes(path: str, manifest: dict, names: Iterable[str]) -> list[str]:
    """Content-hash mismatches among `names` (files the manifest lists), as 'PATH: what'.
    InputUnreadable (`read_error`) for a read error other than a missing file."""
    names = [n for n in names if n in manifest["files"]]
    try:
        hashes = _hash_many(path, names, manifest["algorithm"])
    except OSError as exc:
        return [_problem_or_raise(path, exc)]
    return [f"{os.path.join(path, n)}: content differs from the manifest's hash (corrupt)"
            for n, h in zip(names, hashes) if h != manifest["files"][n]["hash"]]


def verify_share(path: str, share: tuple[int, int] = (0, 1), hashes: bool = True,
                 check: Callable[[str], None] | None = None,
                 log: Callable[[str], None] = print) -> list[str]:
    """Problems ('PATH: what') of checkpoint `path` against its manifest, as one rank of
    `share` = (rank, world) sees them: an unreadable manifest, a missing file or a size (every
    rank), meta.json's hash (every rank: tiny), then `check(path)` (raises for a checkpoint that
    is intact but unusable, e.g. another model shape), then the content hashes of this rank's
    share of the other files (every world-th name from rank, sorted). Empty when verified.
    `hashes=False`, or a hash algorithm this machine lacks (said through `log`): sizes only.
    InputUnreadable (`read_error`) for a read error other than a missing file."""
    manifest, problem = read_manifest(path)
    if manifest is None:
        return [problem]
    hashing = hashes and can_hash(manifest["algorithm"])
    if hashes and not hashing:
        log(f"warning: {path} was hashed with {manifest['algorithm']}, which this machine "
            "lacks (pip install xxhash); checking file sizes only")
    problems = check_sizes(path, manifest)
    if not problems and hashing:
        problems = check_hashes(path, manifest, [META])
    if problems:
        return problems
    if check is not None:
        check(path)
    if not hashing:
        return []
    rank, world = share
    names = sorted(n for n in manifest["files"] if n != META)
    return check_hashes(path, manifest, names[rank::world])


def summary(problems: list[str]) -> str:
    """One line for a list of problems: the first, and how many more."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more
