"""The JSON object in a file the user gave us (a config.json, meta.json, tokenizer config)."""
from __future__ import annotations

import json


def read_json_object(path: str) -> dict:
    """The JSON object in `path`. Raises ValueError with one line naming the file and the fix
    when it is unreadable, not JSON, or not an object (callers attribute it to a config key)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({type(exc).__name__}: {exc}); fix or "
                         "replace it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value
