"""The JSON files of an exported Hugging Face model dir: config.json, generation_config.json.

The inverse of `hf/config.py`: our ModelConfig as transformers' `LlamaConfig` would write it,
or `Qwen2Config` when the q/k/v projections have biases, `MistralConfig` / `MinistralConfig`
for sliding-window layers, `Qwen3Config` with QK-norm, `Gemma3TextConfig` for the Gemma
switches (hf/sliding.py and hf/family.py choose; a mix no class computes is refused there,
before anything is written). Plain dicts; no torch, no transformers.
"""
from __future__ import annotations

import os

from ..config.architecture import head_dim
from ..config.errors import ConfigError
from .sliding import window_config_json

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
                          "has no such rope_type, so this checkpoint cannot be exported "
                          "faithfully; evaluate it here (scripts/eval.py), or train the "
                          "extension with model.rope_scaling=yarn (or linear, llama3) to export it")
    raise ConfigError("model.rope_scaling", f"{m.rope_scaling!r} cannot be exported")


def max_positions(m, seq_len: int, source: int | None) -> int:
    """config.json's `max_position_embeddings` for ModelConfig `m` trained at `seq_len` tokens
    from a source that served `source` positions (None: trained from scratch).

    It is the context the model serves, which serving engines cap requests at, so it is never
    less than the source's (Megatron-Bridge#5994). With RoPE scaling it is the extended context
    factor x original: transformers <= 4.55 *reads* yarn's factor as max_position_embeddings /
    original_max_position_embeddings, and transformers 5 warns when the two disagree
    (modeling_rope_utils `_validate_yarn_rope_parameters`), so for yarn it is exactly that (a
    yarn context shorter than the source's is refused at the start: hf/config.py). linear and
    llama3, where transformers reads no factor from it, take the largest of the three.
    """
    if m.rope_scaling == "none":
        return max(seq_len, source or 0)
    context = round(m.rope_factor * m.rope_original_seq_len)
    if m.rope_scaling == "yarn":
        return context
    return max(context, seq_len, source or 0)


def hf_config_json(m, max_position_embeddings: int, dtype: str, special_ids: dict,
                   source_type: str | None = None) -> dict:
    """config.json for ModelConfig `m` serving `max_position_embeddings` positions
    (`max_positions`), weights written in `dtype` (bf16 | fp32), with `special_ids`
    ({bos,eos,pad}_token_id: ints, lists of ints or None; hf/source.py exported_ids). vocab_size
    is the model's unpadded one: only our padding rows are left out. The model_type and its
    window keys: hf/sliding.py `window_config_json` (`source_type`: model.init_from's
    model_type, kept where it computes the same).
    """
    arch = window_config_json(m, source_type)
    kind = arch.pop("model_type")
    config = {
        "architectures": arch.pop("architectures"),
        "model_type": kind,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_hidden,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "num_hidden_layers": m.n_layers,
        "head_dim": head_dim(m),
        **(_gemma3_keys(m) if kind == "gemma3_text" else {
            "hidden_act": "silu", **({"attention_bias": False} if kind == "qwen3" else {})}),
        "rms_norm_eps": m.norm_eps,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": max_position_embeddings,
        **(_gemma3_rope(m) if kind == "gemma3_text" else {
            "rope_theta": m.rope_theta, "rope_scaling": rope_scaling_json(m)}),
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": TORCH_DTYPE[dtype],
        **special_ids,
        "initializer_range": m.init_std,
        **arch,
    }
    return config


def _gemma3_keys(m) -> dict:
    """Gemma3TextConfig's keys for what our Gemma switches compute (hf/family.py): GeGLU with
    the tanh GELU, the attention scalar (0 = head_dim), and no softcapping, biases or
    bidirectional attention (Gemma3TextConfig's defaults, stated so the file says it)."""
    return {"hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": int(m.query_pre_attn_scalar or head_dim(m)),
            "attention_bias": False, "attn_logit_softcapping": None,
            "final_logit_softcapping": None, "use_bidirectional_attention": False}


def _gemma3_rope(m) -> dict:
    """transformers 5's per-layer-type `rope_parameters` of a Gemma 3: the global layers'
    rope_theta and scaling; the sliding layers' unscaled `model.rope_local_theta`, or without
    one (0) the global layers' RoPE, which is what our sliding layers then compute."""
    full = {"rope_type": "default", **(rope_scaling_json(m) or {}), "rope_theta": m.rope_theta}
    local = ({"rope_type": "default", "rope_theta": m.rope_local_theta} if m.rope_local_theta
             else dict(full))
    return {"rope_parameters": {"full_attention": full, "sliding_attention": local}}


def special_token_ids(tokenizer_dir: str) -> tuple[int | None, int | None]:
    """(bos, eos) ids of the tokenizer files in `tokenizer_dir` (the run's `tokenizer/`), read
    by the same code that packed the training data (data/tokenizer.py), so the exported
    config.json names the ids the model was trained with. (None, None) when there are none.
    Raises ConfigError for tokenizer files that cannot be used."""
    from ..data.tokenizer import open_tokenizer
    from ..data.tokenizer_files import model_in

    path = model_in(tokenizer_dir) if os.path.isdir(tokenizer_dir) else None
    if path is None:
        return None, None
    tok = open_tokenizer(path)
    return tok.bos_id, tok.eos_id
