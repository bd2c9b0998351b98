"""`key=value` as one shell word that Hydra's override grammar parses back to `value`: the one
place quoting for Hydra is decided (advice in error lines: "rerun with ...", "quote it: ...").

Hydra's grammar (https://hydra.cc/docs/advanced/override_grammar/basic/) reads a bare value only
when it holds no special character (`~` is its delete operator, `#`, `&`, `=`, spaces, brackets
...); a double-quoted string may hold anything, with `\\` and `"` escaped. Pure: no Hydra import.
"""
from __future__ import annotations

import re
import shlex

_BARE = re.compile(r"[\w./+:@-]*")  # what Hydra reads unquoted as the same string


def hydra_value(value, quote: bool = False) -> str:
    """`value` (None, a bool, number, string or list of them) in Hydra's grammar; strings
    double-quoted when they need it (always with `quote`)."""
    if value is None:  # Hydra's spelling of None (a bare `None` would read as that string)
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v, quote) for v in value) + "]"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if not quote and _BARE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def override(key: str, value, quote: bool = False) -> str:
    """`key=value` as one shell word (shlex-quoted) that Hydra parses back to `value`. `key` may
    carry Hydra's `+`/`~` prefix."""
    return shlex.quote(f"{key}={hydra_value(value, quote)}")
