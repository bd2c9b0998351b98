"""The JSON files of an exported Hugging Face model dir: config.json, generation_config.json.

The inverse of `hf/config.py`: our ModelConfig as transformers' `LlamaConfig` (or
`Qwen2Config` when the q/k/v projections have biases) would write it. Plain dicts; no torch,
no transformers.
"""
from __future__ import annotations

import json
import os

from ..errors import ConfigError

TORCH_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}


def rope_scaling_json(m) -> dict | None:
    """config.json's `rope_scaling` for ModelConfig `m`: rope_type, factor,
    original_max_position_embeddings (yarn, llama3) and every field that differs from
    transformers' default; None without scaling. ConfigError for a method transformers lacks.
    """
    if m.rope_scaling == "none":
        return None
    if m.rope_scaling == "linear":
        return {"rope_type": "linear", "factor": m.rope_factor}
    if m.rope_scaling == "llama3":  # transformers requires all of them for llama3
        return {"rope_type": "llama3", "factor": m.rope_factor,
                "original_max_position_embeddings": m.rope_original_seq_len,
                "low_freq_factor": m.rope_low_freq_factor,
                "high_freq_factor": m.rope_high_freq_factor}
    if m.rope_scaling == "yarn":
        out = {"rope_type": "yarn", "factor": m.rope_factor,
               "original_max_position_embeddings": m.rope_original_seq_len}
        if m.rope_beta_fast != 32.0:
            out["beta_fast"] = m.rope_beta_fast
        if m.rope_beta_slow != 1.0:
            out["beta_slow"] = m.rope_beta_slow
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(m, "rope_" + key) is not None:
                out[key] = getattr(m, "rope_" + key)
        if not m.rope_truncate:
            out["truncate"] = False
        return out
    if m.rope_scaling == "ntk":
        raise ConfigError("model.rope_scaling", "static ntk scaling is ours alone: transformers "
                          "has no such rope_type, so this checkpoint cannot be exported faithfully")
    raise ConfigError("model.rope_scaling", f"{m.rope_scaling!r} cannot be exported")


def hf_config_json(m, seq_len: int, dtype: str, bos: int | None, eos: int | None) -> dict:
    """config.json for ModelConfig `m` trained at `seq_len` tokens (max_position_embeddings),
    weights written in `dtype` (bf16 | fp32), with the tokenizer's bos/eos ids (None: unknown).
    vocab_size is the model's unpadded one: only our padding rows are left out.
    """
    qwen = m.qkv_bias  # Qwen2 is Llama plus q/k/v biases
    config = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_hidden,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "num_hidden_layers": m.n_layers,
        "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": seq_len,
        "rope_theta": m.rope_theta,
        "rope_scaling": rope_scaling_json(m),
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": TORCH_DTYPE[dtype],
        "bos_token_id": bos,
        "eos_token_id": eos,
        "initializer_range": m.init_std,
    }
    if qwen:
        config.update(use_sliding_window=False, sliding_window=None)
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def generation_config_json(bos: int | None, eos: int | None) -> dict:
    return {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}


def special_token_ids(tokenizer_dir: str) -> tuple[int | None, int | None]:
    """(bos, eos) ids of the tokenizer files in `tokenizer_dir`: a sentencepiece
    `tokenizer.model` says them itself (-1 = none); for a `tokenizer.json` the token strings of
    `tokenizer_config.json` (or `special_tokens_map.json`) are looked up among its tokens.
    (None, None) when nothing says."""
    sp_path = os.path.join(tokenizer_dir, "tokenizer.model")
    if os.path.isfile(sp_path):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=sp_path)
        return (sp.bos_id() if sp.bos_id() >= 0 else None,
                sp.eos_id() if sp.eos_id() >= 0 else None)
    vocab = _tokenizer_json_ids(os.path.join(tokenizer_dir, "tokenizer.json"))
    strings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        strings.update(_token_strings(os.path.join(tokenizer_dir, name)))
    return vocab.get(strings.get("bos_token")), vocab.get(strings.get("eos_token"))


def _tokenizer_json_ids(path: str) -> dict:
    try:
        with open(path) as f:
            tok = json.load(f)
    except (OSError, ValueError):
        return {}
    ids = dict((tok.get("model") or {}).get("vocab") or {}) \
        if isinstance((tok.get("model") or {}).get("vocab"), dict) else {}
    ids.update({t["content"]: t["id"] for t in tok.get("added_tokens") or []})
    return ids


def _token_strings(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {}
    for key in ("bos_token", "eos_token"):
        value = data.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out
