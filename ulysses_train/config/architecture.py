"""The one list of architecture keys: the `model.*` fields that decide which tensors a checkpoint
holds and their shapes. Resume (checkpoint/store.py check_shape), `model.init_from` from one of
our checkpoints (hf/init_from.py) and the export all compare a checkpoint's recorded model
(meta.json "model") with the run's through `architecture_diffs`, so none can miss a key.

- DIMENSIONS set tensor shapes: a checkpoint that differs in one is another model.
- FLAGS set which tensors exist (tied embeddings share the head with the embedding; qkv_bias
  adds q/k/v biases): the same model dimensions with another switch.
A key a checkpoint of an older version did not record reads as the schema's default (every
such checkpoint was trained with it).
"""
from __future__ import annotations

import dataclasses

from .schema import ModelConfig

DIMENSIONS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size")
FLAGS = ("tie_embeddings", "qkv_bias")
ARCHITECTURE_KEYS = DIMENSIONS + FLAGS
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def architecture_diffs(saved: dict, model_cfg) -> list[tuple[str, object, object]]:
    """[(key, the checkpoint's value, this run's value)] for every architecture key on which
    `saved` (a recorded ModelConfig as a dict) and `model_cfg` (a ModelConfig) differ, in
    ARCHITECTURE_KEYS order; [] when they agree."""
    return [(k, saved.get(k, _DEFAULTS[k]), getattr(model_cfg, k)) for k in ARCHITECTURE_KEYS
            if saved.get(k, _DEFAULTS[k]) != getattr(model_cfg, k)]


def describe(diffs: list[tuple[str, object, object]]) -> str:
    """`key=saved (this run: now), ...` for an error line."""
    return ", ".join(f"{k}={saved} (this run: {now})" for k, saved, now in diffs)
