"""The exception types that cross the user boundary.

Anything wrong with what the user gave us (config values, data paths, checkpoints) is raised as a
`ConfigError` naming the config key. The entry point prints it as one line,
`error: <key>: <message>`, and exits 2 (docs/architecture.md §2); library code never prints or exits
itself. `RunStopped` is the same report for a run that had to stop itself (exit code 3).
"""
from __future__ import annotations

import math


class ConfigError(ValueError):
    """Bad user input, attributed to the config key that carries it."""

    exit_code = 2

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class InputUnreadable(ConfigError):
    """An input (a checkpoint, an output directory) could not be read or written for a reason
    that is not bad input — an I/O error, a permission, no memory: one line and exit code 1.
    Nothing shows the input is bad, so the user fixes the cause and reruns; nothing on disk is
    touched (a checkpoint that merely failed to load may be perfectly good). `why`: the cause
    alone, for callers that re-word the message."""

    exit_code = 1

    def __init__(self, key: str, message: str, why: str = ""):
        super().__init__(key, message)
        self.why = why or message


class RunStopped(ConfigError):
    """Training cannot go on (e.g. too many non-finite steps in a row): reported like bad input,
    one line naming the key that governs it, but with exit code 3, so a script or scheduler can
    tell a run that stopped itself from one that was refused at the start."""

    exit_code = 3


def exception_chain(exc: BaseException | None):
    """`exc`, then what caused it (`__cause__`, else `__context__`), and so on; cycles stop it.

    Libraries (Hydra, datasets) wrap the exception that matters; this walks back to it.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def require(ok: bool, key: str, message: str) -> None:
    """Raise `ConfigError(key, message)` unless `ok`."""
    if not ok:
        raise ConfigError(key, message)


def one_of(value, allowed, key: str) -> None:
    require(value in allowed, key, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def positive(value, key: str) -> None:
    require(value > 0 and math.isfinite(value), key, f"must be a positive number, got {value}")


def finite(value: float, key: str, lo: float | None = None, hi: float | None = None) -> None:
    require(math.isfinite(value), key, f"must be a finite number, got {value}")
    if lo is not None:
        require(value >= lo, key, f"must be >= {lo}, got {value}")
    if hi is not None:
        require(value <= hi, key, f"must be <= {hi}, got {value}")
