"""Attention FLOPs count the visible pairs only: causal x document x sliding window, per layer.

Every count is checked against a brute-force count of the dense boolean mask the CPU kernels
use (model/masking.py), never against the closed form it is derived from.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ulysses_train.config.schema import ModelConfig
from ulysses_train.model.flops import (
    attention_flops,
    flops_per_token,
    model_flops,
    row_spans,
    span_count,
)
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
