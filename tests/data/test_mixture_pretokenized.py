"""Pre-tokenized sources inside a mixture: exact ids through the windows, and text beside them."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from support.data import build
from support.megatron_writer import write_megatron
from support.mixture import mixture_cfg
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import DataConfig, SourceConfig


def _documents(rng, n, vocab, eos):
    return [np.append(rng.integers(2, vocab, size=rng.integers(5, 60)), eos) for _ in range(n)]


def _stream_docs(data, name):
    stream = data.sources[name]["train"]
    o = stream.doc_offsets
    return [np.asarray(stream.tokens[int(a):int(b)]) for a, b in zip(o[:-1], o[1:])]


@pytest.mark.parametrize("fmt", ["megatron", "npy", "bin"])
def test_each_format_streams_exactly_the_ids_written(tmp_path, fmt):
    rng = np.random.default_rng(0)
    docs = _documents(rng, 40, 500, eos=1)
    if fmt == "megatron":
        write_megatron(tmp_path / "m", [[d.tolist()] for d in docs], dtype="uint16")
        src = SourceConfig(name="pre", kind="megatron", paths=[str(tmp_path / "m")])
    else:
        flat = np.concatenate(docs).astype(np.uint16)
        path = tmp_path / f"t.{fmt}"
        np.save(path, flat) if fmt == "npy" else flat.tofile(path)
        src = SourceConfig(name="pre", kind="tokens", paths=[str(path)], eos_id=1,
                           dtype="" if fmt == "npy" else "uint16")
    cfg = DataConfig(seq_len=32, val_fraction=0.0, cache_dir=str(tmp_path / "cache"),
                     sources=[src])
    data = build(cfg, batch=4, vocab=512)
    got = _stream_docs(data, "pre")
    assert len(got) == len(docs) and all(np.array_equal(a, b) for a, b in zip(got, docs))
    # and the windows are cut from that stream: row 0 of step 0 is some window of it
    flat = np.concatenate(docs)
    row = data.global_batch(0).input_ids[0].numpy()
    starts = np.flatnonzero(flat[:len(flat) - 32] == row[0])
    assert any(np.array_equal(flat[s:s + 32], row) for s in starts)


def test_a_pretokenized_and_a_text_source_mix(tmp_path):
    text = mixture_cfg(tmp_path)
    first = build(dataclasses.replace(text, sources=[text.sources[0]]), batch=4)
    model = str(first.cache_path / "tokenizer.model")
    rng = np.random.default_rng(1)
    write_megatron(tmp_path / "m", [[d.tolist()] for d in _documents(rng, 60, 300, first.eos_id)])
    mixed = dataclasses.replace(text, tokenizer_path=model, sources=[
        text.sources[0], SourceConfig(name="pre", kind="megatron", paths=[str(tmp_path / "m")],
                                      weight=3.0)])
    data = build(mixed, batch=8)
    assert set(data.sources) == {"short", "pre"}
    assert data.global_batch(3).input_ids.shape == (8, 64)
    assert data.for_source("pre").global_batch(0, "val").input_ids.max() < 300
    # without the tokenizer the ids were made with, the mixture is refused
    with pytest.raises(ConfigError) as err:
        build(dataclasses.replace(mixed, tokenizer_path=""), batch=8)
    assert err.value.key == "data.tokenizer_path"


def test_vocabulary_overflow_is_one_error_naming_the_file(tmp_path):
    write_megatron(tmp_path / "m", [[[5, 6, 700, 1]], [[7, 8, 1]]])
    cfg = DataConfig(seq_len=2, val_fraction=0.0, cache_dir=str(tmp_path / "cache"),
                     sources=[SourceConfig(kind="megatron", paths=[str(tmp_path / "m")])])
    with pytest.raises(ConfigError) as err:
        build(cfg, batch=2, vocab=512)
    assert "m.bin" in err.value.message or "m.idx" in err.value.message
