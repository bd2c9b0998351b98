"""Export a checkpoint as a Hugging Face model dir: `python -m ulysses_train.export CHECKPOINT
OUT_DIR [--dtype bf16|fp32] [--max-shard-size 5GB]`.

CHECKPOINT is a run dir (its `checkpoints/latest`), its `checkpoints/` dir or a `step_*` dir
(init_from.resolve, the rule model.init_from follows) written by any layout (tp, sp, dp, zero
0/2/3): DCP reassembles each tensor from whatever shards hold it. OUT_DIR gets
`model-0000k-of-0000n.safetensors` shards (at most --max-shard-size each, unless one tensor is
bigger) with `model.safetensors.index.json`, `config.json` and `generation_config.json`
(hf/export_config.py; with model.init_from, the source's generation config, special ids and
served context, recorded in meta.json: hf/source.py), and the tokenizer files the run used
(`<run dir>/tokenizer/`).

Memory: tensors are read one at a time (a one-entry DCP load into a fresh full-size tensor),
cut to the unpadded vocabulary, cast, and written straight into their shard file, whose header
was laid out beforehand from DCP's metadata (shapes and dtypes): peak memory is about one
tensor, never a second copy of the model. The safetensors layout (8-byte little-endian header
length, JSON header with dtype / shape / data_offsets, then the raw little-endian bytes) is
the format's specification (github.com/huggingface/safetensors, "Format").

Checks before anything is written: the checkpoint is verified against its manifest.json, every
file's size and content hash (init_from.verify_checkpoint, as `model.init_from` and resume
verify), since DCP has no checksums and would export flipped bytes silently.

Bad input is one line `error: <what>: ...` on stderr and exit code 2; an I/O error while reading
or writing is one line and exit code 1, as is a pickle in the checkpoint that names anything
outside checkpoint/safe_read.py's allow-list (RefusedPickle, naming the file; nothing run).
Whatever fails after OUT_DIR was created removes the files and directories this export created
(OUT_DIR was new or empty: nothing else is touched), so the same command can be rerun.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import sys
import warnings

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..checkpoint.safe_read import RefusedPickle, load, read_metadata
from ..checkpoint.state import load_failure
from ..checkpoint.store import read_meta
from ..config.errors import ConfigError, InputUnreadable
from ..config.schema import ModelConfig
from .export_config import hf_config_json, max_positions, special_token_ids
from .init_from import resolve, verify_checkpoint
from .names import hf_names
from .source import KEY as SOURCE
from .source import exported_ids

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ST_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32"}
PADDED = ("model.embed_tokens.weight", "lm_head.weight")  # rows = our 128-padded vocabulary
INDEX = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (transformers' units: KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError("--max-shard-size", f"{text!r} is not a size such as 5GB or 500MB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}[unit]
    if number * scale < 1:
        raise ConfigError("--max-shard-size", f"must be positive, got {text!r}")
    return int(number * scale)


def locate(checkpoint: str) -> tuple[str, str]:
    """(step dir, run dir) of CHECKPOINT; ConfigError naming what is wrong."""
    _, step = resolve(checkpoint, key="CHECKPOINT", hf=False)  # the rule init_from uses
    run_dir = os.path.dirname(os.path.dirname(step))  # <run>/checkpoints/step_N
    return step, run_dir


def read_model(step: str) -> tuple[ModelConfig, int, dict | None]:
    """(ModelConfig, trained data.seq_len, the record of model.init_from's source or None;
    hf/source.py) from the checkpoint's meta.json."""
    try:
        meta = read_meta(step)
    except ConfigError as exc:  # the same reader as resume; named by this command's argument
        raise ConfigError("CHECKPOINT", exc.message) from None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    seq_len = ((meta.get("identity") or {}).get("data") or {}).get("data.seq_len")
    if seq_len is None:
        raise ConfigError("CHECKPOINT", f"{step}/meta.json records no data.seq_len (written by "
                                        "an older version); cannot set max_position_embeddings")
    record = meta.get(SOURCE)
    return model, int(seq_len), record if isinstance(record, dict) else None


def plan_tensors(m: ModelConfig, metadata, dtype: torch.dtype) -> list[tuple[str, str, list]]:
    """[(HF name, DCP key, exported shape)] in HF order; ConfigError if a tensor is missing."""
    out = []
    for ours, theirs in hf_names(m).items():
        key = "model." + ours
        entry = metadata.get(key)
        if entry is None or not hasattr(entry, "size"):
            raise ConfigError("CHECKPOINT", f"the checkpoint has no model tensor {ours!r} "
                                            "(another model than its meta.json says?)")
        shape = list(entry.size)
        if theirs in PADDED:
            shape[0] = m.vocab_size  # drop only our 128-padding rows
        out.append((theirs, key, shape))
    return out


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def split_shards(tensors: list, dtype: torch.dtype, max_bytes: int) -> list[list]:
    """Greedy, in order: a new shard when the next tensor would pass `max_bytes` (a tensor
    larger than it gets a shard of its own), as transformers' `save_pretrained` does."""
    shards, size = [[]], 0
    for t in tensors:
        n = _nbytes(t[2], dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _unreadable(step: str, exc: BaseException) -> InputUnreadable:
    """A read of the verified checkpoint failed: no evidence of damage (exit 1, one line)."""
    return InputUnreadable("CHECKPOINT", f"{step} could not be read ({load_failure(exc)}); "
                                "nothing shows it is damaged: fix the cause and rerun")


def _load_one(step: str, key: str, entry) -> torch.Tensor:
    """One full tensor from a DCP checkpoint (any layout), read alone. InputUnreadable
    (exit 1) if DCP fails: the files matched the manifest, so that is no evidence of damage."""
    tensor = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": yes, deliberately
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load({key: tensor}, step, distributed=False)
    except RefusedPickle:  # a planted pickle: its own line, naming the file
        raise
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise _unreadable(step, exc) from exc
    return tensor


def write_shard(path: str, step: str, tensors: list, metadata, dtype: torch.dtype) -> int:
    """Write one safetensors file holding `tensors`, each loaded, cut and cast in turn;
    returns its data bytes. The caller records `path` as created before calling."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, _, shape in tensors:
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned (the format allows spaces)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, key, shape in tensors:
            t = _load_one(step, key, metadata[key])[: shape[0]].to(dtype).contiguous()
            assert list(t.shape) == shape, (name, t.shape, shape)
            f.write(t.view(-1).view(torch.uint8).numpy().data)  # raw bytes, little-endian
            del t
    return offset


def export(checkpoint: str, out_dir: str, dtype: str = "bf16", max_shard_bytes: int = 5 * 10**9,
           log=print) -> None:
    """Write the Hugging Face model dir of CHECKPOINT into OUT_DIR (see the module docstring).
    ConfigError (exit 2) for bad input; InputUnreadable / ExportWriteError (exit 1) for an
    I/O failure, after removing what this export created."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError("OUT_DIR", f"{out_dir} is a file; give a new or empty directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError("OUT_DIR", f"{out_dir} is not empty; give a new or empty directory")
    created = _make_dir(out_dir)  # first: an uncreatable OUT_DIR fails before the hashing
    try:
        _export(checkpoint, out_dir, dtype, max_shard_bytes, log, created)
    except BaseException as exc:
        _remove(created)
        if isinstance(exc, OSError):  # writing (or copying into) OUT_DIR; reads of the
            # checkpoint raise InputUnreadable instead
            where = f"{exc.filename}: " if exc.filename else ""
            raise InputUnreadable("OUT_DIR", f"writing {out_dir} failed ({where}"
                                   f"{exc.strerror or exc}); removed the files this export "
                                   "wrote: fix the cause and rerun") from exc
        raise


def _export(checkpoint: str, out_dir: str, dtype: str, max_shard_bytes: int, log,
            created: list[str]) -> None:
    """`export` into the existing, empty `out_dir`; appends every path it creates to `created`."""
    step, run_dir = locate(checkpoint)
    verify_checkpoint(step, "CHECKPOINT", hashes=False)  # sizes (stat only) before any read
    model, seq_len, record = read_model(step)
    torch_dtype = DTYPES[dtype]
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    special_ids, generation = exported_ids(record, *special_token_ids(tokenizer_dir))
    served = max_positions(model, seq_len, (record or {}).get("max_position_embeddings"))
    config = hf_config_json(model, served, dtype, special_ids,  # refuses ntk before any write
                            (record or {}).get("model_type"))
    warning = verify_checkpoint(step, "CHECKPOINT")  # every hash: one read, before any write
    if warning:
        print(warning, file=sys.stderr)
    metadata = _read_metadata(step)
    shards = split_shards(plan_tensors(model, metadata, torch_dtype), torch_dtype, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        created.append(os.path.join(out_dir, name))
        total += write_shard(created[-1], step, shard, metadata, torch_dtype)
        weight_map.update({t[0]: name for t in shard})
        log(f"wrote {name} ({len(shard)} tensors, {total / 1e6:.1f} MB so far)")
    for name, data in ((INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}),
                       ("config.json", config),
                       ("generation_config.json", generation)):
        created.append(os.path.join(out_dir, name))
        _write_json(created[-1], data)
    if not os.path.isdir(tokenizer_dir):
        print(f"warning: the run has no tokenizer/ dir ({tokenizer_dir}; data=synthetic trains "
              "without one); exporting the weights and config only", file=sys.stderr)
    elif not _copy_tokenizer(tokenizer_dir, out_dir, created):
        print(f"warning: {tokenizer_dir} holds no tokenizer files; exported the weights without "
              "a tokenizer (copy its files into the output dir yourself)", file=sys.stderr)
    log(f"exported {step} ({model.name}, {dtype}) to {out_dir}")


def _read_metadata(step: str) -> dict:
    """DCP's metadata of the (verified) checkpoint; InputUnreadable (exit 1) if it fails."""
    try:
        return read_metadata(step).state_dict_metadata
    except RefusedPickle:  # a planted pickle: its own line, naming the file
        raise
    except Exception as exc:
        raise _unreadable(step, exc) from exc


def _make_dir(out_dir: str) -> list[str]:
    """Create `out_dir` and its missing parents; return those created, outermost first.
    ConfigError `OUT_DIR: cannot create ...` if the OS refuses."""
    created, where = [], out_dir
    while not os.path.lexists(where):  # under a regular file this stops at the file
        created.insert(0, where)
        where = os.path.dirname(where)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        _remove(created)  # the parents made before the failure
        raise ConfigError("OUT_DIR", f"cannot create {out_dir}: {exc.strerror or exc}; give a "
                                     "new or empty directory where you can write") from None
    return created


def _remove(created: list[str]) -> None:
    """Remove what this export created (`created` in creation order), newest first: its files,
    then its directories, innermost first."""
    for path in reversed(created):
        try:
            os.rmdir(path) if os.path.isdir(path) else os.remove(path)
        except OSError:  # already gone, or a directory someone else put something into
            pass


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _copy_tokenizer(tokenizer_dir: str, out_dir: str, created: list[str]) -> list[str]:
    names = sorted(n for n in os.listdir(tokenizer_dir)
                   if os.path.isfile(os.path.join(tokenizer_dir, n)))
    for name in names:
        created.append(os.path.join(out_dir, name))
        shutil.copy2(os.path.join(tokenizer_dir, name), created[-1])
    return names
