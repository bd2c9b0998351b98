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
  adds q/k/v biases, qk_norm the per-head q/k norms, sandwich_norm the norms after attention
  and the MLP): the same model dimensions with another switch.
- FUNCTION keys change what the same weights compute (RoPE type, base, scaling factor and
  every RoPE parameter, the RMSNorm epsilon and weight offset, the attention window and which
  layers slide, the MLP activation, the embedding and attention scales).
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

DIMENSIONS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden",
              "vocab_size")
FLAGS = ("tie_embeddings", "qkv_bias", "qk_norm", "sandwich_norm")
FUNCTION = ("rope_scaling", "rope_theta", "rope_factor", "rope_original_seq_len",
            "rope_beta_fast", "rope_beta_slow", "rope_low_freq_factor", "rope_high_freq_factor",
            "rope_attention_factor", "rope_mscale", "rope_mscale_all_dim", "rope_truncate",
            "rope_local_theta", "norm_eps", "norm_weight_offset", "sliding_window",
            "layer_types", "mlp_activation", "scale_embeddings", "query_pre_attn_scalar")
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
    mine = {k: getattr(model_cfg, k) for k in _DEFAULTS}
    ours, theirs = _resolved(saved), _resolved(mine)
    return [(k, saved.get(k, _DEFAULTS[k]), mine[k]) for k in keys
            if ours[k] != theirs[k] and saved.get(k, _DEFAULTS[k]) != mine[k]]


def _resolved(fields: dict) -> dict:
    """A recorded model's fields with the defaults filled in and `head_dim` 0 read as
    d_model / n_heads (the same tensors either way). A difference counts when the resolved
    and the recorded values both differ: head_dim 0 on both sides under another d_model is
    that d_model's difference, already named."""
    out = {**_DEFAULTS, **fields}
    out["head_dim"] = out["head_dim"] or out["d_model"] // out["n_heads"]
    return out


def describe(diffs: list[tuple[str, object, object]]) -> str:
    """`key=saved (this run: now), ...` for an error line."""
    return ", ".join(f"{k}={saved} (this run: {now})" for k, saved, now in diffs)


def head_dim(m: ModelConfig) -> int:
    """Width of one attention head: `model.head_dim`, or d_model / n_heads when it is 0."""
    return m.head_dim or m.d_model // m.n_heads


def layer_windows(m: ModelConfig) -> list[int]:
    """Each layer's attention window in tokens (0 = full causal), from `model.sliding_window` W
    and `model.layer_types`: W for a `sliding_attention` layer, 0 for a `full_attention` one;
    with `layer_types` empty every layer gets W (transformers' Mistral: one window for all
    layers). Assumes a validated config (config/validate.py validate_window)."""
    if not m.layer_types:
        return [m.sliding_window] * m.n_layers
    return [m.sliding_window if t == "sliding_attention" else 0 for t in m.layer_types]
