"""Writes a crash cannot tear: the one owner of "write a temporary file, then `os.replace` it".

A reader (a resuming run, `scripts/eval.py`'s user, a cache lookup) sees the previous content or
the new one, never half of either: the bytes go to `<path>.tmp` first and the rename is atomic
on POSIX file systems. `durable=True` also survives a power loss (fsync of the file before the
rename, of its directory after); a `kill -9` needs neither. Imports nothing of the package.
"""
from __future__ import annotations

import os
from typing import Callable, Union

Content = Union[str, bytes, Callable[[str], None]]


def write_durably(path: str, text: str) -> None:
    """Write `text` to `path` in place and fsync it (for files inside a directory that is itself
    published by a rename, such as a checkpoint's meta.json before its commit)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Make a rename inside directory `path` survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, content: Content, durable: bool = False) -> None:
    """Replace the file `path` with `content` atomically.

    `content`: text, bytes, or a function that writes the file whose path it is given (for
    writers that take a path, e.g. matplotlib's `savefig`). A failure part-way leaves `path` as
    it was (and at most a stale `<path>.tmp`, overwritten by the next write)."""
    tmp = path + ".tmp"
    if callable(content):
        content(tmp)
    else:
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
