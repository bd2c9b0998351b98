"""The Qwen3-4B and Gemma-3-4B shapes as ModelConfig fields (model/presets.py `qwen3_4b`,
`gemma3_4b`), for tests that need the real sizes, and as `model.*` command-line overrides."""
from __future__ import annotations

from ulysses_train.config.overrides import hydra_value

QWEN3_4B = dict(name="qwen3_4b", n_layers=36, d_model=2560, n_heads=32, n_kv_heads=8,
                head_dim=128, ffn_hidden=9728, vocab_size=151936, rope_theta=1000000.0,
                tie_embeddings=True, qk_norm=True, norm_eps=1e-6)
GEMMA3_4B = dict(name="gemma3_4b", n_layers=34, d_model=2560, n_heads=8, n_kv_heads=4,
                 head_dim=256, ffn_hidden=10240, vocab_size=262208, rope_theta=1000000.0,
                 rope_scaling="linear", rope_factor=8.0, rope_local_theta=10000.0,
                 tie_embeddings=True, qk_norm=True, sandwich_norm=True, norm_weight_offset=1.0,
                 scale_embeddings=True, mlp_activation="gelu_tanh", query_pre_attn_scalar=256.0,
                 norm_eps=1e-6, sliding_window=1024,
                 layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                              for i in range(34)])


def model_overrides(fields: dict) -> list[str]:
    """`fields` as `model.<key>=<value>` overrides (lists in Hydra's [a,b] syntax)."""
    return [f"model.{k}={hydra_value(v)}" for k, v in fields.items()]
