"""Parameter names: ours (model/gpt.py) <-> Hugging Face Llama/Mistral/Ministral/Qwen2.

Both sides use the rotate-half RoPE convention (model/rope.py), so q/k weights need no row
permutation: a tensor keeps its values and shape, only its name changes. The mapping is per
layer and exhaustive for the architectures we accept; biases exist only for q/k/v (Qwen2,
`model.qkv_bias=true`).
"""
from __future__ import annotations

# (ours, Hugging Face) per decoder layer, `{i}` = layer index.
_LAYER = (
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
_QKV_BIAS = (
    ("layers.{i}.attention.wq.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("layers.{i}.attention.wk.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("layers.{i}.attention.wv.bias", "model.layers.{i}.self_attn.v_proj.bias"),
)
_GLOBAL = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
)
_OUTPUT = ("output.weight", "lm_head.weight")


def hf_names(n_layers: int, tie_embeddings: bool, qkv_bias: bool = False) -> dict[str, str]:
    """{our parameter name: Hugging Face tensor name} for every parameter of our GPT.

    With tied embeddings our model has no `output.weight` and HF checkpoints usually have no
    `lm_head.weight` (transformers re-ties it on load), so neither side lists it.
    """
    pairs = list(_GLOBAL)
    if not tie_embeddings:
        pairs.append(_OUTPUT)
    per_layer = _LAYER + (_QKV_BIAS if qkv_bias else ())
    for i in range(n_layers):
        pairs += [(ours.format(i=i), theirs.format(i=i)) for ours, theirs in per_layer]
    return dict(pairs)


def our_name(hf_name: str, mapping: dict[str, str]) -> str | None:
    """Our name for a Hugging Face tensor name, or None if `mapping` (from `hf_names`) lacks it."""
    inverse = {theirs: ours for ours, theirs in mapping.items()}
    return inverse.get(hf_name)
