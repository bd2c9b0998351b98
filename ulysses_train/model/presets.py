"""Named model shapes (`model=<name>` on the command line).

`PRESETS[name]` holds the architecture fields of `ModelConfig` for that preset; every other
field keeps its dataclass default. `configs/model/<name>.yaml` carries the same values for Hydra
(a test checks that the two agree), so change both together.

Parameter counts (padded vocab, untied head unless tied): tiny ~7.1M, llama_125m ~134M,
tinyllama_1b ~1.10B, llama3_8b ~8.03B, qwen3_4b ~4.02B (tied), gemma3_4b ~3.88B (tied; the
language model of Gemma 3 4B, without its vision tower).

The family presets give shapes and the family's switches only: their weights come from
`model.init_from` (a Hugging Face dir), whose config.json then decides every field anyway; the
preset lets the planner and a from-scratch run use the same architecture.
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
    # Qwen/Qwen3-4B config.json: 32 heads of 128 on d_model 2560, QK-norm, tied embeddings.
    "qwen3_4b": dict(n_layers=36, d_model=2560, n_heads=32, n_kv_heads=8, head_dim=128,
                     ffn_hidden=9728, vocab_size=151936, rope_theta=1000000.0,
                     tie_embeddings=True, qk_norm=True, norm_eps=1e-6),
    # google/gemma-3-4b-pt's text_config with Gemma3TextConfig's defaults filled in: 8 heads
    # of 256, 5 sliding (window 1024, RoPE base 10,000) : 1 global (base 1e6, linear x8 over
    # 16384: its 131072 positions, as model.init_from reads a linear source).
    "gemma3_4b": dict(n_layers=34, d_model=2560, n_heads=8, n_kv_heads=4, head_dim=256,
                      ffn_hidden=10240, vocab_size=262208, rope_theta=1000000.0,
                      rope_scaling="linear", rope_factor=8.0, rope_original_seq_len=16384,
                      rope_local_theta=10000.0,
                      tie_embeddings=True, qk_norm=True, sandwich_norm=True,
                      norm_weight_offset=1.0, scale_embeddings=True, mlp_activation="gelu_tanh",
                      query_pre_attn_scalar=256.0, norm_eps=1e-6, sliding_window=1024,
                      layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                   for i in range(34)]),
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
