"""The rows of one input: a .txt, .jsonl/.json or .parquet file, or a streamed dataset.

Each reader yields `Text(text, issue, bad_bytes)` per row: `issue` is "" for a row with text,
MISSING for a row without the text field, NULL for a row whose field is null; those rows are
skipped and counted (see `input_notes`). An empty file yields nothing (the corpus then yields
one EMPTY placeholder row for it, so that it is reported, and `datasets` never sees 0 rows).
Everything else wrong with an input is a `ConfigError` naming the file, the line or row, and
what is wrong: unreadable or invalid JSON (which line), a row that is not an object, a text
field that holds something other than a string, a parquet file that cannot be read or lacks the
column, and an input in which no row has the text field (data.text_field is probably wrong).
JSON is read here, not by `datasets`' json builder, whose errors name neither file nor line (an
empty file raised a bare StopIteration).
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from ..config.errors import ConfigError

MISSING, NULL = "missing", "null"  # why a row was skipped
EMPTY = "empty"  # a placeholder row for an input without rows (datasets refuses 0 rows)


class Text(NamedTuple):
    text: str
    issue: str  # "", MISSING or NULL
    bad_bytes: int  # input bytes replaced by U+FFFD (not UTF-8)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode like `data.decode("utf-8", errors="replace")`, also counting the bytes replaced.

    Each invalid sequence becomes one U+FFFD, exactly as the "replace" handler does; the count
    is the number of input bytes those sequences covered.
    """
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    parts, bad, pos = [], 0, 0
    while pos < len(data):
        try:
            parts.append(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as e:  # e.start/e.end are relative to data[pos:]
            parts.append(data[pos:pos + e.start].decode("utf-8"))
            parts.append("\ufffd")
            bad += e.end - e.start
            pos += e.end
    return "".join(parts), bad


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def text_of(row, text_field: str, where: str, bad_bytes: int = 0) -> Text:
    """The text of one row (a dict), or why it has none; `where` names the row in errors."""
    if not isinstance(row, dict):
        raise ConfigError("data.paths", f"{where} is a JSON {type(row).__name__}, not an object "
                          f"with a {text_field!r} field; write one object per line")
    if text_field not in row:
        return Text("", MISSING, bad_bytes)
    value = row[text_field]
    if value is None:
        return Text("", NULL, bad_bytes)
    if not isinstance(value, str):
        raise ConfigError("data.text_field", f"{where}: {text_field!r} holds "
                          f"{_article(type(value).__name__)} ({_short(value)}), not text; set "
                          "data.text_field to the field that holds the documents")
    return Text(value, "", bad_bytes)


def require_field(rows: Iterable[tuple[str, object, int]], text_field: str,
                  what: str) -> Iterator[Text]:
    """`text_of` for each (where, row, bad bytes), then: an input with rows of which none has
    the field is an error naming the fields its first row does have."""
    n, found, first = 0, False, {}
    for where, row, bad in rows:
        text = text_of(row, text_field, where, bad)
        first = row if n == 0 else first
        n, found = n + 1, found or text.issue != MISSING
        yield text
    if n and not found:
        fields = ", ".join(map(str, first)) or "none"
        raise ConfigError("data.text_field", f"{what}: none of its {n} rows has a {text_field!r} "
                          f"field (the first row's fields: {fields}); set data.text_field to "
                          "the field that holds the documents")


def txt_rows(path: str) -> Iterator[Text]:
    """A text file is one document; an empty one yields none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError("data.paths", f"cannot read {path}: {e.strerror or e}") from e
    if data:
        text, bad = decode_utf8(data)
        yield Text(text, "", bad)


def _json_values(path: str) -> Iterator[tuple[str, object, int]]:
    """(where, value, bad bytes) per JSON line, or per element of a .json file's top array."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
            f.seek(0)
            if path.endswith(".json") and head.startswith(b"["):
                text, bad = decode_utf8(f.read())
                try:
                    items = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError("data.paths", f"{path}: invalid JSON at line {e.lineno} "
                                      f"column {e.colno}: {e.msg}") from None
                # the file's replaced bytes are counted once, with its first item
                yield from ((f"{path} item {i}", item, bad if i == 0 else 0)
                            for i, item in enumerate(items))
                return
            for n, line in enumerate(f, 1):
                text, bad = decode_utf8(line)
                text = (text.lstrip("\ufeff") if n == 1 else text).strip()  # BOM, newline
                if not text:
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError("data.paths", f"{path} line {n} is not valid JSON: "
                                      f"{e.msg} (column {e.colno}); fix or remove that line "
                                      "(.jsonl: one object per line)") from None
                yield f"{path} line {n}", value, bad
    except OSError as e:
        raise ConfigError("data.paths", f"cannot read {path}: {e.strerror or e}") from e


def json_rows(path: str, text_field: str) -> Iterator[Text]:
    return require_field(_json_values(path), text_field, path)


def parquet_rows(path: str, text_field: str) -> Iterator[Text]:
    """The text column of a parquet file, read in record batches (only that column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError("data.paths", f"cannot read {path}: {e}") from None
    if table.metadata.num_rows == 0:
        return
    schema = table.schema_arrow
    if text_field not in schema.names:
        raise ConfigError("data.text_field", f"{path} has no column {text_field!r} (columns: "
                          f"{', '.join(schema.names)}); set data.text_field to the text column")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise ConfigError("data.text_field", f"{path}: column {text_field!r} holds {kind}, not "
                          "text; set data.text_field to the text column")
    try:
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield Text("", NULL, 0) if value is None else Text(value, "", 0)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError("data.paths", f"cannot read {path}: {e}") from None


def input_notes(inputs: tuple[str, ...], text_field: str, source: np.ndarray, issue: np.ndarray,
                has_text: np.ndarray, empty: str = "empty file",
                counts: np.ndarray | None = None) -> list[tuple[str, str]]:
    """(input, what was skipped) for each input that lost rows or gave no text; per row,
    `source` is the index of its input, `issue` its Text.issue, `has_text` text is non-empty;
    an input without rows is noted as `empty`. `counts`: how many rows each entry stands for
    (default one each: the build passes one entry per distinct (source, issue, has_text))."""
    counts = np.ones(len(source), np.int64) if counts is None else counts
    notes = []
    for i, name in enumerate(inputs):
        mine = (source == i) & (issue != EMPTY)
        rows = int(counts[mine].sum())
        if rows == 0:
            notes.append((name, empty))
            continue
        kinds = [(int(counts[mine & (issue == kind)].sum()), label) for kind, label in
                 ((MISSING, f"without {text_field!r}"), (NULL, f"with {text_field!r} null"))]
        kinds = [(n, label) for n, label in kinds if n]
        if len(kinds) == 1:  # e.g. "3 of 40 rows without 'text'"
            lost = f"{kinds[0][0]} of {rows} rows {kinds[0][1]}"
        else:  # e.g. "3 of 40 rows: 2 without 'text', 1 with 'text' null"
            lost = (f"{sum(n for n, _ in kinds)} of {rows} rows: "
                    + ", ".join(f"{n} {label}" for n, label in kinds)) if kinds else ""
        if not (mine & has_text).any():
            notes.append((name, f"no text in its {rows} rows" + (f"; {lost}" if lost else "")))
        elif lost:
            notes.append((name, lost))
    return notes


def _article(noun: str) -> str:
    """`noun` with its indefinite article: "an int", "a float"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"
