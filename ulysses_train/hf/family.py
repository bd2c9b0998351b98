"""What a model family's config.json means beyond the shapes, both ways (issue 21).

Read from transformers 5.25's configuration_* / modeling_* files, which are the oracle:

- llama, mistral, ministral, qwen2: Llama's block (RMSNorm x_hat * w before attention and the
  MLP, SwiGLU), `head_dim` when config.json gives it (else hidden_size // heads).
- qwen3: the same plus QK-norm (`self_attn.q_norm` / `k_norm`, one weight of head_dim), no
  biases (`attention_bias` would put one on o_proj too), head_dim 128 when absent.
- gemma3_text (`Gemma3ForCausalLM`) and gemma3 (`Gemma3ForConditionalGeneration`, whose
  `text_config` is the language model; hub text_configs are sparse, the rest is
  Gemma3TextConfig's defaults): QK-norm, four norms per block computing x_hat * (1 + w),
  embeddings x sqrt(hidden_size), GeGLU with the tanh GELU (`hidden_activation`), attention
  scale `query_pre_attn_scalar`^-0.5, and a RoPE per layer type (`rope_parameters`
  {"full_attention": .., "sliding_attention": ..}, or the older `rope_theta` +
  `rope_scaling` for the global layers and `rope_local_base_freq` for the local ones).

`family_fields` maps those onto our ModelConfig switches (config/schema.py) for every family,
so a preset's switches never survive `model.init_from`; `export_family` picks the model_type
whose transformers class computes a ModelConfig, or refuses a mix none computes. No torch, no
transformers: the pre-check runs this.
"""
from __future__ import annotations

from ..config.architecture import head_dim, layer_windows
from ..config.errors import ConfigError

KEY = "model.init_from"
LLAMA_LIKE = ("llama", "mistral", "ministral", "qwen2")
SUPPORTED = (*LLAMA_LIKE, "qwen3", "gemma3_text", "gemma3")
GEMMA = ("gemma3_text", "gemma3")
QWEN3_HEAD_DIM = 128  # Qwen3Config.head_dim's default
# Gemma3TextConfig's defaults (transformers 5.25) for every key read here; a gemma3
# text_config or gemma3_text config.json may omit any of them (tests/hf/test_families.py holds
# this table to transformers).
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
    tie_word_embeddings=True, attention_bias=False, query_pre_attn_scalar=256,
    sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
    use_bidirectional_attention=False)
GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
# The switches Gemma 3 sets together (Gemma3ForCausalLM computes no subset of them).
GEMMA_SWITCHES = dict(qk_norm=True, sandwich_norm=True, norm_weight_offset=1.0,
                      scale_embeddings=True, mlp_activation="gelu_tanh", qkv_bias=False)
LLAMA_NORMS = dict(sandwich_norm=False, norm_weight_offset=0.0, scale_embeddings=False,
                   mlp_activation="silu")


def _refuse(where: str, what: str) -> ConfigError:
    return ConfigError(KEY, f"{where}: {what}")


def text_config(hf: dict) -> tuple[dict, str]:
    """(the language model's config dict, the prefix naming its fields in config.json) of a
    config.json dict `hf`: a gemma3 `text_config` over Gemma3TextConfig's defaults, with the
    top-level `tie_word_embeddings` (the one Gemma3ForConditionalGeneration ties by; default
    true) and special ids; a gemma3_text config over the same defaults; any other as it is."""
    kind = hf.get("model_type")
    if kind == "gemma3":
        text = hf.get("text_config") or {}
        if not isinstance(text, dict):
            raise ConfigError(KEY, f"config.json: text_config={text!r} is not an object")
        ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
        return {**GEMMA3_TEXT_DEFAULTS, **text, **ids, "model_type": "gemma3_text",
                "tie_word_embeddings": hf.get("tie_word_embeddings", True)}, "text_config."
    if kind == "gemma3_text":
        return {**GEMMA3_TEXT_DEFAULTS, **hf}, ""
    return hf, ""


def family_fields(hf: dict, kind: str) -> dict:
    """ModelConfig switches of the (text) config dict `hf` of model_type `kind`: head_dim (0
    when it is hidden_size / heads, so the run identity of a Llama stays what it was), qk_norm,
    the Gemma switches, query_pre_attn_scalar (0 when it equals head_dim). Assumes the sizes
    were read (KeyError/ValueError otherwise, reported by the caller)."""
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    hd = hf.get("head_dim")
    if hd is None and "head_dim" in hf and kind in ("qwen3", *GEMMA):
        raise ConfigError(KEY, f"config.json: head_dim=null: transformers' {kind} config needs "
                               "the width of a head; give it (e.g. 128)")
    if hd is None:  # transformers: the family's default, else hidden_size // heads
        hd = QWEN3_HEAD_DIM if kind == "qwen3" else d // heads
    hd = int(hd)
    gemma = kind in GEMMA
    scalar = float(hf["query_pre_attn_scalar"]) if gemma else 0.0
    if gemma and not scalar > 0:  # transformers would scale the logits by scalar^-0.5
        raise ConfigError(KEY, f"config.json: query_pre_attn_scalar={scalar:g} must be > 0 "
                               "(the attention scale is its -1/2 power; Gemma 3 uses head_dim)")
    switches = GEMMA_SWITCHES if gemma else {**LLAMA_NORMS, "qk_norm": kind == "qwen3"}
    out = {k: v for k, v in switches.items() if k != "qkv_bias"}
    return dict(out, head_dim=0 if hd * heads == d else hd,
                query_pre_attn_scalar=0.0 if scalar == hd else scalar)


def check_family(hf: dict, kind: str, where: str, field: str) -> None:
    """One line for each family setting our model would compute differently: another MLP
    activation, attention biases (Qwen3 / Gemma 3: on o_proj too), logit softcapping,
    bidirectional attention. `field`: the prefix naming hf's keys in config.json."""
    if kind in GEMMA:
        act = hf.get("hidden_activation")
        if act != "gelu_pytorch_tanh":
            raise _refuse(where, f"{field}hidden_activation={act!r} is not supported (Gemma 3's "
                                 "MLP here is GeGLU with the tanh GELU: gelu_pytorch_tanh)")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is not None:
                raise _refuse(where, f"{field}{key}={hf[key]}: logit softcapping is not "
                                     "supported (Gemma 3 does not use it); set it to null")
        if hf.get("use_bidirectional_attention"):
            raise _refuse(where, f"{field}use_bidirectional_attention=true: only causal "
                                 "language models are trained here")
    else:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise _refuse(where, f"{field}hidden_act {act!r} is not supported (our MLP is "
                                 "SwiGLU: silu)")
    if kind in ("qwen3", *GEMMA) and hf.get("attention_bias"):
        raise _refuse(where, f"{field}attention_bias=true: {kind} then has biases on q/k/v and "
                             "o_proj, which our model does not (only Qwen2's q/k/v biases)")


def gemma_rope(hf: dict, where: str, field: str) -> tuple[dict, float]:
    """(the global layers' RoPE dict with rope_theta inside, the sliding layers' base) of a
    Gemma 3 text config dict, as Gemma3TextConfig.convert_rope_params_to_dict reads it:
    `rope_parameters` per layer type, `rope_scaling` merged into the global layers', bases
    from `rope_theta` / `rope_local_base_freq` (defaults 1e6 / 1e4). Refused: a flat
    `rope_parameters` (transformers ignores it), an old `type` key (ignored too), scaling on
    the sliding layers (our local RoPE is unscaled)."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or (params and not set(params) & set(GEMMA3_THETA)):
        raise _refuse(where, f"{field}rope_parameters must be keyed by layer type "
                             "(full_attention, sliding_attention) for Gemma 3; transformers "
                             "ignores a flat one")
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    full.update(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", GEMMA3_THETA["full_attention"]))
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq",
                                          GEMMA3_THETA["sliding_attention"]))
    if "type" in full and full.get("rope_type") != full["type"]:
        raise _refuse(where, f"{field}rope_scaling says type={full['type']!r}, which Gemma 3 "
                             "ignores (it reads rope_type); rename the key to rope_type")
    if local.get("rope_type", "default") != "default":
        raise _refuse(where, f"{field}rope_parameters.sliding_attention.rope_type="
                             f"{local['rope_type']!r}: the sliding layers' RoPE must be "
                             "unscaled (default); only the full_attention layers may scale")
    return full, float(local["rope_theta"])


def _local_rope_differs(m) -> bool:
    """Whether `model.rope_local_theta` changes what some layer computes."""
    return bool(m.rope_local_theta) and any(layer_windows(m)) and not (
        m.rope_local_theta == m.rope_theta and m.rope_scaling == "none")


def export_family(m) -> str | None:
    """The model_type whose transformers class computes ModelConfig `m`: "gemma3_text" for
    the Gemma switches (all of them), "qwen3" for QK-norm with Llama's block, None for Llama's
    block (hf/sliding.py picks llama, mistral, ministral or qwen2). ConfigError naming the
    keys of a mix no transformers class computes."""
    gemma_like = any(getattr(m, k) != v for k, v in LLAMA_NORMS.items())
    if gemma_like:
        off = [f"model.{k}={getattr(m, k)}" for k, v in GEMMA_SWITCHES.items()
               if getattr(m, k) != v]
        if off:
            raise ConfigError(off[0].split("=")[0], f"{', '.join(off)} with the other Gemma "
                              "switches: no transformers class computes this mix "
                              "(Gemma3ForCausalLM needs qk_norm, sandwich_norm, "
                              "norm_weight_offset=1, scale_embeddings, mlp_activation="
                              "gelu_tanh and no qkv_bias); it cannot be exported")
        scalar = m.query_pre_attn_scalar
        if not float(scalar).is_integer():
            raise ConfigError("model.query_pre_attn_scalar", f"{scalar:g} cannot be exported: "
                              "Gemma3TextConfig takes an integer")
        return "gemma3_text"
    off = []
    if m.query_pre_attn_scalar and m.query_pre_attn_scalar != head_dim(m):
        off.append(f"model.query_pre_attn_scalar={m.query_pre_attn_scalar:g}")
    if _local_rope_differs(m):
        off.append(f"model.rope_local_theta={m.rope_local_theta:g}")
    why = "only Gemma 3 has an attention scalar and a local RoPE base"
    if m.qk_norm and m.qkv_bias:
        off.append("model.qk_norm=true with model.qkv_bias=true")
        why = "Qwen3's QK-norm comes without q/k/v biases"
    if off:
        raise ConfigError(off[0].split("=")[0], f"{', '.join(off)} with Llama's block "
                          "(sandwich_norm=false, norm_weight_offset=0): no transformers class "
                          f"computes this mix ({why}); it cannot be exported")
    return "qwen3" if m.qk_norm else None
