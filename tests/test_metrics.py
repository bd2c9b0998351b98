"""FLOPs, peak table and MFU: one formula, and an impossible MFU is an error, not a number."""
from __future__ import annotations

import pytest
import torch

from ulysses_train.metrics import PEAK_FLOPS, mfu_of, peak_flops
from ulysses_train.model import flops_per_token, model_config, padded_vocab


def test_mfu_is_achieved_over_peak():
    assert mfu_of(6e9, 50_000, 989e12) == pytest.approx(6e9 * 50_000 / 989e12)


def test_mfu_above_one_is_an_error():
    with pytest.raises(ValueError, match="MFU .* > 100%"):
        mfu_of(6e9, 200_000, 989e12)


def test_peak_table_prefers_the_specific_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda")) == PEAK_FLOPS["H100 PCIe"] < PEAK_FLOPS["H100"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda")) == PEAK_FLOPS["H100"]
    assert peak_flops(torch.device("cpu")) is None


def test_flops_per_token_is_the_documented_formula():
    """6 N (every matmul weight incl. the head, not the embedding lookup) + 6 L d S."""
    cfg = model_config("tinyllama_1b")
    d, f, layers, hd = cfg.d_model, cfg.ffn_hidden, cfg.n_layers, cfg.d_model // cfg.n_heads
    per_layer = 2 * d * d + 2 * d * cfg.n_kv_heads * hd + 3 * d * f + 2 * d
    n = layers * per_layer + d + d * padded_vocab(cfg.vocab_size)
    assert flops_per_token(cfg, 8192) == 6 * n + 6 * layers * d * 8192
    # attention grows linearly with S per token (causal triangle counted once)
    grow = flops_per_token(cfg, 16384) - flops_per_token(cfg, 8192)
    assert grow == 6 * layers * d * 8192
