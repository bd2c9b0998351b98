"""data.document_mask: positions restart at 0 at each document; nothing else changes.

The model tests cannot catch wrong positions (RoPE depends only on position differences, so a
document run at its packed offset attends exactly as at 0), hence the positions are checked
here directly, on both streams and through build_data.
"""
import numpy as np
import torch

from support.common import small_config
from support.data import build, small_stdlib
from ulysses_train.config.schema import DataConfig
from ulysses_train.config.validate import validate
from ulysses_train.data import DataSource, PackedTokens, build_data
from ulysses_train.data.batch import document_positions

EOS = 1


def test_document_positions_by_hand():
    ids = torch.tensor([[0, 0, 0, 1, 2, 2, 3, 3],
                        [0, 1, 1, 1, 1, 1, 1, 2],
                        [0, 0, 0, 0, 0, 0, 0, 0]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 0, 1, 0, 1],
                                                [0, 0, 1, 2, 3, 4, 5, 0],
                                                [0, 1, 2, 3, 4, 5, 6, 7]]
    assert document_positions(ids).dtype == torch.int64


def _expected_positions(input_ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Positions from the tokens alone: 0 at column 0 and right after each EOS."""
    expect = torch.empty_like(input_ids)
    for r, row in enumerate(input_ids.tolist()):
        p = 0
        for c, token in enumerate(row):
            expect[r, c] = p
            p = 0 if token == eos else p + 1
    return expect


def _check_flag(plain: DataSource, masked: DataSource, eos: int, steps=range(3), many_docs=True):
    for step in steps:
        a, b = plain.global_batch(step), masked.global_batch(step)
        for name in ("input_ids", "labels", "document_ids"):  # labels unchanged (the brief)
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(a.position_ids, torch.arange(a.shape[1]).expand(a.shape))
        assert torch.equal(b.position_ids, _expected_positions(b.input_ids, eos))
        if many_docs:  # several documents per row, so the restarts are really exercised
            assert (b.position_ids == 0).sum() > 2 * b.shape[0]
        # A data-parallel rank's rows equal the same rows of the whole batch ...
        assert torch.equal(masked.global_batch(step, rows=slice(1, 3)).position_ids,
                           b.position_ids[1:3])
        # ... and a sequence-parallel slice keeps the global row's positions (not 0.. again).
        half = b.shape[1] // 2
        assert torch.equal(b.slice(cols=slice(half, None)).position_ids, b.position_ids[:, half:])


def test_synthetic_positions_restart_when_the_flag_is_on():
    def source(flag):
        return build_data(DataConfig(name="synthetic", seq_len=64, document_mask=flag), seed=0,
                          global_batch_size=4, model_vocab_size=256)
    plain, masked = source(False), source(True)
    _check_flag(plain, masked, plain.eos_id)
    assert not torch.equal(plain.global_batch(0).position_ids, masked.global_batch(0).position_ids)


def test_packed_positions_restart_when_the_flag_is_on():
    lengths = (3, 5, 1, 7, 2, 9, 4, 6, 2, 8) * 4  # EOS included; single-token documents too
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(10, 10 + offsets[-1], dtype=np.uint16)
    tokens[offsets[1:] - 1] = EOS
    streams = {"train": PackedTokens(tokens, offsets, 12, seed=0)}

    def source(flag):
        return DataSource(streams, vocab_size=100, eos_id=EOS, global_batch_size=4,
                          summary="", document_positions=flag)
    _check_flag(source(False), source(True), EOS)


def test_build_data_threads_the_flag_to_cached_corpora(stdlib_source):
    # Same cache (positions are computed when serving, not stored): no rebuild.
    root = stdlib_source.cache_path.parent
    log = []
    masked = build(small_stdlib(root, document_mask=True), log=log)
    assert any("cached" in line for line in log), log
    _check_flag(stdlib_source, masked, stdlib_source.eos_id, steps=range(2), many_docs=False)


def test_config_accepts_document_mask():
    cfg = small_config(data={"document_mask": True})
    validate(cfg)  # no longer refused as "not supported yet"
