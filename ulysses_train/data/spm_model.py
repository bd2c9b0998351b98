"""One edit of a serialized sentencepiece model: user-defined pieces made control pieces.

Why: sentencepiece matches user-defined symbols inside the text it encodes (control symbols
such as <s> and </s> it never does), so a model that defines, say, `<|end_of_text|>` as a
user-defined symbol and names it as EOS would turn that string in a document into the EOS id.
As a control piece it keeps its id (and `piece_to_id` still finds it) but text no longer
produces it: the string is encoded as ordinary pieces (data/tokenizer.py).

The model is a `ModelProto` (sentencepiece's src/sentencepiece_model.proto): field 1 holds the
pieces, each a message whose field 1 is the piece's text and field 3 its type (an enum,
USER_DEFINED = 4, CONTROL = 3; absent = NORMAL). Both values are one varint byte, so the edit
rewrites one byte per piece in place and no length changes. Done on the bytes, without the
`protobuf` package: sentencepiece does not depend on it, and its generated module demands a
matching protobuf runtime.
"""
from __future__ import annotations

from typing import Iterator

USER_DEFINED, CONTROL = 4, 3
_PIECES, _PIECE_TEXT, _PIECE_TYPE = 1, 1, 3  # field numbers, sentencepiece_model.proto
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5  # protobuf wire types


def _varint(buf: bytes | bytearray, i: int) -> tuple[int, int]:
    """(value, index after it) of the base-128 varint at buf[i]."""
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in buf[start:end].
    Raises ValueError for a wire type a sentencepiece model does not use (groups)."""
    i = start
    while i < end:
        tag, i = _varint(buf, i)
        wire = tag & 7
        if wire == _VARINT:
            j = _varint(buf, i)[1]
        elif wire == _BYTES:
            n, i = _varint(buf, i)
            j = i + n
        elif wire in (_FIXED64, _FIXED32):
            j = i + (8 if wire == _FIXED64 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
        if j > end:
            raise ValueError(f"a field at byte {i} runs past its message")
        yield tag >> 3, wire, i, j
        i = j


def user_defined_as_control(model: bytes, names: set[str]) -> tuple[bytes, list[str]]:
    """(`model` with each user-defined piece whose text is in `names` made a control piece,
    those pieces' texts in id order). Raises ValueError for bytes that are not a model."""
    out, changed = bytearray(model), []
    for field, wire, start, end in _fields(out, 0, len(out)):
        if field != _PIECES or wire != _BYTES:
            continue
        text, type_at = None, None
        for f, w, a, b in _fields(out, start, end):
            if f == _PIECE_TEXT and w == _BYTES:
                text = bytes(out[a:b]).decode("utf-8", "replace")
            elif f == _PIECE_TYPE and w == _VARINT:
                type_at = a
        if text in names and type_at is not None and out[type_at] == USER_DEFINED:
            out[type_at] = CONTROL
            changed.append(text)
    return bytes(out), changed
