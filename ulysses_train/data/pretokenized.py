"""Pre-tokenized sources (`data.sources[i].kind = megatron | tokens`): documents of token ids
read in place, never tokenized and never copied (docs/data.md, "Pre-tokenized sources").

- megatron: `PREFIX.idx` + `PREFIX.bin` (megatron_index.py); the documents are the index's.
- tokens, flat files: `.npy` (dtype from its header) or raw `.bin` (dtype from the `dtype` key),
  memory-mapped; documents end after each EOS id (the EOS belongs to the document it ends; a
  trailing run without EOS is a last document).
- tokens, list columns: `.arrow` files (IPC file or stream format), saved Hugging Face dataset
  directories (`Dataset.save_to_disk`), `.parquet` files and `hf_name` datasets, whose
  `ids_field` column holds one list of ids per document. Arrow is memory-mapped and the column's
  flat values buffer is used in place, one part per record batch (batches are separate buffers).
  Parquet is compressed, so it cannot be mapped: `datasets` converts it once into Arrow files in
  ITS cache (HF_DATASETS_CACHE, about the size of the ids), which are then mapped; so does a
  Hub dataset. Our cache holds no token data either way.

What needs every token read once (EOS positions of flat files; the smallest and largest id, for
the vocabulary check) is scanned in chunks of SCAN_TOKENS and cached as an index only (offsets
`.npy` files, ids in meta.json) under `pretok-<key>` (cache.py), keyed by the inputs' paths,
sizes, mtimes, dtype, EOS and max_docs: a second open reads the index instead of the data.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..config.errors import ConfigError
from ..config.schema import TOKEN_DTYPES, SourceConfig
from .cache import cache_key, open_or_build
from .megatron_index import read_header, read_index
from .token_columns import COLUMN_SUFFIXES, FLAT_SUFFIXES, is_dataset_dir, open_columns

SCAN_TOKENS = 1 << 24  # tokens per chunk of a scan (64 MiB of int32): bounded memory


@dataclass
class TokenDocuments:
    """The documents of one pre-tokenized source, in input order.

    `parts`: one (tokens, offsets) per contiguous token buffer, in path order: one per Megatron
    prefix or flat file, one per Arrow record batch of a list column. tokens: 1-D integer array,
    read-only and memory-mapped (never a copy); offsets: int64 (n_docs + 1,), from 0 to
    len(tokens), non-decreasing; document d = tokens[offsets[d]:offsets[d + 1]].
    """

    parts: list[tuple[np.ndarray, np.ndarray]]
    fingerprint: dict  # cheap identity of the inputs, for cache keys
    label: str  # e.g. "megatron: 2 datasets, 1.20M tokens in 3400 documents"
    n_docs: int
    n_tokens: int
    max_id: int  # largest token id in all parts (-1 when there is none)


@dataclass
class _Part:
    name: str  # the file, for messages
    tokens: np.ndarray
    offsets: np.ndarray | None  # None: a flat file, split at EOS by the scan


def _stat(paths: list[str]) -> list:
    return [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]


def _expand(src: SourceConfig, key: str) -> list[str]:
    """`src.paths` with ~ and glob patterns expanded, in order."""
    if not src.paths:
        raise ConfigError(key, f"kind={src.kind} needs at least one path")
    out = []
    for raw in src.paths:
        path = os.path.expanduser(str(raw))
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches:
            raise ConfigError(key, f"no file matches {raw!r}; check the pattern")
        out += matches
    return out


def _megatron_prefixes(src: SourceConfig, key: str) -> list[str]:
    """Dataset prefixes: a path given as PREFIX.bin or PREFIX.idx counts as PREFIX."""
    prefixes, seen = [], set()
    for path in _expand(src, key):
        if path in seen:  # Megatron's --data-path repeats a prefix to upweight it; not here
            raise ConfigError(key, f"{path} is listed twice; an entry reads each dataset once: "
                              "to upweight it, give it its own entry with a larger weight")
        seen.add(path)
        stem = path[:-4] if path.endswith((".bin", ".idx")) else path
        if stem not in prefixes:
            prefixes.append(stem)
    return prefixes


def check_paths(src: SourceConfig, where: str) -> None:
    """Every input of pre-tokenized source `src` exists (both files of a Megatron dataset,
    whose index header is checked); no token is read. The entry points' pre-check and
    `build_mixture` run it before any build. Raises ConfigError naming `{where}.paths` and
    the file."""
    key = f"{where}.paths"
    if src.kind == "megatron":
        for prefix in _megatron_prefixes(src, key):
            for suffix in (".idx", ".bin"):
                if not os.path.isfile(prefix + suffix):
                    raise ConfigError(key, f"{prefix}{suffix} not found: a Megatron dataset is "
                                      "PREFIX.bin + PREFIX.idx; check the prefix")
            read_header(Path(prefix + ".idx"), key)  # magic, version, dtype: 34 bytes read
    elif src.paths:
        paths = _expand(src, key)
        for path in paths:
            if not os.path.exists(path):
                raise ConfigError(key, f"file not found: {path}; check the path")
        if src.dtype and not any(p.endswith(".bin") for p in paths):
            raise ConfigError(f"{where}.dtype", "is for raw .bin token files, and this entry "
                              "has none (.npy, Arrow and parquet files carry their own); "
                              "remove it")


def _flat_file(path: str, src: SourceConfig, where: str) -> np.ndarray:
    """A memory-mapped `.npy` or raw `.bin` token file (1-D, integer, read-only)."""
    key = f"{where}.paths"
    if path.endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            if "empty file" not in str(e):
                raise ConfigError(key, f"cannot read {path} as .npy: {e}") from e
            tokens = np.lib.format.open_memmap(path, mode="r")  # header only: no data
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ConfigError(key, f"{path} holds a {tokens.ndim}-D {tokens.dtype} array; a "
                              "token file is one 1-D integer array of ids")
        return tokens
    if not src.dtype:
        raise ConfigError(f"{where}.dtype", f"{path} is a raw token file: set {where}.dtype to "
                          f"its type ({' | '.join(TOKEN_DTYPES)})")
    if src.dtype not in TOKEN_DTYPES:
        raise ConfigError(f"{where}.dtype", f"{src.dtype!r} (for {path}) is not one of "
                          f"{', '.join(TOKEN_DTYPES)}")
    dtype = np.dtype(src.dtype)
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise ConfigError(key, f"{path} has {size} bytes, not a multiple of {dtype.itemsize} "
                          f"({src.dtype}): it is truncated or {where}.dtype is wrong")
    if size == 0:
        empty = np.zeros(0, dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r")


def _flat_eos(src: SourceConfig, where: str, path: str, tokens: np.ndarray,
              eos_id: int | None, vocab_limit: int) -> int:
    """The id that ends documents in flat file `path`."""
    eos = src.eos_id if src.eos_id != -1 else eos_id
    if eos is None:
        raise ConfigError(f"{where}.eos_id", f"{path} is a flat token file, split into documents "
                          f"at an EOS id, and there is no tokenizer to take it from; set "
                          f"{where}.eos_id")
    info = np.iinfo(tokens.dtype)
    if not (0 <= eos < vocab_limit and info.min <= eos <= info.max):
        raise ConfigError(f"{where}.eos_id", f"EOS id {eos} cannot occur in {path} "
                          f"({tokens.dtype}, vocabulary {vocab_limit}); give the id that ends "
                          "its documents")
    return int(eos)


def _open_parts(src: SourceConfig, where: str, eos_id: int | None,
                vocab_limit: int) -> tuple[list[_Part], dict, str, int | None]:
    """The parts of `src` (tokens mapped, offsets where known), its fingerprint, its label's
    unit, and the EOS of its flat files (None if it has none). Reads indexes, not tokens."""
    key = f"{where}.paths"
    if src.kind == "megatron":
        prefixes = _megatron_prefixes(src, key)
        parts = [_Part(p + ".bin", *read_index(p, key)) for p in prefixes]
        files = _stat([q for p in prefixes for q in (p + ".idx", p + ".bin")])
        return parts, {"files": files}, f"{len(prefixes)} datasets", None
    if src.kind != "tokens":
        raise ConfigError(f"{where}.kind", f"{src.kind!r} is not a pre-tokenized kind "
                          "(megatron | tokens)")
    if src.hf_name:
        found, ident = open_columns(src, where, None)
        return [_Part(*p) for p in found], ident, f"dataset {src.hf_name!r}", None
    parts, files, eos, paths = [], [], None, _expand(src, key)
    for path in paths:
        if path.endswith(FLAT_SUFFIXES) and os.path.isfile(path):
            tokens = _flat_file(path, src, where)
            eos = _flat_eos(src, where, path, tokens, eos_id, vocab_limit)
            parts.append(_Part(path, tokens, None))
            files += _stat([path])
        elif (path.endswith(COLUMN_SUFFIXES) and os.path.isfile(path)) or is_dataset_dir(path):
            found, ident = open_columns(src, where, path)
            parts += [_Part(*p) for p in found]
            files += ident["files"]
        elif not os.path.exists(path):
            raise ConfigError(key, f"file not found: {path}; check the path")
        else:
            raise ConfigError(key, f"{path}: unknown token file type; use .npy, .bin (with "
                              "dtype), .arrow, .parquet or a saved Hugging Face dataset dir")
    return parts, {"files": files}, f"{len(paths)} inputs", eos


def _scan(tokens: np.ndarray, eos: int | None, budget: int) -> tuple[np.ndarray | None, int, int]:
    """One chunked pass over `tokens`: (document ends after each EOS, or None when `eos` is None;
    smallest id; largest id), over the first `budget` documents only (0: no limit).
    Memory: one chunk of SCAN_TOKENS plus the ends found."""
    ends, lo, hi, n = [], np.iinfo(np.int64).max, -1, len(tokens)
    for start in range(0, n, SCAN_TOKENS):
        chunk = tokens[start:start + SCAN_TOKENS]
        if eos is not None:
            hits = np.flatnonzero(chunk == eos) + (start + 1)
            if budget:
                hits = hits[:budget - sum(len(e) for e in ends)]
            ends.append(hits)
            if budget and sum(len(e) for e in ends) == budget:
                chunk = chunk[:int(hits[-1]) - start] if len(hits) else chunk[:0]
                n = start + len(chunk)
        if len(chunk):
            lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
        if start + len(chunk) >= n:
            break
    if eos is None:
        return None, lo, hi
    found = np.concatenate([[0], *ends]).astype(np.int64)
    if found[-1] < n:  # a trailing run without EOS is a last document
        found = np.append(found, n)
    return found, lo, hi


def _index(parts: list[_Part], eos: int | None, max_docs: int) -> Callable[[Path], dict]:
    """The cache build: scan every part, write flat parts' offsets, record the id range."""
    def build(tmp: Path) -> dict:
        entries, left = [], max_docs
        for i, part in enumerate(parts):
            if max_docs and left == 0:
                entries.append({"n_docs": 0, "n_tokens": 0, "min_id": 0, "max_id": -1})
                continue
            offsets = part.offsets
            if offsets is not None:
                offsets = offsets[:left + 1] if max_docs else offsets
                _, lo, hi = _scan(part.tokens[:offsets[-1]], None, 0)
            else:
                offsets, lo, hi = _scan(part.tokens, eos, left if max_docs else 0)
                np.save(tmp / f"part{i}_offsets.npy", offsets)
            n_docs = len(offsets) - 1
            left -= n_docs
            entries.append({"n_docs": n_docs, "n_tokens": int(offsets[-1]), "min_id": lo,
                            "max_id": hi})
        return {"n_tokens": {}, "tokenizer_files": [], "parts": entries}
    return build


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else str(n)


def open_token_documents(src: SourceConfig, *, where: str, vocab_limit: int, eos_id: int | None,
                         cache_root: Path, log: Callable[[str], None],
                         is_main: bool) -> TokenDocuments:
    """Open the pre-tokenized source `src` (kind megatron or tokens) without copying its tokens.

    `where`: the config key errors blame (e.g. "data.sources[1]"); `vocab_limit`: every id must
    be below it; `eos_id`: the tokenizer's EOS, used for flat files when `src.eos_id` is -1
    (None: no tokenizer). The first open scans what needs scanning and caches the index under
    `cache_root`; later opens (any process) read it. `src.max_docs` > 0 keeps only the first
    max_docs documents over all parts. Raises ConfigError naming the file for every bad input.
    """
    say = log if is_main else (lambda _: None)
    parts, ident, unit, eos = _open_parts(src, where, eos_id, vocab_limit)
    fingerprint = {"kind": src.kind, **ident, "dtype": src.dtype, "eos": eos,
                   "ids_field": src.ids_field, "max_docs": src.max_docs}
    path, meta, built = open_or_build(Path(cache_root), f"pretok-{cache_key(fingerprint)}",
                                      _index(parts, eos, src.max_docs), log=say,
                                      is_main=is_main)
    out = []
    for i, (part, entry) in enumerate(zip(parts, meta["parts"])):
        if part.offsets is None and entry["n_docs"] > 0:
            offsets = np.load(path / f"part{i}_offsets.npy")
        elif part.offsets is None:
            offsets = np.zeros(1, np.int64)
        else:
            offsets = np.asarray(part.offsets[:entry["n_docs"] + 1], dtype=np.int64)
        if entry["max_id"] >= vocab_limit:
            raise ConfigError(f"{where}.paths", f"{part.name} holds token id {entry['max_id']}, "
                              f"but the model's vocabulary has {vocab_limit} ids; raise "
                              "model.vocab_size or use data tokenized for this vocabulary")
        if entry["min_id"] < 0:
            raise ConfigError(f"{where}.paths", f"{part.name} holds the negative token id "
                              f"{entry['min_id']}; it is damaged or its dtype is wrong")
        out.append((part.tokens[:int(offsets[-1])], offsets))
    n_docs = sum(len(o) - 1 for _, o in out)
    n_tokens = sum(len(t) for t, _ in out)
    label = f"{src.kind}: {unit}, {_count(n_tokens)} tokens in {n_docs} documents"
    say(f"data: {'indexed' if built else 'index cached'} {path.name}: {label}")
    return TokenDocuments(out, fingerprint, label, n_docs, n_tokens,
                          max((e["max_id"] for e in meta["parts"]), default=-1))
