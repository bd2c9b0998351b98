"""Named model shapes (`model=<name>` on the command line).

`PRESETS[name]` holds the architecture fields of `ModelConfig` for that preset; every other
field keeps its dataclass default. `configs/model/<name>.yaml` carries the same values for Hydra
(a test checks that the two agree), so change both together.

Parameter counts (padded vocab, untied head): tiny ~7.1M, llama_125m ~134M,
tinyllama_1b ~1.10B, llama3_8b ~8.03B.
"""
from __future__ import annotations

from dataclasses import fields

from ..config.errors import ConfigError
from ..config.schema import ModelConfig

PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, ffn_hidden=688,
                 vocab_size=8192, rope_theta=10000.0, tie_embeddings=False),
    "llama_125m": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, ffn_hidden=2048,
                       vocab_size=32000, rope_theta=10000.0, tie_embeddings=False),
    "tinyllama_1b": dict(n_layers=22, d_model=2048, n_heads=32, n_kv_heads=4, ffn_hidden=5632,
                         vocab_size=32000, rope_theta=10000.0, tie_embeddings=False),
    "llama3_8b": dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                      vocab_size=128256, rope_theta=500000.0, tie_embeddings=False),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of preset `name`, with `overrides` (ModelConfig field names) applied.

    Raises `ConfigError("model", ...)` for an unknown preset or field name.
    """
    if name not in PRESETS:
        raise ConfigError("model", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError("model", f"unknown model field(s) {', '.join(unknown)}; "
                          f"valid fields: {', '.join(sorted(known))}")
    return ModelConfig(**{"name": name, **PRESETS[name], **overrides})
