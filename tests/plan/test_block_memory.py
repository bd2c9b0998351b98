"""plan/activations.py's per-block count against what autograd really keeps: the bytes of the
distinct tensors one block's forward saves for backward (a saved-tensors hook), for the block
switches of issue 21 (any head_dim, QK-norm, sandwich norms, GeGLU) and sliding / full layers."""
import pytest
import torch

from support.common import small_config
from ulysses_train.model.gpt import GPT
from ulysses_train.model.rope import rope_cos_sin
from ulysses_train.plan import activations as act
from ulysses_train.plan.shapes import shapes_of

GEMMA = {"n_layers": 2, "d_model": 128, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 352,
         "head_dim": 64, "qk_norm": True, "sandwich_norm": True, "mlp_activation": "gelu_tanh",
         "norm_weight_offset": 1.0, "sliding_window": 16,
         "layer_types": ["sliding_attention", "full_attention"]}
VARIANTS = {"gemma-like": {}, "no qk_norm": {"qk_norm": False},
            "no sandwich_norm": {"sandwich_norm": False}, "silu": {"mlp_activation": "silu"},
            "head_dim d/h": {"head_dim": 0}, "llama-like": {"qk_norm": False, "head_dim": 0,
                                                            "sandwich_norm": False}}
ROWS, SEQ = 2, 64


def _saved_bytes(model: GPT, layer: int) -> int:
    """Bytes of the distinct storages block `layer`'s forward saves for backward, less the
    parameters and the RoPE tables (shared by every layer, priced once: rope_tables)."""
    pos = torch.arange(SEQ).expand(ROWS, SEQ)
    cos, sin = rope_cos_sin(pos, model.inv_freq, 1.0)  # (B, S, 1, D) each
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), cos, sin]}
    x = torch.randn(ROWS, SEQ, model.cfg.d_model, requires_grad=True) * 1.0  # an activation
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in shared:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[layer](x, cos, sin)
    return sum(seen.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_saved_is_what_autograd_keeps(variant):
    """Within 1 %: every term is a tensor counted exactly (the rest is a few bytes per token);
    leaving out QK-norm's inputs (-18 %), the post norms (-12 %) or head_dim (-18 %) fails."""
    cfg = small_config(model={**GEMMA, **VARIANTS[variant]}, data={"seq_len": SEQ},
                       train={"micro_batch_size": ROWS})
    sh = shapes_of(cfg, 1, "cpu")
    model = GPT(cfg.model)
    model.init_weights(0)
    for layer in range(cfg.model.n_layers):
        predicted, saved = act.block_saved(sh, "cpu", sh.window(layer)), _saved_bytes(model, layer)
        assert abs(predicted / saved - 1) < 0.01, (layer, predicted, saved)


def test_gemma_sliding_layers_have_their_own_rope_tables():
    """model.rope_local_theta: the model builds a second cos/sin pair (gpt.py), priced twice."""
    base = small_config(model=GEMMA, data={"seq_len": SEQ}, train={"micro_batch_size": ROWS})
    local = small_config(model={**GEMMA, "rope_local_theta": 10000.0}, data={"seq_len": SEQ},
                         train={"micro_batch_size": ROWS})
    one = act.rope_tables(shapes_of(base, 1, "cpu"))
    assert one == 2 * ROWS * SEQ * 64 * 4  # cos and sin, fp32 (B, S, 1, D)
    assert act.rope_tables(shapes_of(local, 1, "cpu")) == 2 * one
    assert GPT(local.model).inv_freq_local is not None and GPT(base.model).inv_freq_local is None
