"""Content hashes for files we verify later: checkpoint manifests and the token cache.

One owner for the algorithm choice: xxh3-128 from the `xxhash` package (several GB/s; it comes
with `datasets`) where installed, else sha256 from the standard library. The algorithm's name is
recorded beside every hash, so a file hashed on one machine is checked with the same algorithm
on another (`new_hasher` also reads the xxh3-64 that token caches of an earlier build recorded).
Imports nothing of the package (utils/ is a leaf).
"""
from __future__ import annotations

import hashlib

_CHUNK = 8 << 20  # bytes read per call when hashing a whole file


def new_hasher(algorithm: str):
    """A fresh hash object for `algorithm` ("xxh3_128", "xxh3_64" or any hashlib name).
    Raises ImportError (xxhash missing) or ValueError (unknown name)."""
    if algorithm in ("xxh3_128", "xxh3_64"):
        import xxhash  # optional: a machine may lack it

        return getattr(xxhash, algorithm)()
    return hashlib.new(algorithm)


def can_hash(algorithm: str) -> bool:
    """Whether this machine has `algorithm`."""
    try:
        new_hasher(algorithm)
    except (ImportError, ValueError):
        return False
    return True


def default_algorithm() -> str:
    """xxh3_128 where `xxhash` is installed, else sha256."""
    return "xxh3_128" if can_hash("xxh3_128") else "sha256"


def hash_file(path: str, algorithm: str) -> str:
    """Hex digest of the whole file at `path` (read in 8 MiB chunks, no Python-level copy)."""
    h, buf = new_hasher(algorithm), bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
