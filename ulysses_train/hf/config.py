"""`model.init_from`, config side: the architecture (`model.*`) of an HF dir or of our checkpoint.

A Hugging Face model dir's `config.json` (model_type llama, mistral, ministral, qwen2, qwen3,
gemma3_text or gemma3; transformers 4 or 5 spelling; sliding windows as transformers reads
them: hf/sliding.py; each family's switches: hf/family.py) or
one of our run / `checkpoints/step_*` dirs (its meta.json "model") decides the model's fields,
overriding the preset. `apply_init_from` is the one place that does it; both the
command-line pre-check (cli/compose.py) and train.py's main call it with the keys the user set
explicitly, so they build the same config. Rules:

- A key the source *states* and the user also set explicitly to another value is an error
  naming it (`error: model.<key>: ...`, exit 2).
- Keys the source does not state keep the user's value. The RoPE keys (`rope_theta` and the
  scaling keys) are only defaults, for an HF dir as for our checkpoints: changing them is a
  context extension (`model.rope_scaling=yarn ...`, a larger factor, adjusted base frequency
  `model.rope_theta=500000`), logged by the trainer (`rope_notes`); so is Gemma 3's
  `rope_local_theta`. Without `rope_scaling` in
  config.json, `model.rope_original_seq_len` defaults to the model's `max_position_embeddings`
  (its pretraining context) unless set.
- A yarn context (factor x original) shorter than the source's `max_position_embeddings` is
  refused: its export could not state both (`_check_yarn_context`).
- What we cannot train faithfully is refused in one line before any heavy work.

No tensors, no transformers: this runs in the pre-check, before any heavy work.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterable

from ..checkpoint.store import resume_source
from ..config.errors import ConfigError
from ..utils.jsonfile import read_json_object
from .family import GEMMA, SUPPORTED, check_family, family_fields, gemma_rope, text_config
from .sliding import window_fields
from .source import hf_max_positions, source_record

KEY = "model.init_from"
# transformers' defaults for keys a config.json may omit (LlamaConfig / MistralConfig /
# MinistralConfig / Qwen2Config / Qwen3Config, transformers 5; Gemma 3's: hf/family.py
# text_config; max_position_embeddings's: hf/source.py MAX_POSITIONS; sliding_window's:
# hf/sliding.py).
_DEFAULTS = dict(rms_norm_eps=1e-6, tie_word_embeddings=False)
# Our RoPE keys <- transformers' rope_parameters names, per rope_type.
_ROPE_KEYS = {
    "linear": {},
    "llama3": {"rope_low_freq_factor": "low_freq_factor",
               "rope_high_freq_factor": "high_freq_factor"},
    "yarn": {"rope_beta_fast": "beta_fast", "rope_beta_slow": "beta_slow",
             "rope_attention_factor": "attention_factor", "rope_mscale": "mscale",
             "rope_mscale_all_dim": "mscale_all_dim", "rope_truncate": "truncate"},
}
# transformers' fallbacks inside _compute_yarn_parameters (`get(...) or 32`, `or 1`, True).
_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}
# ModelConfig fields a checkpoint of ours does not decide.
_NOT_FROM_CHECKPOINT = ("name", "init_std", "init_from")


def model_fields_from(path: str) -> tuple[dict, dict, str]:
    """(stated, defaults, name) for `model.init_from=path`: the ModelConfig fields the source
    decides (conflict-checked against explicit overrides), fields it only suggests (applied
    unless the user set them), and an honest `model.name`. ConfigError for anything unusable.
    """
    from .init_from import HF, resolve  # the one PATH -> directory rule (imports hf/)

    path = os.path.abspath(os.path.expanduser(path))
    kind, where = resolve(path)
    if kind == HF:
        if not os.path.isfile(os.path.join(where, "config.json")):
            raise ConfigError(KEY, f"{where} has safetensors weights but no config.json; copy "
                                   "the model's config.json next to them")
        hf = _json(os.path.join(where, "config.json"))
        stated, defaults = hf_model_fields(hf, os.path.join(where, "config.json"))
        # The RoPE the weights were trained with is where a context extension starts, not a
        # fixed property of them: a Llama 3.1 (llama3 x8) extended further needs a larger
        # factor, and adjusted base frequency (a larger rope_theta: Code Llama, Llama 3, Qwen)
        # is an extension too. So the RoPE keys are defaults, overridable as our checkpoints'
        # are; the trainer logs each change (`rope_notes`).
        rope = {k: v for k, v in stated.items() if k in (*ROPE_KEYS, "rope_local_theta")}
        stated = {k: v for k, v in stated.items() if k not in rope}
        return stated, {**defaults, **rope}, os.path.basename(path)
    saved = _json(os.path.join(where, "meta.json")).get("model")
    if not isinstance(saved, dict):
        raise ConfigError(KEY, f"{where}/meta.json has no \"model\" entry")
    stated, defaults = checkpoint_model_fields(saved)
    return stated, defaults, str(saved.get("name") or os.path.basename(path))


ROPE_SCALING_KEYS = ("rope_scaling", "rope_factor", "rope_original_seq_len", "rope_beta_fast",
                     "rope_beta_slow", "rope_low_freq_factor", "rope_high_freq_factor",
                     "rope_attention_factor", "rope_mscale", "rope_mscale_all_dim",
                     "rope_truncate")
ROPE_KEYS = ("rope_theta", *ROPE_SCALING_KEYS)


def checkpoint_model_fields(saved: dict) -> tuple[dict, dict]:
    """(stated, defaults) of our meta.json "model" (the ModelConfig of the run that saved it):
    the architecture (shapes, flags) is stated; the keys that only change what the weights
    compute (config/architecture.py FUNCTION: RoPE, norm epsilon, the attention window) are
    defaults, since a later stage changes them on purpose (a context extension, a wider
    window). Fields an older version did not record keep their dataclass defaults."""
    from ..config.architecture import FUNCTION
    from ..config.schema import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)} - set(_NOT_FROM_CHECKPOINT)
    fields = {k: v for k, v in saved.items() if k in known}
    free = {k: v for k, v in fields.items() if k in FUNCTION}
    return {k: v for k, v in fields.items() if k not in free}, free


def _refuse(where: str, what: str) -> ConfigError:
    return ConfigError(KEY, f"{where}: {what}")


def hf_model_fields(hf: dict, where: str = "config.json") -> tuple[dict, dict]:
    """(stated, defaults) ModelConfig fields of a transformers config.json dict `hf` (for a
    gemma3 checkpoint, its language model: hf/family.py text_config). The window
    (`sliding_window`, `layer_types`: hf/sliding.py) and every family switch (hf/family.py
    family_fields) are stated: the weights were trained with them, so an explicit override
    that differs is an error.

    Refuses (ConfigError naming `where` and the config.json field) what our model does not
    compute: see `_check_supported`, hf/family.py `check_family` and hf/sliding.py
    `window_fields`.
    """
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise _refuse(where, f"model_type {kind!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED)}")
    hf, field = text_config(hf)
    try:
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        stated = dict(n_layers=int(hf["num_hidden_layers"]), d_model=d, n_heads=heads,
                      n_kv_heads=int(hf.get("num_key_value_heads") or heads),
                      ffn_hidden=int(hf["intermediate_size"]),
                      vocab_size=int(hf["vocab_size"]),
                      norm_eps=float(hf.get("rms_norm_eps", _DEFAULTS["rms_norm_eps"])),
                      tie_embeddings=bool(hf.get("tie_word_embeddings",
                                                 _DEFAULTS["tie_word_embeddings"])),
                      qkv_bias=kind == "qwen2", **family_fields(hf, kind))
    except KeyError as exc:
        raise _refuse(where, f"missing {field + exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise _refuse(where, f"a size is not a number ({exc})") from None
    check_family(hf, kind, where, field)
    _check_supported(hf, kind, where)
    window_kind = "gemma3_text" if kind in GEMMA else kind
    stated.update(window_fields(hf, window_kind, f"{where} {field[:-1]}".strip()))
    max_pos = hf_max_positions(hf)
    if kind in GEMMA:
        full, local_theta = gemma_rope(hf, where, field)
        rope_stated, rope_defaults = _rope_fields(full, max_pos, where)
        rope_stated["rope_local_theta"] = local_theta
    else:
        rope = _rope_dict(hf)
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        rope_stated, rope_defaults = _rope_fields(rope, max_pos, where)
        rope_stated["rope_local_theta"] = 0.0
    return {**stated, **rope_stated}, rope_defaults


def _check_supported(hf: dict, kind: str, where: str) -> None:
    """One line for each config.json setting our model would silently compute differently
    (beyond the family's own: hf/family.py check_family)."""
    ropes = gemma_rope(hf, where, "")[:1] if kind in GEMMA else [_rope_dict(hf)]
    for rope in ropes:
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
        if partial is not None and float(partial) != 1.0:
            raise _refuse(where, f"partial_rotary_factor={partial}: partial rotary embeddings "
                                 "are not supported (we rotate the whole head)")
    for bias in ("attention_bias", "mlp_bias"):
        if kind == "llama" and hf.get(bias):
            raise _refuse(where, f"{bias}=true: our Llama has no such biases (only Qwen2's q/k/v "
                                 "biases are supported)")


def _rope_dict(hf: dict) -> dict:
    """The RoPE parameters in either spelling: transformers 5 `rope_parameters` (rope_theta
    inside), older `rope_scaling` next to a top-level `rope_theta`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return dict(rope) if isinstance(rope, dict) else {}


def _rope_fields(rope: dict, max_pos: int, where: str) -> tuple[dict, dict]:
    """(stated, defaults) RoPE fields of one RoPE dict (transformers 5's `rope_parameters`
    spelling, rope_theta inside). rope_type default/absent states only rope_theta."""
    theta = float(rope["rope_theta"])
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}, {"rope_scaling": "none", "rope_original_seq_len": max_pos}
    if kind == "dynamic":
        raise _refuse(where, "rope_type 'dynamic' is inference-only (its frequencies change with "
                             "each input's length, so no one table can be trained); use yarn, "
                             "llama3 or linear")
    if kind not in _ROPE_KEYS:
        raise _refuse(where, f"rope_type {kind!r} is not supported; supported: default, "
                             f"{', '.join(_ROPE_KEYS)}")
    original = int(rope.get("original_max_position_embeddings") or max_pos)
    factor = rope.get("factor")
    if factor is None and kind == "yarn":  # transformers: the extended / original ratio
        factor = max_pos / original
    if factor is None or not math.isfinite(float(factor)):
        raise _refuse(where, f"rope_type {kind!r} needs a numeric 'factor', got {factor!r}")
    if kind == "linear" and not rope.get("original_max_position_embeddings"):
        # transformers' linear reads no original context; max_position_embeddings already
        # counts the factor (Gemma 3 4B: 131072 = 8 x 16384), so the context before it is
        # max / factor, and the export's factor x original (export_config.max_positions)
        # gives the source's own max_position_embeddings back, not factor x it.
        original = max(1, round(max_pos / float(factor)))
    stated = {"rope_theta": theta, "rope_scaling": kind, "rope_factor": float(factor),
              "rope_original_seq_len": original}
    for ours, theirs in _ROPE_KEYS[kind].items():
        value = rope.get(theirs)
        if value is None:
            value = _YARN_DEFAULTS.get(theirs) if kind == "yarn" else None
        if value is None and kind == "llama3":
            raise _refuse(where, f"rope_type 'llama3' needs {theirs!r}")
        stated[ours] = bool(value) if theirs == "truncate" else (
            None if value is None else float(value))
    return stated, {}


def explicit_model_keys(overrides: Iterable[str]) -> set[str]:
    """ModelConfig field names the command line sets (`model.x=..`, `+model.x=..`,
    `++model.x=..`); a preset choice `model=name` sets none."""
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            keys.add(key[len("model."):])
    return keys


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def apply_init_from(cfg, explicit: Iterable[str], run_dir: str | None = None):
    """`cfg` (a Config) with `model.*` decided by `model.init_from` (unchanged without it).

    `explicit`: ModelConfig field names the user set on the command line
    (`explicit_model_keys`). ConfigError `model.<key>` when one of them disagrees with a value
    the source states; ConfigError `model.init_from` when the source is unusable. `run_dir`:
    when the run there will resume from a checkpoint (checkpoint/store.py resume_source), that
    checkpoint decides instead: resume wins, the source is not read and may be gone.
    """
    if not cfg.model.init_from:
        return cfg
    explicit = set(explicit)
    resumed = resume_source(run_dir, cfg.checkpoint.resume) if run_dir else None
    stated, defaults, name = model_fields_from(resumed or cfg.model.init_from)
    source = (f"the checkpoint this run resumes from ({resumed})" if resumed
              else f"model.init_from={os.path.expanduser(cfg.model.init_from)}")
    for key, value in stated.items():
        mine = getattr(cfg.model, key)
        if key in explicit and not _same(mine, value):
            raise ConfigError(f"model.{key}", f"set to {mine} on the command line, but "
                              f"{source} says {value}; drop the override (the weights were "
                              "trained with that value)")
    updates = {k: v for k, v in defaults.items() if k not in explicit}
    updates.update(stated)
    if "name" not in explicit:
        updates["name"] = name
    model = dataclasses.replace(cfg.model, **updates)
    if not resumed:  # a resume compares the RoPE with its checkpoint's (store.check_shape),
        #              which passed this check when its run started
        _check_yarn_context(model, source_record(cfg.model.init_from, None), source)
    return dataclasses.replace(cfg, model=model)


def _check_yarn_context(model, record: dict | None, source: str) -> None:
    """A yarn context (factor x original) shorter than the source's cannot be exported
    consistently: transformers reads yarn's factor as max_position_embeddings / original
    (<= 4.55) or warns when they disagree (5), so max_position_embeddings must be exactly
    factor x original (hf/export_config.py max_positions). Refused before any work."""
    served = (record or {}).get("max_position_embeddings")
    if model.rope_scaling != "yarn" or not served:
        return
    context = round(model.rope_factor * model.rope_original_seq_len)
    if context < served:
        raise ConfigError("model.rope_factor", f"yarn x{model.rope_factor:g} over "
                          f"model.rope_original_seq_len={model.rope_original_seq_len} covers "
                          f"{context} positions, fewer than the {served} {source} serves; set "
                          f"model.rope_factor >= {served / model.rope_original_seq_len:g}")


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:g}"


def rope_notes(init_from: str, model) -> list[str]:
    """One line per RoPE choice of ModelConfig `model` that differs from what its source
    `init_from` was trained with (the trainer logs them when it loads the weights):
    `model.rope_theta: 500000 (the source was trained with 10000: adjusted base frequency)`,
    and one line for the scaling keys together (a context extension), plus a warning for static
    ntk, which the export cannot write (hf/export_config.py); one line per other changed
    FUNCTION key (config/architecture.py: the window, `norm_eps`, `rope_local_theta`, ...):
    what a new stage changed on purpose."""
    from ..config.architecture import FUNCTION

    stated, defaults, _ = model_fields_from(init_from)
    before = {**defaults, **stated}
    notes = []
    theta = before.get("rope_theta")
    if theta is not None and not _same(theta, model.rope_theta):
        notes.append(f"model.rope_theta: {_num(model.rope_theta)} (the source was trained "
                     f"with {_num(theta)}: adjusted base frequency)")
    source = {k: before.get(k, getattr(model, k)) for k in ROPE_SCALING_KEYS}
    if model.rope_scaling != "none" and any(
            not _same(v, getattr(model, k)) for k, v in source.items()):
        notes.append(f"model.rope_scaling: {_scaling(model)} (the source was trained with "
                     f"{_scaling(dataclasses.replace(model, **source))}: context extension)")
        if model.rope_scaling == "ntk":  # said now, not first at the export
            notes.append("model.rope_scaling: static ntk has no transformers rope_type, so "
                         "this run cannot be exported to Hugging Face; yarn, linear or llama3 "
                         "can be")
    for key in FUNCTION:  # the others: window, norms, activation, scales, local RoPE base
        if key in ROPE_KEYS:
            continue
        if key in before and not _same(before[key], getattr(model, key)):
            notes.append(f"model.{key}: {getattr(model, key)} (the source was trained with "
                         f"{before[key]})")
    return notes


def _scaling(m) -> str:
    """`yarn x4 over 32`, `linear x2`, `none`."""
    if m.rope_scaling == "none":
        return "none"
    over = "" if m.rope_scaling in ("linear", "ntk") else f" over {m.rope_original_seq_len}"
    return f"{m.rope_scaling} x{_num(m.rope_factor)}{over}"


def run_name(name: str, init_from: str) -> str:
    """The model name the run dir shows: `model.name`, or with `model.init_from` the name
    `apply_init_from` will give the model (a Hydra resolver; never raises, since the
    pre-check reports a bad path itself)."""
    if not init_from:
        return name
    try:
        return model_fields_from(init_from)[2]
    except ConfigError:
        return os.path.basename(os.path.abspath(os.path.expanduser(init_from))) or name


def _json(path: str) -> dict:
    """read_json_object, its failure attributed to KEY (one `error: KEY: ...` line)."""
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise ConfigError(KEY, str(exc)) from None
