"""Synthetic data: valid, learnable (low-entropy) tokens with real document structure."""
import math

import torch

from ulysses_train.config.schema import DataConfig
from ulysses_train.data import build_data


def synthetic(seq_len=256, vocab=512, seed=0, batch=8):
    cfg = DataConfig(name="synthetic", seq_len=seq_len)
    return build_data(cfg, seed=seed, global_batch_size=batch, model_vocab_size=vocab)


def test_tokens_are_in_range_and_zipf_distributed():
    source = synthetic()
    assert source.vocab_size == 512 and source.eos_id == 0
    ids = torch.cat([source.global_batch(s).input_ids.flatten() for s in range(8)])
    assert ids.min() >= 0 and ids.max() < 512
    counts = torch.bincount(ids, minlength=512).double()
    assert counts[1] > 20 * counts[400:].mean()  # the head is far more frequent than the tail
    p = counts[1:] / counts[1:].sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    assert entropy < math.log(512) - 0.8  # a unigram model can beat log V by a clear margin


def test_documents_are_cut_by_eos():
    batch = synthetic().global_batch(0)
    assert batch.document_ids.max() > 0  # several documents per row
    assert (batch.document_ids[:, 0] == 0).all()
    steps = batch.document_ids.diff(dim=1)
    assert torch.equal(steps, (batch.input_ids[:, :-1] == 0).long())
    assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])
    assert torch.equal(batch.position_ids[1], torch.arange(256))
