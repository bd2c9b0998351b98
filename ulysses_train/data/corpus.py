"""Where documents come from: the stdlib, local files, or a (streamed) Hugging Face dataset.

Each source is described by a `Corpus`: a cheap fingerprint of its inputs (for the cache key;
computing it reads no document), and a module-level generator yielding one row per input
document, `{"text", "hash", "n_bytes", "bad_bytes", "source", "issue"}`, in a deterministic
order. `hash` is a stable number in [0, 1) that decides the train/val split (by relative path
for the stdlib, by content otherwise, so duplicates never straddle the split), independently of
how many documents are read. `source` indexes `Corpus.inputs` (the file or dataset the row came
from) and `issue` says why a row without text was skipped (readers.py), so the build can report
each input's skipped rows and empty files. User mistakes become `ConfigError`s naming the key to
fix, the file and the line. Lists are passed to the generator as tuples: `datasets` shards list
arguments into one generator call per element, which would restart `max_docs` at every file.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..config.errors import ConfigError
from ..config.schema import DataConfig
from .paths import PARQUET_SUFFIXES, TEXT_SUFFIXES, resolve_paths
from .readers import (
    EMPTY,
    Text,
    decode_utf8,
    json_rows,
    parquet_rows,
    require_field,
    txt_rows,
)

__all__ = ["Corpus", "corpus_for", "decode_utf8", "stable_hash", "stdlib_files"]

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass
class Corpus:
    """One source of documents, before any reading; see the module docstring."""

    kind: str  # stdlib | files | hf
    label: str  # how describe() names it
    unit: str  # what one generated row is: "files" or "documents"
    fingerprint: dict  # everything about the inputs that the cache depends on
    generate: Callable[..., Iterator[dict]]  # module-level, as datasets.from_generator wants
    gen_kwargs: dict = field(default_factory=dict)
    blame: str = "data.paths"  # the key to name when the corpus turns out to be empty
    inputs: tuple[str, ...] = ()  # what a row's `source` indexes; () = no per-input report
    text_field: str = ""


def stable_hash(data: bytes) -> float:
    """A number in [0, 1) that depends only on `data` (not on Python's per-process hash seed)."""
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big") / 2.0 ** 64


def _row(text: str, key: bytes, bad_bytes: int = 0, source: int = 0, issue: str = "") -> dict:
    return {"text": text, "hash": stable_hash(key), "n_bytes": len(text.encode("utf-8")),
            "bad_bytes": bad_bytes, "source": source, "issue": issue}


# ---------------------------------------------------------------------------------------- stdlib

def stdlib_files(root: str) -> list[str]:
    """Relative (posix) paths of the `*.py` files under `root`, sorted, without installed packages.

    site-packages / dist-packages are pruned so installing a package never changes the corpus.
    """
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        rel_dir = os.path.relpath(directory, root)
        for name in files:
            if name.endswith(".py"):
                rel = os.path.normpath(os.path.join(rel_dir, name))
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _stdlib_rows(root: str, rel_paths: tuple[str, ...]) -> Iterator[dict]:
    for rel in rel_paths:
        with open(os.path.join(root, rel), "rb") as f:
            text, bad = decode_utf8(f.read())
        yield _row(text, rel.encode(), bad)


def stdlib_corpus(cfg: DataConfig, root: str | None = None) -> Corpus:
    root = root or sysconfig.get_paths()["stdlib"]
    rel_paths = stdlib_files(root)
    if cfg.max_docs > 0:
        rel_paths = rel_paths[:cfg.max_docs]
    sizes = [os.path.getsize(os.path.join(root, rel)) for rel in rel_paths]
    return Corpus(
        kind="stdlib", label="stdlib", unit="files",
        fingerprint={"python": sys.version, "files": list(zip(rel_paths, sizes))},
        generate=_stdlib_rows, gen_kwargs={"root": root, "rel_paths": tuple(rel_paths)},
        blame="data.max_docs")


# ----------------------------------------------------------------------------------------- files

def _texts(path: str, text_field: str) -> Iterator[Text]:
    if path.endswith(TEXT_SUFFIXES):
        return txt_rows(path)
    if path.endswith(PARQUET_SUFFIXES):
        return parquet_rows(path, text_field)
    return json_rows(path, text_field)


def _file_rows(paths: tuple[str, ...], text_field: str, max_docs: int) -> Iterator[dict]:
    """Rows of every file in order, the first `max_docs` documents (0 = all) in all."""
    n = 0
    for source, path in enumerate(paths):
        rows = 0
        for text, issue, bad in _texts(path, text_field):
            if not issue:
                if max_docs and n >= max_docs:
                    return
                n += 1
            rows += 1
            yield _row(text, text.encode(), bad, source, issue)
        if rows == 0:
            yield _row("", b"", source=source, issue=EMPTY)


def _stat_fingerprint(paths: list[str]) -> list:
    return [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]


def files_corpus(cfg: DataConfig) -> Corpus:
    paths = resolve_paths(list(cfg.paths))
    if not paths:
        raise ConfigError("data.paths", "data=files needs at least one path, "
                          "e.g. data.paths=[corpus.jsonl]")
    return Corpus(
        kind="files", label="files", unit="documents",
        fingerprint={"files": _stat_fingerprint(paths), "text_field": cfg.text_field},
        generate=_file_rows, inputs=tuple(paths), text_field=cfg.text_field,
        gen_kwargs={"paths": tuple(paths), "text_field": cfg.text_field,
                    "max_docs": cfg.max_docs})


# -------------------------------------------------------------------------------------------- hf

def _hf_rows(name: str, config: str, split: str, text_field: str,
             max_docs: int) -> Iterator[dict]:
    import datasets

    try:
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:
        raise ConfigError("data.hf_name", f"cannot load {name!r} (config {config!r}, split "
                          f"{split!r}): {type(e).__name__}: {e}; check the name and config, "
                          "and that this machine can reach the Hub") from e
    features = getattr(stream, "features", None)
    if features is not None and text_field not in features:  # known without reading a row
        raise ConfigError("data.text_field", f"dataset {name!r} has no field {text_field!r} "
                          f"(fields: {', '.join(features)}); set data.text_field to the text "
                          "column")
    if max_docs > 0:
        stream = stream.take(max_docs)
    rows = ((f"dataset {name!r} row {i}", row, 0)
            for i, row in enumerate(_guarded(stream, "data.hf_name", repr(name))))
    empty = True
    for text, issue, _ in require_field(rows, text_field, f"dataset {name!r}"):
        empty = False
        yield _row(text, text.encode(), issue=issue)
    if empty:
        yield _row("", b"", issue=EMPTY)


def _guarded(stream, key: str, what: str) -> Iterator[dict]:
    """Iterate a datasets stream, turning its read errors into a ConfigError about `key`."""
    it = iter(stream)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(key, f"cannot read {what}: {type(e).__name__}: {e}") from e
        yield row


def hf_corpus(cfg: DataConfig) -> Corpus:
    if not cfg.hf_name:
        raise ConfigError("data.hf_name",
                          "data=hf needs a dataset name, e.g. data.hf_name=wikitext")
    name = os.path.expanduser(cfg.hf_name)
    fingerprint: dict = {"name": name, "config": cfg.hf_config, "split": cfg.hf_split,
                         "text_field": cfg.text_field}
    if os.path.isdir(name):  # a local dataset: its files are its identity
        local = sorted(glob.glob(os.path.join(name, "**", "*"), recursive=True))
        fingerprint["files"] = _stat_fingerprint([p for p in local if os.path.isfile(p)])
    return Corpus(
        kind="hf", label=f"hf:{cfg.hf_name}", unit="documents", fingerprint=fingerprint,
        generate=_hf_rows, blame="data.hf_name", inputs=(f"dataset {cfg.hf_name!r}",),
        text_field=cfg.text_field,
        gen_kwargs={"name": name, "config": cfg.hf_config, "split": cfg.hf_split,
                    "text_field": cfg.text_field, "max_docs": cfg.max_docs})


def corpus_for(cfg: DataConfig) -> Corpus:
    """The Corpus for `cfg.name` (anything but synthetic); checks paths, reads no document."""
    makers = {"stdlib": stdlib_corpus, "files": files_corpus, "hf": hf_corpus}
    if cfg.name not in makers:
        raise ConfigError("data.name", f"{cfg.name!r} is not one of stdlib, files, hf, synthetic")
    return makers[cfg.name](cfg)
