"""The exception types that cross the user boundary.

Anything wrong with what the user gave us (config values, data paths, checkpoints) is raised as a
`ConfigError` naming the config key. The entry point prints it as one line,
`error: <key>: <message>`, and exits 2 (docs/architecture.md §2); library code never prints or exits
itself. `RunStopped` is the same report for a run that had to stop itself (exit code 3).
"""


class ConfigError(ValueError):
    """Bad user input, attributed to the config key that carries it."""

    exit_code = 2

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


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


def read_json_object(path: str, key: str) -> dict:
    """The JSON object in the user's file `path` (a config.json, meta.json, tokenizer config).

    Raises ConfigError(key) naming the file when it is unreadable, not JSON, or not an object.
    """
    import json

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"{path} is not readable JSON ({type(exc).__name__}: {exc}); "
                          "fix or replace it") from None
    if not isinstance(value, dict):
        raise ConfigError(key, f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value
