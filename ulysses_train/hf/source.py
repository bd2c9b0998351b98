"""What an export needs from `model.init_from`'s source, carried through the run.

A Hugging Face source says things our ModelConfig does not hold but its export must repeat: the
generation settings (`generation_config.json`: end-of-turn ids, temperature, top_p, ...), the
special-token ids of `config.json` (`eos_token_id` may be a list: Llama 3 instruct stops at
several), and the context it serves (`max_position_embeddings`). `source_record` reads them into
a plain dict that every checkpoint of the run keeps in its meta.json under `KEY` (covered by the
manifest), so `python -m ulysses_train.export` of a step dir writes them even when the source is
gone, and `model.init_from=<that step dir>` carries them on to the next stage. A run from
scratch records nothing (its export names its tokenizer's ids and its trained length).

The record: {"max_position_embeddings": int, "special_tokens": {"bos_token_id": ..,
"eos_token_id": .., "pad_token_id": ..} (the ones config.json states, ints or lists of ints),
"generation_config": dict | None (generation_config.json verbatim), "model_type": str (the
export keeps it where it computes the same model: hf/sliding.py)}.

No torch, no transformers: the pre-check (hf/config.py) reads it too.
"""
from __future__ import annotations

import dataclasses
import os

from ..checkpoint.store import read_meta
from ..config.errors import ConfigError
from ..utils.jsonfile import read_json_object
from .family import text_config

KEY = "hf_source"  # meta.json's key
SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")
GENERATION = "generation_config.json"
# transformers 5's max_position_embeddings default per model_type (LlamaConfig, MistralConfig,
# MinistralConfig, Qwen2Config, Qwen3Config, Gemma3TextConfig: also a gemma3 text_config's),
# for a config.json that omits it.
MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "ministral": 131072, "qwen2": 32768,
                 "qwen3": 32768, "gemma3_text": 131072, "gemma3": 131072}


def hf_max_positions(hf: dict) -> int:
    """config.json's (`hf`) `max_position_embeddings`: the context the model serves (a gemma3
    checkpoint's: its text_config's); the transformers default of its model_type when absent.
    ConfigError if it is not a number."""
    if hf.get("model_type") == "gemma3":
        hf = text_config(hf)[0]
    value = hf.get("max_position_embeddings") or MAX_POSITIONS.get(hf.get("model_type"), 2048)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError("model.init_from", f"config.json: max_position_embeddings={value!r} "
                                             "is not a number") from None


def source_record(init_from: str, resumed: str | None = None) -> dict | None:
    """The record (see the module docstring) of the run whose model.init_from is `init_from`
    ("" = none). `resumed`: the step dir the run resumes from (checkpoint/store.py
    resume_source); resume wins, so its recorded copy is used and the source is not read.
    ConfigError(model.init_from) for an unreadable generation_config.json."""
    if resumed:
        return recorded(resumed)
    if not init_from:
        return None
    from .init_from import HF, resolve

    kind, where = resolve(init_from)
    if kind != HF:
        return _forwarded(where)
    config = _read(os.path.join(where, "config.json"))
    if config.get("model_type") == "gemma3":  # the ids may be in text_config or at the top
        config = {**config, **{k: v for k, v in text_config(config)[0].items() if k in SPECIAL}}
    gen_path = os.path.join(where, GENERATION)
    return {"max_position_embeddings": hf_max_positions(config),
            "special_tokens": {k: config[k] for k in SPECIAL if _is_id(config.get(k))},
            "generation_config": _read(gen_path) if os.path.isfile(gen_path) else None,
            "model_type": config.get("model_type")}


def recorded(step_dir: str) -> dict | None:
    """The record kept in our checkpoint `step_dir`'s meta.json; None when it has none (a run
    from scratch, or a checkpoint written before records existed)."""
    record = read_meta(step_dir).get(KEY)
    return record if isinstance(record, dict) else None


def _forwarded(step_dir: str) -> dict | None:
    """The record a new run started from our checkpoint `step_dir` carries on: that run's, with
    the context its export would state (the next stage's source is that model, not the first)."""
    from ..config.schema import ModelConfig
    from .export_config import max_positions

    meta = read_meta(step_dir)
    record = recorded(step_dir)
    seq_len = ((meta.get("identity") or {}).get("data") or {}).get("data.seq_len")
    if seq_len is None:
        return record
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    before = (record or {}).get("max_position_embeddings")
    return {**(record or {}), "max_position_embeddings": max_positions(model, int(seq_len),
                                                                       before)}


def _is_id(value) -> bool:
    """An int id or a non-empty list of them (bools are not ids)."""
    if isinstance(value, list):
        return bool(value) and all(_is_id(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _read(path: str) -> dict:
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise ConfigError("model.init_from", str(exc)) from None


def merged_ids(stated, tokenizer_id):
    """One special id to export: the source's `stated` value (an int, a list of ints, or None),
    unless the run's tokenizer names another (`tokenizer_id` not among it): then the
    tokenizer's, which the run was trained with. A tokenizer naming none keeps the source's."""
    if tokenizer_id is None or stated == tokenizer_id or (
            isinstance(stated, list) and tokenizer_id in stated):
        return stated
    return tokenizer_id


def exported_ids(record: dict | None, bos: int | None, eos: int | None) -> tuple[dict, dict]:
    """(config.json's special ids, generation_config.json) of an export whose run used a
    tokenizer with ids `bos`/`eos` (None: no tokenizer, or it names none), given the run's
    record. Without a record: the tokenizer's ids, and a generation config made from them (a
    run from scratch, as before records existed). With one: the source's ids and generation
    config unchanged, except an id the run's tokenizer changed (`merged_ids`), which is
    replaced in both; pad_token_id (our tokenizers name none) stays the source's."""
    if record is None or ("special_tokens" not in record and "generation_config" not in record):
        ids = {"bos_token_id": bos, "eos_token_id": eos}
        return ids, {"_from_model_config": True, **ids}
    mine = {"bos_token_id": bos, "eos_token_id": eos}
    stated = record.get("special_tokens") or {}
    ids = {k: merged_ids(stated.get(k), mine.get(k)) for k in SPECIAL}
    ids = {k: v for k, v in ids.items() if v is not None or k != "pad_token_id"}
    generation = record.get("generation_config")
    if generation is None:  # what transformers derives from config.json
        return ids, {"_from_model_config": True, **ids}
    generation = dict(generation)
    for key, tokenizer_id in mine.items():
        if key in generation or tokenizer_id is not None:
            generation[key] = merged_ids(generation.get(key), tokenizer_id)
    return ids, generation
