"""Special-token strings inside document text are text (issue 19, item 4).

A scraped page that contains `<|begin_of_text|>` or `<|end_of_text|>` must not put a second BOS
or a mid-document EOS into the packed stream: only the packer adds BOS/EOS. Checked for a
Llama-3-like tokenizer.json, for one whose tokenizer.json does not mark BOS/EOS special (only
the config names them), and for sentencepiece with BOS/EOS as user-defined symbols (which
sentencepiece matches in text); and a token cache built before is rebuilt once.
"""
import json

import pytest

from support.data import build, files_cfg
from support.tokenizers import BOS, EOS, copy_tree, stdlib_texts
from ulysses_train.data import cache
from ulysses_train.data import text_source as source
from ulysses_train.data.cache import load_split, read_complete
from ulysses_train.data.tokenizer import HFTokenizer, open_tokenizer

TEXTS = [f"{BOS}def f(x):\n    return x\n",
         f"Scraped page: the model printed {EOS} and went on.\n",
         EOS,
         f"both {BOS}{EOS} glued, and <|end_of_text| almost\n",
         stdlib_texts(1, skip=50)[0][:1500]]


def _library(path):
    """The tokenizer library's own object for `path`, as it encodes by default."""
    if str(path).endswith(".json"):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def _decode(path, ids) -> str:
    lib = _library(path)
    return lib.decode(ids, skip_special_tokens=False) if str(path).endswith(".json") \
        else lib.decode(ids)


@pytest.fixture(params=["tokenizer.json", "tokenizer.json-not-marked-special",
                        "sentencepiece-user-symbols"])
def tokenizer_path(request, tmp_path, hf_tokenizer, spm_user_symbols):
    if request.param == "tokenizer.json":
        return hf_tokenizer
    if request.param == "sentencepiece-user-symbols":
        return spm_user_symbols
    folder = copy_tree(hf_tokenizer.parent, tmp_path / "not_special")
    spec = json.loads((folder / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:  # only tokenizer_config.json says they are BOS/EOS
        token["special"] = False
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder / "tokenizer.json"


def test_special_token_strings_are_encoded_as_text(tokenizer_path):
    tok = open_tokenizer(str(tokenizer_path))
    assert tok.bos_id is not None and tok.token_to_id(EOS) == tok.eos_id  # ids still known
    default = _library(tokenizer_path).encode(TEXTS[1])
    default = default.ids if str(tokenizer_path).endswith(".json") else default
    assert tok.eos_id in default  # what the library does by default: a control id
    for text, ids in zip(TEXTS, tok.encode_batch(TEXTS)):
        assert tok.bos_id not in ids and tok.eos_id not in ids, text
        assert _decode(tokenizer_path, ids) == text  # the literal string round-trips


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece-user-symbols"])
def test_only_the_packer_adds_bos_and_eos(tmp_path, kind, hf_tokenizer, spm_user_symbols):
    """The reported case: a document starting with the text <|begin_of_text|> is packed with
    one BOS, one mentioning <|end_of_text|> has no EOS inside."""
    model = hf_tokenizer if kind == "tokenizer.json" else spm_user_symbols
    source_ = build(files_cfg(tmp_path, _write(tmp_path), tokenizer_path=str(model.parent),
                              val_fraction=0.0))
    tok = open_tokenizer(str(model))
    assert tok.add_bos and source_.bos_id == tok.bos_id
    docs = _documents(source_)
    assert len(docs) == len(TEXTS)
    for doc in docs:
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
        assert tok.bos_id not in doc[1:-1] and tok.eos_id not in doc[1:-1]
    assert sorted(_decode(model, doc[1:-1]) for doc in docs) == sorted(TEXTS)


def _write(tmp_path):
    paths = []
    for i, text in enumerate(TEXTS):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(text)
    return paths


def _documents(built) -> list[list[int]]:
    tokens, offsets = load_split(built.cache_path, read_complete(built.cache_path), "train")
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def _previous_key(parts: dict) -> str:
    """The cache key before special-token strings were text: no "text" in the tokenizer part."""
    tokenizer = {k: v for k, v in parts["tokenizer"].items() if k != "text"}
    return cache.cache_key({**parts, "tokenizer": tokenizer})


def _previous_encode(self, texts, num_threads=1):
    """encode_batch as it was: the library's default, special-token strings matched."""
    return [e.ids for e in _library(self.path).encode_batch(list(texts),
                                                           add_special_tokens=False)]


def test_a_cache_built_before_is_rebuilt_once(tmp_path, hf_tokenizer, monkeypatch):
    cfg = files_cfg(tmp_path, _write(tmp_path), tokenizer_path=str(hf_tokenizer),
                    val_fraction=0.0)
    with monkeypatch.context() as previous:
        previous.setattr(source, "cache_key", _previous_key)
        previous.setattr(HFTokenizer, "encode_batch", _previous_encode)
        old = build(cfg)
    tok = open_tokenizer(str(hf_tokenizer))
    assert any(tok.eos_id in doc[:-1] for doc in _documents(old))  # the old cache's fault

    logs = [[], []]
    new, again = build(cfg, log=logs[0]), build(cfg, log=logs[1])
    assert new.cache_path != old.cache_path and old.cache_path.exists()
    assert any(line.startswith("data: built") for line in logs[0]), logs[0]
    assert again.cache_path == new.cache_path  # then reused, not rebuilt
    assert f"data: cached {new.cache_path}" in logs[1] and not any(
        line.startswith("data: built") for line in logs[1])
    assert not any(tok.eos_id in doc[:-1] for doc in _documents(new))


def test_only_the_named_user_defined_pieces_become_control_pieces(spm_user_symbols):
    """spm_model.py edits the named user-defined pieces, no other piece, no id."""
    import sentencepiece as spm

    from ulysses_train.data.spm_model import user_defined_as_control

    before = spm.SentencePieceProcessor(model_file=str(spm_user_symbols))
    model, changed = user_defined_as_control(before.serialized_model_proto(), {EOS, "</s>"})
    after = spm.SentencePieceProcessor(model_proto=model)
    assert changed == [EOS]  # </s> is a control piece already
    n = before.get_piece_size()
    assert after.get_piece_size() == n
    assert [after.id_to_piece(i) for i in range(n)] == [before.id_to_piece(i) for i in range(n)]
    assert [i for i in range(n) if after.is_control(i) != before.is_control(i)] == [
        before.piece_to_id(EOS)]
    text = f"a{BOS}b{EOS}c"
    assert before.piece_to_id(BOS) in after.encode(text)  # not named: still matched in text
    assert before.piece_to_id(EOS) not in after.encode(text)
    assert after.decode(after.encode(text)) == text
