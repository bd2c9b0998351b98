"""The rules on `data.sources` entries (a weighted mixture: docs/data.md); pure, no I/O.

Each rule names the entry's own key, e.g. `error: data.sources[1].weight: ...`, so a user
with five sources knows which one to fix. Checked before anything is read or built.
"""
from __future__ import annotations

import math
import re

from .errors import require
from .schema import SOURCE_KINDS, TOKEN_DTYPES, DataConfig, SourceConfig

NAME = re.compile(r"[A-Za-z0-9_.-]+")  # names become metric keys: tokens/<name>
MAX_UPSAMPLE = 100.0  # length_upsample above this is a mistake (and a huge occurrence index)
_SHARED = {"name", "kind", "weight", "max_docs", "min_tokens", "max_tokens", "length_upsample",
           "long_tokens"}
USED_BY = {  # the keys each kind reads, besides _SHARED; any other key set is refused
    "stdlib": set(),
    "files": {"paths", "text_field"},
    "hf": {"hf_name", "hf_config", "hf_split", "text_field"},
    "megatron": {"paths"},  # the .idx holds the dtype and the documents
    "tokens": {"paths", "ids_field", "hf_name", "hf_config", "hf_split", "dtype", "eos_id"},
}

def _entry(i: int, s: SourceConfig) -> None:
    key = f"data.sources[{i}]"
    require(s.kind in SOURCE_KINDS, f"{key}.kind",
            f"{s.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    require(isinstance(s.weight, (int, float)) and math.isfinite(s.weight) and s.weight > 0,
            f"{key}.weight", f"must be a positive number (the source's share of the training "
            f"tokens; weights are normalised to sum 1), got {s.weight}")
    require(not s.name or NAME.fullmatch(s.name) is not None, f"{key}.name",
            f"{s.name!r} may hold only letters, digits, '_', '.' and '-' (it names metrics)")
    needs_paths = s.kind in ("files", "megatron") or (s.kind == "tokens" and not s.hf_name)
    require(not needs_paths or len(s.paths) > 0, f"{key}.paths",
            f"a {s.kind} source needs paths, e.g. paths: [{_example(s.kind)}]")
    require(s.kind != "hf" or bool(s.hf_name), f"{key}.hf_name",
            "an hf source needs a dataset name, e.g. hf_name: wikitext")
    for field in ("max_docs", "min_tokens", "max_tokens", "long_tokens"):
        value = getattr(s, field)
        off = "data.seq_len" if field == "long_tokens" else "off"
        require(value >= 0, f"{key}.{field}", f"must be >= 0 (0 = {off}), got {value}")
    require(not (s.min_tokens and s.max_tokens) or s.max_tokens >= s.min_tokens,
            f"{key}.max_tokens", f"{s.max_tokens} is below min_tokens={s.min_tokens}: no "
            "document could be kept")
    require(math.isfinite(s.length_upsample) and 1 <= s.length_upsample <= MAX_UPSAMPLE,
            f"{key}.length_upsample", f"must be between 1 (off) and {MAX_UPSAMPLE:g} (2 = long "
            f"documents twice as often), got {s.length_upsample}")
    require(not s.dtype or s.dtype in TOKEN_DTYPES, f"{key}.dtype",
            f"{s.dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    require(s.eos_id >= -1, f"{key}.eos_id", f"must be a token id or -1, got {s.eos_id}")
    _unused(key, s)


def _unused(key: str, s: SourceConfig) -> None:
    """Refuse a key this kind does not read (a megatron dtype, a files eos_id): set, it would
    be silently ignored, and the user believes it took effect."""
    default = SourceConfig()
    for field in sorted(set(vars(default)) - _SHARED - USED_BY[s.kind]):
        require(getattr(s, field) == getattr(default, field), f"{key}.{field}",
                f"is not used by a {s.kind} source (it reads "
                f"{', '.join(sorted(USED_BY[s.kind])) or 'no file keys'}); remove it")


def _example(kind: str) -> str:
    return {"files": "corpus.jsonl", "megatron": "data/books_text_document",
            "tokens": "tokens.npy"}.get(kind, "...")


def validate_sources(d: DataConfig) -> None:
    """Raise ConfigError for the first bad entry of `d.sources` (see the module docstring)."""
    names = []
    for i, s in enumerate(d.sources):
        _entry(i, s)
        name = s.name or f"{s.kind}{i}"
        require(name not in names, f"data.sources[{i}].name",
                f"{name!r} is used by two sources; give each its own name")
        names.append(name)
