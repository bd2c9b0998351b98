"""global_batch is a pure function of (seed, step, split): builds, rows and layouts agree."""
import pytest
import torch

from support.data import build, small_stdlib
from ulysses_train.config.schema import DataConfig


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))


def synthetic_pair(tmp_path):
    cfg = DataConfig(name="synthetic", seq_len=48)
    return build(cfg), build(cfg), build(cfg, seed=1)


def stdlib_pair(tmp_path):
    # Two caches built from scratch, independently: tokenizer training must be deterministic too.
    first = build(small_stdlib(tmp_path / "a"))
    second = build(small_stdlib(tmp_path / "b"))
    assert first.cache_path != second.cache_path
    return first, second, build(small_stdlib(tmp_path / "a"), seed=1)


@pytest.mark.parametrize("make", [synthetic_pair, stdlib_pair], ids=["synthetic", "stdlib"])
def test_global_batch_is_pure(make, tmp_path):
    source, rebuilt, other_seed = make(tmp_path)
    for step in (0, 3, 1000):  # 1000: far past one epoch of the small corpus
        full = source.global_batch(step)
        assert full.shape == (6, source.global_batch(0).shape[1])
        assert same(full, rebuilt.global_batch(step))
        assert same(full.slice(rows=slice(2, 4)), source.global_batch(step, rows=slice(2, 4)))
        assert same(full.slice(rows=slice(5, 6)), rebuilt.global_batch(step, rows=slice(5, None)))
        assert not same(full, source.global_batch(step + 1))
        assert not same(full, other_seed.global_batch(step))
        assert not same(full, source.global_batch(step, "val"))
    assert same(source.global_batch(2, "val"), rebuilt.global_batch(2, "val"))
    assert source.describe() == rebuilt.describe()


def test_data_parallel_ranks_cover_the_global_batch(stdlib_source):
    full = stdlib_source.global_batch(7)
    parts = [stdlib_source.global_batch(7, rows=slice(r * 2, r * 2 + 2)) for r in range(3)]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), full.input_ids)
    assert torch.equal(torch.cat([p.labels for p in parts]), full.labels)


def test_bad_split_and_step(stdlib_source):
    with pytest.raises(ValueError):
        stdlib_source.global_batch(0, "test")
    with pytest.raises(ValueError):
        stdlib_source.global_batch(-1)
