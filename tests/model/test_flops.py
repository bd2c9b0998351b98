"""Attention FLOPs count the visible pairs only: causal x document x sliding window, per layer;
the weights count follows the modules' shapes (any head_dim, QK-norm, sandwich norms).

Every count is checked against a brute-force count of the dense boolean mask the CPU kernels
use (model/masking.py), or against torch's own FLOP counter on a real forward + backward, never
against the closed form it is derived from.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ulysses_train.config.schema import ModelConfig
from ulysses_train.model.attention import eager_attention
from ulysses_train.model.flops import (
    attention_flops,
    flops_per_token,
    model_flops,
    row_spans,
    span_count,
)
from ulysses_train.model.gpt import GPT
from ulysses_train.model.masking import DocumentMask, sliding_dense
from ulysses_train.train.metrics import span_sq_sum

CFG = ModelConfig(name="test", n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                  vocab_size=1000)
MIXED = replace(CFG, sliding_window=5,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"])


def _visible(dense: torch.Tensor) -> int:
    """Visible (query, key) pairs of a boolean mask: a plain count of its True entries."""
    return int(dense.sum())


def _causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()  # (L, L): key <= query


@pytest.mark.parametrize("length", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("window", [0, 1, 2, 5, 16, 40])
def test_span_count_is_twice_the_visible_pairs_less_the_tokens(length, window):
    dense = sliding_dense(length, window, "cpu") if window else _causal(length)
    assert span_count(length, window) == 2 * _visible(dense) - length
    if window == 0 or window >= length:
        assert span_count(length, window) == length**2  # full causal: the count MFU always used


LAYOUTS = {  # (B, S) document ids: one document; several; a long one crossing many windows
    "one document": [[0] * 24],
    "several": [[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4]],
    "two rows": [[0] * 10 + [1] * 14, [0, 1, 1] + [2] * 21],
    "singletons": [list(range(24))],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window", [0, 1, 3, 8, 30])
def test_span_sq_sum_counts_the_document_and_window_mask(layout, window):
    """The trainer's on-device count equals 2 x the True entries of the kernels' own dense mask
    (same document, causal, within the window) less the tokens, for every document layout."""
    ids = torch.tensor(LAYOUTS[layout])
    dense = DocumentMask(ids).dense(window)  # (B, 1, S, S)
    assert int(span_sq_sum(ids, window)) == 2 * _visible(dense) - ids.numel()


def test_a_mixed_model_counts_each_layer_with_its_own_window():
    seq = 64
    dense = {0: _causal(seq), 5: sliding_dense(seq, 5, "cpu")}
    brute = sum(2 * _visible(dense[w]) - seq for w in (5, 5, 0))  # layer by layer
    assert attention_flops(MIXED, row_spans(MIXED, seq)) == 6 * MIXED.d_model * brute
    full = flops_per_token(CFG, seq)
    assert full - flops_per_token(MIXED, seq) == 6 * 64 * 2 * (seq**2 - span_count(seq, 5)) // seq
    assert full > flops_per_token(MIXED, seq)
    # Mistral: a window without layer_types makes every layer sliding.
    mistral = replace(CFG, sliding_window=5)
    assert attention_flops(mistral, row_spans(mistral, seq)) == 6 * 64 * 3 * span_count(seq, 5)


def test_all_full_models_keep_their_flops():
    """6 N + 6 L d S per token, and an int count is still the full layers' sum of squares."""
    seq = 512
    assert flops_per_token(CFG, seq) * seq == model_flops(CFG, seq, seq**2)
    assert attention_flops(CFG, row_spans(CFG, seq)) == 6 * CFG.n_layers * CFG.d_model * seq**2
    # a window as long as the sequence is plain causal attention
    long_window = replace(MIXED, sliding_window=seq)
    assert flops_per_token(long_window, seq) == flops_per_token(CFG, seq)


def test_a_single_count_is_refused_for_a_sliding_model():
    with pytest.raises(ValueError, match="sliding-window layers"):
        attention_flops(MIXED, 64**2)
    with pytest.raises(ValueError, match=r"window\(s\) \[5\]"):
        attention_flops(MIXED, {0: 64**2})


# Qwen3 / Gemma 3 shapes at toy size: heads of 48 on d 64 (Hq D = 192 != d), GQA, QK-norm,
# sandwich norms, GeGLU, tied embeddings, sliding and full layers.
ANY_HEAD_DIM = replace(MIXED, head_dim=48, qk_norm=True, sandwich_norm=True,
                       mlp_activation="gelu_tanh", tie_embeddings=True)


@pytest.mark.parametrize("cfg", [ANY_HEAD_DIM, replace(CFG, head_dim=24)], ids=["gemma-like",
                                                                                "plain"])
def test_flops_follow_the_module_shapes_with_any_head_dim(cfg):
    """torch's FlopCounterMode on a forward + backward of the model: its matmuls (aten.mm: the
    projections, MLP and head, 2 + 4 FLOPs per weight and token) are 6 x (N - the norm weights
    the model holds) x tokens, and its attention matmuls (aten.bmm of the eager kernel, which
    computes the whole S x S square in every layer: 12 Hq D per pair) are twice
    attention_flops of a full span S^2 per layer: both follow Hq x head_dim, not d_model."""
    rows, seq = 2, 16
    model = GPT(cfg, attention_fn=eager_attention)
    model.init_weights(0)
    ids = torch.randint(0, cfg.vocab_size, (rows, seq))
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(ids, torch.arange(seq).expand(rows, seq), labels=ids)
        loss.backward()
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counted) == {"aten.mm", "aten.bmm"}, counted
    tokens = rows * seq
    squares = {w: rows * seq**2 for w in row_spans(cfg, seq)}  # every layer's window: S^2
    weights = (model_flops(cfg, tokens, squares) - attention_flops(cfg, squares)) // (6 * tokens)
    norms = sum(p.numel() for name, p in model.named_parameters() if name.endswith("norm.weight"))
    assert counted["aten.mm"] == 6 * tokens * (weights - norms)
    assert counted["aten.bmm"] == 2 * attention_flops(cfg, squares)
