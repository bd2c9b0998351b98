"""A Hugging Face safetensors model directory, checked from its headers alone (no tensor data).

What `model.init_from=DIR` accepts as weights (transformers' own layout):
- `model.safetensors` alone, or
- shards `model-0000X-of-0000N.safetensors` with `model.safetensors.index.json`, whose
  `weight_map` names the shard of every tensor.

Every check here reads only the index and each file's header (8 bytes of length, then a JSON
table of name -> dtype, shape, byte offsets; https://huggingface.co/docs/safetensors), so a bad
directory fails in milliseconds, before the model is built. Why so strict about the files: DCP's
`HuggingFaceStorageReader`, which loads the tensors, reads *every* `*.safetensors` in the
directory and silently keeps one of two tensors with the same name, so a stray file (Mistral's
repos ship `consolidated.safetensors` next to the HF shards) or a duplicate would load the wrong
values without a word. Refused: a shard the index names but the directory lacks, a
`*.safetensors` file the index does not name, a tensor in two files, an index that disagrees
with the headers, and several files without an index. Each file's size must be what its header
says (8 + header length + the end of the last tensor's data), so an interrupted download
(header intact, data short) or trailing bytes are refused here, not deep inside the load.

Why a header reader of our own rather than `safetensors.safe_open`: safe_open enforces the same
layout rules, but reports a short or overlong file only as "incomplete metadata, file not fully
covered" and does not expose the byte offsets; reading the header (8 bytes of length, then JSON)
lets each refusal name the file, the tensor and the byte counts, and costs ~60 lines.

Errors are `ConfigError("model.init_from", ...)`: one line, exit 2.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from ..config.architecture import head_dim
from ..config.errors import ConfigError
from .names import HEAD, hf_names

KEY = "model.init_from"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Bits per element of each safetensors dtype (the library's Dtype::bitsize, safetensors 0.8).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
              "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# Non-weights some older Llama conversions saved: transformers ignores them on load, and so do we.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
MAX_NAMED = 3  # tensors named in one error line before "and N more"
# Gemma3ForConditionalGeneration checkpoints: (decoder prefix, untied head) of the language
# model, as transformers 5 saves it (and the hub has it: `language_model.model.*`) or holds
# it in memory (`model.language_model.*`); the vision tower and projector are not ours.
MULTIMODAL = (("language_model.model.", "language_model.lm_head.weight"),
              ("model.language_model.", HEAD))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: its file (absolute path), shape and safetensors dtype ("BF16")."""

    file: str
    shape: tuple[int, ...]
    dtype: str


def fail(message: str) -> ConfigError:
    return ConfigError(KEY, message)


def listing(names, limit: int = MAX_NAMED) -> str:
    """'a, b, c and 4 more' (sorted, at most `limit` named)."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def is_hf_dir(path: str) -> bool:
    """A directory that looks like a Hugging Face model: config.json or any safetensors file."""
    return os.path.isfile(os.path.join(path, "config.json")) or any(
        n.endswith(SUFFIX) or n == INDEX for n in os.listdir(path))


def read_header(file: str) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of one safetensors file, read from its
    header alone and held to the file's size by `check_layout`.

    Format (https://github.com/huggingface/safetensors, README "Format"): 8 bytes of
    little-endian u64 header length N, N bytes of JSON, then the byte buffer that every
    `data_offsets` [begin, end) is relative to. ConfigError for an unreadable, truncated or
    overlong file."""
    try:
        size = os.path.getsize(file)
    except OSError as exc:  # e.g. a dangling symlink into a Hugging Face cache
        raise fail(f"{file} is unreadable ({exc.strerror}); download it again") from exc
    if size < 8:
        raise fail(f"{file} is truncated ({size} bytes, its header length alone needs 8); "
                   "download it again")
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header of {length} bytes")
            raw = f.read(length) if 8 + length <= size else None
        if raw is not None:  # else cut inside the header, reported below
            header = json.loads(raw)
            header.pop("__metadata__", None)
            for entry in header.values():
                _normalise(entry)
    except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError) as exc:
        raise fail(f"{file} is not a readable safetensors file ({type(exc).__name__}: "
                   f"{str(exc)[:80]}); re-download it") from exc
    if raw is None:
        raise fail(f"{file} is truncated ({size} bytes, its header alone needs {8 + length}); "
                   "download it again")
    check_layout(file, header, size, 8 + length)
    return header


def _normalise(entry: dict) -> None:
    """One header entry's fields as Python ints and tuples; ValueError/TypeError/KeyError if
    they are not a dtype string, non-negative dims and 0 <= begin <= end."""
    if not isinstance(entry["dtype"], str):
        raise TypeError(f"dtype {entry['dtype']!r}")
    entry["shape"] = tuple(int(d) for d in entry["shape"])
    begin, end = (int(o) for o in entry["data_offsets"])
    if min(entry["shape"], default=0) < 0 or not 0 <= begin <= end:
        raise ValueError(f"shape {list(entry['shape'])}, data_offsets {[begin, end]}")
    entry["data_offsets"] = (begin, end)


def check_layout(file: str, header: dict[str, dict], size: int, data_start: int) -> None:
    """Each tensor's data_offsets span its shape x dtype size, the spans tile the byte buffer
    (which starts at byte `data_start` = 8 + header length) from 0 without gap or overlap, and
    the file (`size` bytes) ends where the last tensor does: the rules the safetensors library
    enforces when it opens the file (an interrupted download fails there with "incomplete
    metadata, file not fully covered", deep inside the load). ConfigError naming `file`."""
    spans = []
    for tensor, entry in header.items():
        begin, end = entry["data_offsets"]
        bits = DTYPE_BITS.get(entry["dtype"])
        if bits is not None:  # an unknown dtype is refused by name in check_tensors
            need = math.prod(entry["shape"]) * bits // 8
            if end - begin != need:
                raise fail(f"{file}: tensor {tensor}'s data_offsets {[begin, end]} span "
                           f"{end - begin} bytes, its shape {list(entry['shape'])} x "
                           f"{entry['dtype']} needs {need}; the file is damaged, download it "
                           "again")
        spans.append((begin, end, tensor))
    covered = 0
    for begin, end, tensor in sorted(spans):
        if begin != covered:
            raise fail(f"{file}: tensor {tensor} starts at byte {begin} of the data, not at "
                       f"{covered} where the previous one ends; the file is damaged, download "
                       "it again")
        covered = end
    need = data_start + covered
    if size < need:
        raise fail(f"{file} is truncated ({size} bytes, its header needs {need}); download it "
                   "again")
    if size > need:
        raise fail(f"{file} has {size - need} bytes after its last tensor ({size} bytes, its "
                   f"header needs {need}); the file is damaged, download it again")


def _read_index(path: str) -> dict[str, str]:
    where = os.path.join(path, INDEX)
    try:
        with open(where) as f:
            weight_map = json.load(f)["weight_map"]
        return {str(k): str(v) for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise fail(f"{where} is unreadable ({type(exc).__name__}); it must hold a "
                   "\"weight_map\" of tensor name -> shard file") from exc


def _check_files(path: str, files: list[str], weight_map: dict[str, str] | None) -> None:
    """The set of safetensors files is exactly what the index (or the single-file layout) says."""
    if weight_map is None:
        if not files:
            bins = any(n.endswith(".bin") for n in os.listdir(path))
            raise fail(f"{path} has no {SINGLE} (nor {INDEX} with shards)" + (
                ", only PyTorch .bin weights: convert them to safetensors (transformers: "
                "save_pretrained)" if bins else ": not a Hugging Face model directory with "
                "safetensors weights"))
        if files != [SINGLE]:
            raise fail(f"{path} holds {listing(files)} but no {INDEX}: with several (or other) "
                       f"safetensors files the index must say which tensor is where; keep "
                       f"{SINGLE} alone or add the index")
        return
    named = set(weight_map.values())
    missing = sorted(f for f in named if not os.path.isfile(os.path.join(path, f)))
    if missing:
        raise fail(f"{INDEX} names shard(s) {listing(missing)} missing from {path}; download "
                   "the missing shard(s)")
    stray = sorted(set(files) - named)
    if stray:
        raise fail(f"{path} holds {listing(stray)}, not named in {INDEX}: every *.safetensors "
                   "file in the directory is read, so a stray one could load wrong weights; "
                   "move it out of the directory")


def tensor_table(path: str) -> dict[str, TensorInfo]:
    """{tensor name: TensorInfo} of an HF model directory, after the file checks above."""
    files = sorted(n for n in os.listdir(path) if n.endswith(SUFFIX))
    weight_map = _read_index(path) if os.path.isfile(os.path.join(path, INDEX)) else None
    _check_files(path, files, weight_map)
    table: dict[str, TensorInfo] = {}
    for name in files:
        file = os.path.join(path, name)
        for tensor, entry in read_header(file).items():
            if tensor in table:
                raise fail(f"tensor {tensor} is in both {os.path.basename(table[tensor].file)} "
                           f"and {name}: only one may hold it (which one would load is "
                           "undefined); remove the duplicate file")
            table[tensor] = TensorInfo(file, tuple(entry["shape"]), entry["dtype"])
    if weight_map is not None:
        wrong = sorted(t for t, f in weight_map.items()
                       if t not in table or os.path.basename(table[t].file) != f)
        unlisted = sorted(set(table) - set(weight_map))
        if wrong or unlisted:
            what = (f"places {listing(wrong)} in the wrong shard" if wrong
                    else f"does not list {listing(unlisted)}")
            raise fail(f"{INDEX} disagrees with the shards' headers: it {what}; the index and "
                       "the files come from different downloads")
    return table


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{our parameter name: shape} of model/gpt.py's GPT for ModelConfig `cfg`, with the
    *unpadded* vocabulary (`cfg.vocab_size` rows: what an HF checkpoint holds).

    Linear weights are (out_features, in_features); head_dim: config/architecture.py
    head_dim (`model.head_dim`, or d_model / n_heads). tests/hf/test_init_from_checks.py holds
    this to the shapes of a GPT built on meta.
    """
    d, hd, f = cfg.d_model, head_dim(cfg), cfg.ffn_hidden
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    layer = {"attention_norm.weight": (d,), "ffn_norm.weight": (d,),
             "post_attention_norm.weight": (d,), "post_ffn_norm.weight": (d,),
             "attention.q_norm.weight": (hd,), "attention.k_norm.weight": (hd,),
             "attention.wq.weight": (q, d), "attention.wk.weight": (kv, d),
             "attention.wv.weight": (kv, d), "attention.wo.weight": (d, q),
             "feed_forward.w1.weight": (f, d), "feed_forward.w3.weight": (f, d),
             "feed_forward.w2.weight": (d, f),
             "attention.wq.bias": (q,), "attention.wk.bias": (kv,), "attention.wv.bias": (kv,)}
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,),
              "output.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def language_model_layout(table: dict[str, TensorInfo]) -> tuple[str, str, list[str]]:
    """(decoder prefix, untied head name, tensors to ignore) of a checkpoint's tensor names:
    ("model.", "lm_head.weight", []) for a *ForCausalLM; for a Gemma3ForConditionalGeneration
    the language model's prefix and head (MULTIMODAL) and its vision tower / projector tensors
    (VISION_PREFIXES), which `model.init_from` leaves out."""
    for prefix, head in MULTIMODAL:
        if any(t.startswith(prefix) for t in table):
            return prefix, head, sorted(t for t in table if t.startswith(VISION_PREFIXES))
    return "model.", HEAD, []


def check_tensors(table: dict[str, TensorInfo], cfg) -> dict[str, str]:
    """Refuse a checkpoint whose tensors do not fit ModelConfig `cfg`; return {ours: HF name}.

    In this order: lm_head vs `model.tie_embeddings` (transformers ties the head to the
    embedding when config.json's tie_word_embeddings is true, so a tied model must not bring a
    head of its own, an untied one must), q/k/v biases vs `model.qkv_bias`, missing tensors,
    other unexpected tensors, shapes, dtypes. A Gemma3ForConditionalGeneration checkpoint is
    read as its language model (`language_model_layout`).
    """
    prefix, head, ignored = language_model_layout(table)
    mapping = hf_names(cfg, prefix, head)
    present = {t for t in table if not t.endswith(IGNORED_SUFFIXES)} - set(ignored)
    expected = set(mapping.values())
    if cfg.tie_embeddings and head in present:
        raise fail(f"{head} is present but model.tie_embeddings=true (config.json "
                   "tie_word_embeddings): a tied model uses the embedding as its head; set "
                   "tie_word_embeddings=false if the head is meant to be separate")
    if not cfg.tie_embeddings and head not in present:
        raise fail(f"{head} is missing but model.tie_embeddings=false: an untied model "
                   "needs its own head; set tie_word_embeddings=true if it shares the embedding")
    biases = sorted(t for t in present - expected if t.endswith("_proj.bias"))
    if biases:
        hint = ("q/k/v biases (model.qkv_bias=false)" if not cfg.qkv_bias
                else "those biases (only q/k/v have them)")
        raise fail(f"the checkpoint has biases {listing(biases)} but the model has no {hint}")
    missing = expected - present
    if missing:
        raise fail(f"{len(missing)} tensor(s) missing from the checkpoint: {listing(missing)}; "
                   "is it a complete checkpoint of this config.json?")
    unexpected = present - expected
    if unexpected:
        raise fail(f"{len(unexpected)} tensor(s) the model has no place for: "
                   f"{listing(unexpected)}; is config.json's architecture the checkpoint's?")
    shapes = expected_shapes(cfg)
    for ours, theirs in mapping.items():
        info = table[theirs]
        if info.shape != shapes[ours]:
            raise fail(f"{theirs} has shape {list(info.shape)}, the model expects "
                       f"{list(shapes[ours])} (from model.* / config.json); the weights do not "
                       "belong to this architecture")
        if info.dtype not in FLOAT_DTYPES:
            raise fail(f"{theirs} is stored as {info.dtype}; only unquantized float weights "
                       f"({', '.join(FLOAT_DTYPES)}) can be loaded")
    return mapping
