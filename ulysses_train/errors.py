"""The one exception type that crosses the user boundary.

Anything wrong with what the user gave us (config values, data paths, checkpoints) is raised as a
`ConfigError` naming the config key. The entry point prints it as one line,
`error: <key>: <message>`, and exits 2 (DESIGN §2); library code never prints or exits itself.
"""


class ConfigError(ValueError):
    """Bad user input, attributed to the config key that carries it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def require(ok: bool, key: str, message: str) -> None:
    """Raise `ConfigError(key, message)` unless `ok`."""
    if not ok:
        raise ConfigError(key, message)
