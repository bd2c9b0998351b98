"""`data.paths` as plain files: which inputs a `data=files` run reads.

The entry points' pre-check (cli/checks.py) refuses a missing file, a directory or an unknown
file type with it before any heavy work, a second after the command is typed; the data pipeline
resolves the same list again when it reads them.
"""
from __future__ import annotations

import glob
import os

from ..config.errors import ConfigError

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


def resolve_paths(paths: list[str], key: str = "data.paths") -> list[str]:
    """Expand ~ and globs; every result must be an existing file of a known kind. Errors name
    `key` (a mixture's entry: `data.sources[i].paths`)."""
    resolved = []
    for raw in paths:
        path = os.path.expanduser(str(raw))
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches:
            raise ConfigError(key, f"no file matches {raw!r}; check the pattern")
        for match in matches:
            if os.path.isdir(match):
                raise ConfigError(key, f"{match} is a directory; list its files or "
                                  "use a glob such as dir/*.jsonl")
            if not os.path.isfile(match):
                raise ConfigError(key, f"file not found: {match}; check the path")
            if not match.endswith(TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES):
                raise ConfigError(key, f"{match}: unknown file type; use .txt (one "
                                  "document per file), .jsonl (one per line) or .parquet")
            resolved.append(os.path.abspath(match))
    return resolved
