"""Fixtures of the data tests."""
import pytest

from support.data import build, small_stdlib


@pytest.fixture(scope="session")
def stdlib_source(tmp_path_factory):
    """One small stdlib source, built once for every test that only reads it."""
    return build(small_stdlib(tmp_path_factory.mktemp("stdlib_cache")))


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    """A Llama-3-like byte-level BPE tokenizer.json (+ tokenizer_config.json), trained once."""
    from support.tokenizers import make_hf_tokenizer

    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tokenizer"))


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """Our own sentencepiece model, trained once on stdlib text."""
    from support.tokenizers import make_spm_tokenizer

    return make_spm_tokenizer(tmp_path_factory.mktemp("spm_tokenizer"))


@pytest.fixture(scope="session")
def spm_user_symbols(tmp_path_factory):
    """A sentencepiece model whose BOS/EOS are user-defined symbols (matched inside text)."""
    from support.tokenizers import make_spm_with_user_symbols

    return make_spm_with_user_symbols(tmp_path_factory.mktemp("spm_user_symbols"))
