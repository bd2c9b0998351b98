"""The one list of architecture keys: the `model.*` fields that decide which tensors a checkpoint
holds, their shapes, and what the model computes from them. Resume (checkpoint/store.py
check_shape: RESUME_KEYS) and `model.init_from` from one of our checkpoints (hf/init_from.py:
ARCHITECTURE_KEYS) compare a checkpoint's recorded model (meta.json "model") with the run's
through `architecture_diffs`, so neither can miss a key (the export rebuilds the whole recorded
ModelConfig, so it needs no list). A field added to ModelConfig goes into one of
the three lists below, or into none when it changes neither the tensors nor the function
(tests/config/test_architecture.py holds each list to what the model does).

- DIMENSIONS set tensor shapes: a checkpoint that differs in one is another model.
- FLAGS set which tensors exist (tied embeddings share the head with the embedding; qkv_bias
  adds q/k/v biases): the same model dimensions with another switch.
- FUNCTION keys change what the same weights compute (RoPE type, base, scaling factor and
  every RoPE parameter, the RMSNorm epsilon, the attention window and which layers slide).
  The weights fit, so `model.init_from` may change them (the next stage of a context
  extension); resuming the same run may not — it would train another function under the old
  run's name and rewrite its meta.json.
  Every `rope_*` parameter is compared, also one the active `rope_scaling` does not read (say
  rope_beta_fast with rope_scaling=none): which method reads which parameter is model/rope.py's
  business, and a copy of that rule here could drift from it and let a real change through;
  the cost of comparing them all is a refused no-op override, undone by dropping it.
Not architecture: `name` (a label), `init_std` (only the initial draw, which a resume
replaces) and `init_from` (where the first weights came from).

A key a checkpoint of an older version did not record reads as the schema's default (every
such checkpoint was trained with it).
"""
from __future__ import annotations

import dataclasses

from .schema import ModelConfig

DIMENSIONS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size")
FLAGS = ("tie_embeddings", "qkv_bias")
FUNCTION = ("rope_scaling", "rope_theta", "rope_factor", "rope_original_seq_len",
            "rope_beta_fast", "rope_beta_slow", "rope_low_freq_factor", "rope_high_freq_factor",
            "rope_attention_factor", "rope_mscale", "rope_mscale_all_dim", "rope_truncate",
            "norm_eps", "sliding_window", "layer_types")
# What the weights must fit: `model.init_from` from our checkpoint compares these.
ARCHITECTURE_KEYS = DIMENSIONS + FLAGS
# What resuming the same run compares: the weights fit *and* compute the same function.
RESUME_KEYS = ARCHITECTURE_KEYS + FUNCTION
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def architecture_diffs(saved: dict, model_cfg, keys: tuple[str, ...] = ARCHITECTURE_KEYS
                       ) -> list[tuple[str, object, object]]:
    """[(key, the checkpoint's value, this run's value)] for every key of `keys`
    (ARCHITECTURE_KEYS, or RESUME_KEYS for a resume) on which `saved` (a recorded ModelConfig
    as a dict) and `model_cfg` (a ModelConfig) differ, in `keys` order; [] when they agree."""
    return [(k, saved.get(k, _DEFAULTS[k]), getattr(model_cfg, k)) for k in keys
            if saved.get(k, _DEFAULTS[k]) != getattr(model_cfg, k)]


def describe(diffs: list[tuple[str, object, object]]) -> str:
    """`key=saved (this run: now), ...` for an error line."""
    return ", ".join(f"{k}={saved} (this run: {now})" for k, saved, now in diffs)


def layer_windows(m: ModelConfig) -> list[int]:
    """Each layer's attention window in tokens (0 = full causal), from `model.sliding_window` W
    and `model.layer_types`: W for a `sliding_attention` layer, 0 for a `full_attention` one;
    with `layer_types` empty every layer gets W (transformers' Mistral: one window for all
    layers). Assumes a validated config (config/validate.py validate_window)."""
    if not m.layer_types:
        return [m.sliding_window] * m.n_layers
    return [m.sliding_window if t == "sliding_attention" else 0 for t in m.layer_types]
