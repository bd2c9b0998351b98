"""Tokenizer sizing and the given-tokenizer path."""
import pytest

from support.data import build, small_stdlib
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import DataConfig
from ulysses_train.data.tokenizer_train import line_chunks


def test_tiny_corpus_with_a_huge_vocab_gets_a_smaller_tokenizer(tmp_path):
    (tmp_path / "tiny.txt").write_text("the cat sat on the mat. " * 20 + "a dog, too.\n")
    (tmp_path / "other.txt").write_text("another small document about a cat and a mat.\n" * 5)
    cfg = DataConfig(name="files", paths=[str(tmp_path / "tiny.txt"), str(tmp_path / "other.txt")],
                     seq_len=8, val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    log = []
    source = build(cfg, vocab=32768, log=log)
    assert 256 < source.vocab_size < 1000  # byte pieces plus what the text supports
    assert any("supports at most" in line for line in log)
    batch = source.global_batch(0)
    assert int(batch.input_ids.max()) < source.vocab_size
    assert source.splits == ("train",)
    with pytest.raises(ConfigError) as info:
        source.global_batch(0, "val")  # val_fraction=0: there is no validation split
    assert info.value.key == "data.val_fraction"


def test_vocab_smaller_than_the_byte_alphabet_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        build(small_stdlib(tmp_path, max_docs=5), vocab=128)
    assert info.value.key == "model.vocab_size"


def test_given_tokenizer_is_used_and_checked(tmp_path, stdlib_source):
    model = str(stdlib_source.cache_path / "tokenizer.model")
    source = build(small_stdlib(tmp_path, tokenizer_path=model, max_docs=10))
    assert source.vocab_size == stdlib_source.vocab_size and source.eos_id == stdlib_source.eos_id
    for path, vocab in ((str(tmp_path / "missing.model"), 1024), (model, 512)):
        with pytest.raises(ConfigError) as info:
            build(small_stdlib(tmp_path, tokenizer_path=path), vocab=vocab)
        assert info.value.key == "data.tokenizer_path"
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ConfigError) as info:
        build(small_stdlib(tmp_path, tokenizer_path=str(tmp_path / "junk.model")))
    assert info.value.key == "data.tokenizer_path"


def test_line_chunks_keep_every_character_and_never_merge_documents():
    docs = ["a\nbb\nccc\n", "x" * 25 + "\nend", ""]
    chunks = list(line_chunks(docs, chunk_chars=6))
    assert all(len(c) <= 6 for c in chunks)
    assert "".join(chunks) == "".join(docs)
    assert chunks[:2] == ["a\nbb\n", "ccc\n"]  # whole lines while they fit
