"""Token-id list columns of Arrow data, used in place (pretokenized.py, kind=tokens).

An Arrow list column is a flat values buffer plus row offsets; on a memory-mapped table both
are zero-copy numpy views of the mapped file, so a document is a slice of the values. Each
record batch has its own buffers, hence one part per batch. Sources:
- `.arrow`: an Arrow IPC file (Feather v2) or stream (what `datasets` writes), memory-mapped;
- a saved Hugging Face dataset directory (`Dataset.save_to_disk`; a DatasetDict gives its
  `hf_split`): `datasets.load_from_disk`, memory-mapped;
- `.parquet` and `hf_name`: `datasets` converts them once into Arrow files in its own cache
  (HF_DATASETS_CACHE), which are memory-mapped (parquet is compressed: nothing maps it as ids).
"""
from __future__ import annotations

import glob
import os

import numpy as np

from ..config.errors import ConfigError
from ..config.schema import SourceConfig

FLAT_SUFFIXES = (".npy", ".bin")
COLUMN_SUFFIXES = (".arrow", ".parquet")


def is_dataset_dir(path: str) -> bool:
    """Whether `path` is a directory written by `Dataset(Dict).save_to_disk`."""
    return any(os.path.isfile(os.path.join(path, f))
               for f in ("state.json", "dataset_dict.json"))


def _stat_tree(path: str) -> list:
    files = [path] if os.path.isfile(path) else sorted(
        p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))
    return [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]


def _arrow_file(path: str, key: str):
    """The table of an Arrow IPC file or stream, memory-mapped."""
    import pyarrow as pa

    try:
        try:
            return pa.ipc.open_file(pa.memory_map(path)).read_all()
        except pa.ArrowInvalid:  # not the file format: the stream format datasets writes
            return pa.ipc.open_stream(pa.memory_map(path)).read_all()
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(key, f"cannot read {path} as Arrow: {e}") from e


def _load(src: SourceConfig, path: str | None, key: str):
    """The datasets.Dataset of a saved dir, a parquet file or (path None) `src.hf_name`."""
    import datasets

    if path is None:
        return datasets.load_dataset(os.path.expanduser(src.hf_name), src.hf_config or None,
                                     split=src.hf_split)
    if path.endswith(".parquet"):
        return datasets.Dataset.from_parquet(path)
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if src.hf_split not in ds:
            raise ConfigError(key, f"{path} has splits {', '.join(ds)}, not "
                              f"{src.hf_split!r}; set hf_split")
        ds = ds[src.hf_split]
    return ds


def _datasets_table(src: SourceConfig, path: str | None, key: str):
    """(memory-mapped Arrow table, datasets' fingerprint of it) of a saved dataset dir, a
    parquet file (converted by `datasets` into its cache) or, for path None, the dataset
    `src.hf_name`."""
    from .build import _quiet_datasets  # datasets' progress bars and logs off, as in a build

    what = path or f"dataset {src.hf_name!r}"
    try:
        with _quiet_datasets():
            ds = _load(src, path, key)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(key, f"cannot read {what}: {type(e).__name__}: {e}") from e
    if ds._indices is not None:  # a selected/shuffled view: rows are not in storage order
        raise ConfigError(key, f"{what} is a view with an indices mapping; save it with "
                          "flatten_indices() first")
    return ds.data.table, ds._fingerprint


def _chunk_part(chunk, name: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of one list-array chunk, zero-copy for the tokens."""
    import pyarrow as pa

    if chunk.null_count:
        raise ConfigError(key, f"{name} has {chunk.null_count} rows without ids (null); drop "
                          "them or make them empty lists")
    if pa.types.is_fixed_size_list(chunk.type):
        size = chunk.type.list_size
        offs = np.arange(len(chunk) + 1, dtype=np.int64) * size + chunk.offset * size
    else:
        offs = chunk.offsets.to_numpy()  # respects the chunk's own offset; zero-copy
    base, end = int(offs[0]), int(offs[-1])
    values = chunk.values.slice(base, end - base)
    if values.null_count:
        raise ConfigError(key, f"{name} has {values.null_count} null token ids")
    tokens = values.to_numpy(zero_copy_only=True)  # read-only view of the mapped buffer
    return tokens, (offs - base).astype(np.int64)


def open_columns(src: SourceConfig, where: str, path: str | None):
    """([(name, tokens, offsets) per record batch], {"files": stat fingerprint}) of the
    `src.ids_field` column of `path` (an .arrow/.parquet file or a saved dataset dir) or, for
    path None, of the dataset `src.hf_name`. ConfigError naming the input if it cannot be read,
    lacks the column, or the column is not a list of integers."""
    import pyarrow as pa

    key = f"{where}.hf_name" if path is None else f"{where}.paths"
    name = path or f"dataset {src.hf_name!r}"
    if path is not None and path.endswith(".arrow"):
        table, content = _arrow_file(path, key), ""
    else:
        table, content = _datasets_table(src, path, key)
    if src.ids_field not in table.column_names:
        raise ConfigError(f"{where}.ids_field", f"{name} has no column {src.ids_field!r} "
                          f"(columns: {', '.join(table.column_names)}); set ids_field")
    column = table.column(src.ids_field)
    kind = column.type
    is_list = (pa.types.is_list(kind) or pa.types.is_large_list(kind)
               or pa.types.is_fixed_size_list(kind))
    if not is_list or not pa.types.is_integer(kind.value_type):
        raise ConfigError(f"{where}.ids_field", f"{name} column {src.ids_field!r} is {kind}, "
                          "not a list of integer token ids")
    parts = [(name, *_chunk_part(c, name, key)) for c in column.chunks if len(c)]
    if path is None:
        local = os.path.expanduser(src.hf_name)
        files = _stat_tree(local) if os.path.isdir(local) else []
        # a Hub dataset has no local files: datasets' fingerprint of what it loaded stands in
        ident = {"files": files, "hf": [src.hf_name, src.hf_config, src.hf_split, content]}
    else:
        ident = {"files": _stat_tree(path)}
    return parts, ident
