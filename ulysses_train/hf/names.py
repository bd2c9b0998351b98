"""Parameter names: ours (model/gpt.py) <-> Hugging Face Llama/Mistral/Ministral/Qwen2/Qwen3/Gemma 3.

Both sides use the rotate-half RoPE convention (model/rope.py), so q/k weights need no row
permutation: a tensor keeps its values and shape, only its name changes. The mapping is per
layer and exhaustive for the architectures we accept, decided by the ModelConfig's switches:
q/k/v biases (Qwen2, `model.qkv_bias`), the per-head q/k norms (Qwen3, Gemma 3,
`model.qk_norm`), and Gemma's four norms per block (`model.sandwich_norm`), where
`post_attention_layernorm` is the norm *after* attention (our post_attention_norm), while in
Llama's block it is the norm before the MLP (our ffn_norm).
"""
from __future__ import annotations

# (ours, Hugging Face below the model prefix) per decoder layer, `{i}` = layer index, in the
# order an export writes them: attention, the norms between, the MLP.
_ATTENTION = (
    ("layers.{i}.attention_norm.weight", "layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attention.wq.weight", "layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "layers.{i}.self_attn.o_proj.weight"),
)
_MLP = (
    ("layers.{i}.feed_forward.w1.weight", "layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "layers.{i}.mlp.down_proj.weight"),
)
_LLAMA_NORMS = (("layers.{i}.ffn_norm.weight", "layers.{i}.post_attention_layernorm.weight"),)
_SANDWICH_NORMS = (
    ("layers.{i}.post_attention_norm.weight", "layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "layers.{i}.pre_feedforward_layernorm.weight"),
    ("layers.{i}.post_ffn_norm.weight", "layers.{i}.post_feedforward_layernorm.weight"),
)
_QKV_BIAS = (
    ("layers.{i}.attention.wq.bias", "layers.{i}.self_attn.q_proj.bias"),
    ("layers.{i}.attention.wk.bias", "layers.{i}.self_attn.k_proj.bias"),
    ("layers.{i}.attention.wv.bias", "layers.{i}.self_attn.v_proj.bias"),
)
_QK_NORM = (
    ("layers.{i}.attention.q_norm.weight", "layers.{i}.self_attn.q_norm.weight"),
    ("layers.{i}.attention.k_norm.weight", "layers.{i}.self_attn.k_norm.weight"),
)
_GLOBAL = (("tok_embeddings.weight", "embed_tokens.weight"), ("norm.weight", "norm.weight"))
HEAD = "lm_head.weight"


def hf_names(cfg, prefix: str = "model.", head: str = HEAD) -> dict[str, str]:
    """{our parameter name: Hugging Face tensor name} for every parameter of our GPT built
    from ModelConfig `cfg` (n_layers, tie_embeddings, qkv_bias, qk_norm, sandwich_norm).

    `prefix`: where the decoder's tensors live ("model." in a *ForCausalLM checkpoint;
    "language_model.model." or "model.language_model." in a Gemma3ForConditionalGeneration
    one: hf/weights_dir.py language_model_layout); `head`: the untied output head's name.
    With tied embeddings our model has no `output.weight` and HF checkpoints usually have no
    `lm_head.weight` (transformers re-ties it on load), so neither side lists it.
    """
    pairs = [(ours, prefix + theirs) for ours, theirs in _GLOBAL]
    if not cfg.tie_embeddings:
        pairs.append(("output.weight", head))
    per_layer = _ATTENTION + (_SANDWICH_NORMS if cfg.sandwich_norm else _LLAMA_NORMS) + _MLP
    per_layer += (_QKV_BIAS if cfg.qkv_bias else ()) + (_QK_NORM if cfg.qk_norm else ())
    for i in range(cfg.n_layers):
        pairs += [(ours.format(i=i), prefix + theirs.format(i=i)) for ours, theirs in per_layer]
    return dict(pairs)


def our_name(hf_name: str, mapping: dict[str, str]) -> str | None:
    """Our name for a Hugging Face tensor name, or None if `mapping` (from `hf_names`) lacks it."""
    inverse = {theirs: ours for ours, theirs in mapping.items()}
    return inverse.get(hf_name)
