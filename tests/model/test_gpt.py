"""The GPT: shapes, causality, the (loss_sum, n_valid) contract, layout-independent init, tying."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ulysses_train.config.schema import ModelConfig
from ulysses_train.model import (
    GPT,
    eager_attention,
    flops_per_token,
    num_params,
    padded_vocab,
    rope_inv_freq,
    sdpa_attention,
)
from ulysses_train.model.init import param_seed

CFG = ModelConfig(name="test", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                  vocab_size=1000)


def build(cfg=CFG, seed=0, attention_fn=sdpa_attention, meta=False) -> GPT:
    if meta:
        with torch.device("meta"):
            model = GPT(cfg, attention_fn)
        model.to_empty(device="cpu")
    else:
        model = GPT(cfg, attention_fn)
    model.init_weights(seed)
    return model


def batch(B=2, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (B, S), generator=g)
    return ids, torch.arange(S).expand(B, S)


def test_padded_vocab():
    assert [padded_vocab(v) for v in (1, 128, 129, 1000, 8192, 32000, 128256)] == \
        [128, 128, 256, 1024, 8192, 32000, 128256]


def test_forward_shapes_and_names():
    model = build()
    ids, pos = batch()
    assert model(ids, pos).shape == (2, 12, 1024)
    names = dict(model.named_parameters())
    for n in ("tok_embeddings.weight", "layers.1.attention_norm.weight", "layers.1.attention.wq.weight",
              "layers.1.attention.wk.weight", "layers.1.attention.wv.weight", "layers.1.attention.wo.weight",
              "layers.1.ffn_norm.weight", "layers.1.feed_forward.w1.weight",
              "layers.1.feed_forward.w2.weight",
              "layers.1.feed_forward.w3.weight", "norm.weight", "output.weight"):
        assert n in names, n
    assert names["layers.0.attention.wk.weight"].shape == (2 * 16, 64)  # GQA: n_kv_heads * head_dim
    assert "inv_freq" not in model.state_dict()  # derived, not checkpointed


def test_causal_whole_model():
    model = build()
    ids, pos = batch()
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % CFG.vocab_size
    a, b = model(ids, pos), model(changed, pos)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_positions_are_used():
    model = build()
    ids, pos = batch()
    assert not torch.allclose(model(ids, pos), model(ids, pos + 5))


def test_eager_and_sdpa_models_agree_and_fn_is_injected():
    calls = []

    def counting(q, k, v, *, causal=True):
        calls.append((q.shape, k.shape, causal))
        return eager_attention(q, k, v, causal=causal)

    ids, pos = batch()
    a, b = build()(ids, pos), build(attention_fn=counting)(ids, pos)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert calls == [((2, 12, 4, 16), (2, 12, 2, 16), True)] * CFG.n_layers


def test_loss_sum_and_count_with_uneven_ignore():
    model = build()
    ids, pos = batch()
    labels = torch.roll(ids, -1, dims=1)
    labels[0, -1] = -100
    labels[1, 2:9] = -100  # rows have 11 and 5 valid labels: a mean of row means would differ
    loss_sum, n_valid = model(ids, pos, labels)
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0 and loss_sum.requires_grad
    assert n_valid.dtype == torch.int64 and n_valid.dim() == 0 and int(n_valid) == 11 + 5
    logits = model(ids, pos)
    expected = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                               ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss_sum, expected)
    loss_sum.backward()
    assert model.tok_embeddings.weight.grad is not None


def test_loss_all_ignored_is_zero_not_nan():
    model = build()
    ids, pos = batch()
    loss_sum, n_valid = model(ids, pos, torch.full_like(ids, -100))
    assert loss_sum.item() == 0.0 and n_valid.item() == 0


def test_loss_is_fp32_under_bf16_autocast():
    model = build()
    ids, pos = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, _ = model(ids, pos, torch.roll(ids, -1, 1))
    assert loss_sum.dtype == torch.float32
    ref, _ = model(ids, pos, torch.roll(ids, -1, 1))
    assert abs(loss_sum.item() - ref.item()) / ref.item() < 2e-2


def test_init_meta_equals_cpu_and_seed_matters():
    cpu, meta, other = build(seed=3), build(seed=3, meta=True), build(seed=4)
    sd_cpu, sd_meta, sd_other = cpu.state_dict(), meta.state_dict(), other.state_dict()
    assert sd_cpu.keys() == sd_meta.keys()
    for name in sd_cpu:
        assert torch.equal(sd_cpu[name], sd_meta[name]), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(sd_cpu[name], sd_other[name]), name
    assert torch.equal(meta.inv_freq, rope_inv_freq(16, CFG.rope_theta))  # recomputed after to_empty


def test_init_depends_on_name_not_module_order():
    two, four = build(seed=1), build(replace(CFG, n_layers=4), seed=1)
    p2, p4 = dict(two.named_parameters()), dict(four.named_parameters())
    for name in ("tok_embeddings.weight", "layers.1.attention.wq.weight", "layers.1.feed_forward.w3.weight",
                 "output.weight"):
        assert torch.equal(p2[name], p4[name]), name
    # Residual projections: same draws, scaled by 1/sqrt(2 * n_layers).
    torch.testing.assert_close(p4["layers.1.attention.wo.weight"],
                               p2["layers.1.attention.wo.weight"] * math.sqrt(4 / 8))


def test_init_statistics():
    cfg = replace(CFG, d_model=256, n_heads=4, n_kv_heads=4, ffn_hidden=512)
    p = dict(build(cfg).named_parameters())
    assert abs(p["layers.0.attention.wq.weight"].std().item() - 0.02) < 1e-3
    assert abs(p["layers.0.feed_forward.w2.weight"].std().item() - 0.02 / 2) < 1e-3  # sqrt(2*2)
    assert torch.equal(p["layers.0.ffn_norm.weight"], torch.ones(256))


def test_param_seed_is_stable_and_ignores_wrappers():
    # A pinned value: would change if someone switched to Python's (salted) hash().
    assert param_seed(0, "tok_embeddings.weight") == 0x6B18E410BA00893E
    assert param_seed(0, "layers.0._checkpoint_wrapped_module.attention.wq.weight") == \
        param_seed(0, "layers.0.attention.wq.weight")
    assert param_seed(0, "layers.0.attention.wq.weight") != param_seed(1, "layers.0.attention.wq.weight")


def test_init_restores_fp32_inv_freq():
    model = build().to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.bfloat16
    model.init_weights(0)
    assert model.inv_freq.dtype == torch.float32


def test_tied_embeddings_share_one_tensor_counted_once():
    tied_cfg = replace(CFG, tie_embeddings=True)
    tied, untied = build(tied_cfg, meta=True), build(CFG)
    assert tied.output is None and "output.weight" not in tied.state_dict()
    emb = tied.tok_embeddings.weight.numel()
    assert num_params(tied) == num_params(untied) - emb
    assert num_params(tied, exclude_embeddings=True) == num_params(untied, exclude_embeddings=True) - emb
    ids, pos = batch()
    loss_sum, _ = tied(ids, pos, torch.roll(ids, -1, 1))
    loss_sum.backward()
    # The head's gradient lands on the embedding: rows of tokens never input still get one.
    unused = torch.ones(tied.vocab_size, dtype=torch.bool)
    unused[ids.unique()] = False
    assert tied.tok_embeddings.weight.grad[unused].abs().sum() > 0
    with torch.no_grad():
        tied.tok_embeddings.weight[5] += 1.0  # editing the one tensor moves the head logit
    assert not torch.allclose(tied(ids, pos)[..., 5], build(tied_cfg, meta=True)(ids, pos)[..., 5])


def test_num_params_and_flops():
    model = build()
    d, v = CFG.d_model, padded_vocab(CFG.vocab_size)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96 + 2 * 64
    assert num_params(model) == 2 * per_layer + d + 2 * v * d
    assert num_params(model, exclude_embeddings=True) == 2 * per_layer + d + v * d
    n = num_params(model, exclude_embeddings=True)
    assert flops_per_token(CFG, 512) == 6 * n + 6 * 2 * 64 * 512
    assert flops_per_token(replace(CFG, tie_embeddings=True), 512) == flops_per_token(CFG, 512)


def test_shape_mismatch_raises():
    model = build()
    ids, pos = batch()
    with pytest.raises(ValueError):
        model(ids, pos[:, :5])
