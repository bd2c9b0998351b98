"""Long-document shaping (data/shaping.py) and the realised length profile (data/lengths.py)."""
from __future__ import annotations

import numpy as np
import pytest

from support.data import build
from support.mixture import mixture_cfg
from ulysses_train.data.cache import load_split, read_complete
from ulysses_train.data.lengths import length_profile, tokens_per_document
from ulysses_train.data.shaping import copies, occurrences, unit_hash


def _cache_docs(data, name):
    """The source's train documents as the cache holds them: a list of token arrays."""
    cache = data.cache_path.parent / data.identity["data.cache"][list(data.sources).index(name)]
    ids, offsets = load_split(cache, read_complete(cache), "train")
    return [np.asarray(ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def _stream_docs(data, name):
    stream = data.sources[name]["train"]
    o = stream.doc_offsets
    return [np.asarray(stream.tokens[int(a):int(b)]) for a, b in zip(o[:-1], o[1:])]


def test_min_and_max_tokens_keep_exactly_the_documents_in_range(tmp_path):
    data = build(mixture_cfg(tmp_path, min_tokens=120, max_tokens=300), batch=4)
    docs = _cache_docs(data, "long")
    expected = [d for d in docs if 120 <= len(d) <= 300]
    got = _stream_docs(data, "long")
    assert 0 < len(got) == len(expected) < len(docs)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert len(_stream_docs(data, "short")) == len(_cache_docs(data, "short"))  # untouched


def test_length_upsample_repeats_long_documents_as_documented(tmp_path):
    factor, long_tokens = 2.5, 150
    data = build(mixture_cfg(tmp_path, length_upsample=factor, long_tokens=long_tokens), batch=4)
    docs = _cache_docs(data, "long")
    lengths = np.array([len(d) for d in docs])
    from ulysses_train.data.mixed import UPSAMPLE_SALT

    counts = copies(lengths, factor, long_tokens, UPSAMPLE_SALT ^ 0)  # seed 0
    is_long = lengths >= long_tokens
    assert set(counts[~is_long]) == {1} and set(counts[is_long]) <= {2, 3}
    assert abs(counts[is_long].mean() - factor) < 0.2  # E[c] = F per long document
    # the stream: pass 0 every document, pass 1 the long ones, pass 2 those drawn 3 times
    order = occurrences(np.arange(len(docs)), counts)
    assert order.tolist() == (list(range(len(docs))) + np.flatnonzero(counts > 1).tolist()
                              + np.flatnonzero(counts > 2).tolist())
    got = _stream_docs(data, "long")
    assert len(got) == counts.sum()
    assert all(np.array_equal(got[j], docs[d]) for j, d in enumerate(order))
    share = lambda c: (c * lengths)[is_long].sum() / (c * lengths).sum()  # noqa: E731
    p = share(np.ones_like(counts))
    print(f"long-document token share {p:.3f} -> {share(counts):.3f} (formula with F=E[c]: "
          f"{factor * p / (factor * p + 1 - p):.3f})")
    assert share(counts) > p


def test_upsampling_touches_train_only_and_filters_both_splits(tmp_path):
    data = build(mixture_cfg(tmp_path, min_tokens=100, length_upsample=3.0), batch=4)
    val = data.sources["long"]["val"]
    lengths = np.diff(val.doc_offsets)
    assert lengths.min() >= 100
    assert len(set(val.doc_offsets[:-1].tolist())) == len(lengths)  # no document twice


def test_document_positions_restart_at_each_occurrence(tmp_path):
    cfg = mixture_cfg(tmp_path, length_upsample=2.0, long_tokens=1)
    cfg.document_mask = True
    data = build(cfg, batch=4)
    alone = data.for_source("long")
    batch = alone.global_batch(3)
    ids, pos = batch.document_ids, batch.position_ids
    starts = np.r_[True, ids[0, 1:].numpy() != ids[0, :-1].numpy()]
    assert (pos[0].numpy()[starts][1:] == 0).all()  # every later document starts at 0


def test_unit_hash_is_a_pure_uniform_function_of_the_index():
    u = unit_hash(np.arange(100_000), 7)
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(unit_hash(np.arange(50_000, 60_000), 7), u[50_000:60_000])
    assert not np.array_equal(unit_hash(np.arange(10), 8), u[:10])


@pytest.mark.parametrize("seed", range(5))
def test_tokens_per_document_is_the_coverage_of_the_windows_read(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=30)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    s = int(rng.integers(2, 17))
    reads = rng.integers(0, 4, size=(offsets[-1] - 1) // s)
    coverage = np.zeros(offsets[-1], dtype=np.int64)
    for w, c in enumerate(reads):
        coverage[w * s:w * s + s] += c
    brute = [coverage[a:b].sum() for a, b in zip(offsets[:-1], offsets[1:])]
    assert tokens_per_document(offsets, s, reads).tolist() == brute


def test_the_length_profile_counts_every_token_the_run_reads(tmp_path):
    data = build(mixture_cfg(tmp_path), batch=8)
    profile = length_profile(data, 50)
    samples = data.source_samples(50)
    for name, row in profile["sources"].items():
        assert sum(row["tokens"]) == samples[name] * 64  # each sample: 64 input tokens
    assert len(profile["edges"]) == len(row["tokens"]) + 1
