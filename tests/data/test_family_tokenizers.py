"""Qwen3 and Gemma 3 tokenizer files as tokenizers (issue 21).

Each family's files are built locally with the released structure (support/tokenizers.py:
`make_qwen3_tokenizer`, `make_gemma3_tokenizer`), and transformers' AutoTokenizer of the same
folder is the oracle: it encodes text as the model was trained. Checked: our ids equal its ids,
text round-trips, BOS/EOS are the family's (Gemma 3: <bos> 2 before every document, <eos> 1;
Qwen3: no BOS, EOS the config's eos_token), the packed stream leads and ends documents that way,
and special-token strings inside text are text (issue 19). Variants: Qwen3 base and post-trained
configs (eos_token <|endoftext|> / <|im_end|>), and a Gemma 3 folder whose only config is
special_tokens_map.json (tokens as {"content": ...} dicts, BOS from the post-processor).
"""
import json
import unicodedata

import pytest

from support.data import build, files_cfg
from support.tokenizers import (
    SAMPLE,
    copy_tree,
    make_gemma3_tokenizer,
    make_qwen3_tokenizer,
    stdlib_texts,
)
from ulysses_train.config.errors import ConfigError
from ulysses_train.data.cache import load_split, read_complete
from ulysses_train.data.tokenizer import open_tokenizer

# bos / eos: the tokens the family's released configs name (None: it has no BOS);
# nfc: its tokenizer.json normalizes text to NFC (Qwen's does), so decoding gives NFC text.
FAMILIES = {
    "qwen3-base": {"bos": None, "eos": "<|endoftext|>", "nfc": True},
    "qwen3": {"bos": None, "eos": "<|im_end|>", "nfc": True},
    "gemma3": {"bos": "<bos>", "eos": "<eos>", "nfc": False},
    "gemma3-special-tokens-map": {"bos": "<bos>", "eos": "<eos>", "nfc": False},
}
PLAIN = [SAMPLE, "", "x", " leading space", "  two  spaces\n\n\n\t tab   \n",
         "caf\u00e9 or cafe\u0301, \u4e16\u754c, emoji \U0001F600, \u00fcn\u00efc\u00f6d\u00e9",
         stdlib_texts(1, skip=200)[0][:3000]]
SPECIAL = ["<bos>def f(x):\n    return x<eos>",
           "Page text: <|endoftext|> then <|im_start|>user\nhi<|im_end|>\n",
           "<start_of_turn>model\n<end_of_turn> and <image_soft_token> <pad><unk>",
           "<think>plan</think> <tool_call>{}</tool_call>"]
TEXTS = PLAIN + SPECIAL


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Family name -> its tokenizer folder, each built once."""
    root = tmp_path_factory.mktemp("families")
    qwen, gemma = root / "qwen3-base", root / "gemma3"
    make_qwen3_tokenizer(qwen, base=True)
    make_gemma3_tokenizer(gemma)
    chat = copy_tree(qwen, root / "qwen3")  # the post-trained Qwen3's config: EOS <|im_end|>
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config.update(eos_token="<|im_end|>", model_max_length=131072)
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    only_map = copy_tree(gemma, root / "gemma3-special-tokens-map")
    (only_map / "tokenizer_config.json").unlink()
    return {"qwen3-base": qwen, "qwen3": chat, "gemma3": gemma,
            "gemma3-special-tokens-map": only_map}


@pytest.fixture(params=list(FAMILIES))
def family(request, folders):
    """(family name, its folder)."""
    return request.param, folders[request.param]


def _oracle(folder, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


def _special_ids(tok) -> set[int]:
    """Ids of the tokenizer.json's added tokens marked special."""
    return {i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special}


def test_ids_equal_transformers_and_text_round_trips(family):
    name, folder = family
    tok = open_tokenizer(str(folder / "tokenizer.json"))
    # split_special_tokens: transformers' switch for "special-token strings are text".
    theirs = _oracle(folder, split_special_tokens=True)
    specials = _special_ids(tok)
    for text, ids in zip(TEXTS, tok.encode_batch(TEXTS)):
        assert ids == theirs.encode(text, add_special_tokens=False), text
        back = unicodedata.normalize("NFC", text) if FAMILIES[name]["nfc"] else text
        assert theirs.decode(ids) == back
        assert not specials & set(ids), text  # no control id from text, issue 19
    library = tok.tok.__class__.from_file(str(folder / "tokenizer.json"))  # its default: matched
    assert specials & set(library.encode("".join(SPECIAL), add_special_tokens=False).ids)
    if name.startswith("gemma3"):  # rarer characters go through the byte fallback pieces
        ids = tok.encode_batch(["\u4e16\u754c \U0001F600"])[0]
        assert any(tok.id_to_token(i).startswith("<0x") for i in ids)


def test_bos_and_eos_are_the_familys(family):
    name, folder = family
    tok = open_tokenizer(str(folder / "tokenizer.json"))
    bos, eos = FAMILIES[name]["bos"], FAMILIES[name]["eos"]
    assert tok.bos_id == (None if bos is None else tok.token_to_id(bos))
    assert tok.eos_id == tok.token_to_id(eos) and tok.add_bos == (bos is not None)
    if name.startswith("gemma3"):
        assert (tok.bos_id, tok.eos_id) == (2, 1)  # Gemma's fixed ids: <pad> 0, <eos> 1, <bos> 2
    theirs = _oracle(folder)  # as released: transformers adds what the family adds
    assert (theirs.bos_token_id, theirs.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert tok.vocab_size == len(theirs)
    for text, ids in zip(PLAIN, tok.encode_batch(PLAIN)):
        assert theirs.encode(text) == ([tok.bos_id] if tok.add_bos else []) + ids


def test_packed_documents_begin_and_end_as_the_family_does(tmp_path, family):
    """Our pipeline on a few documents: each is [BOS] + text + EOS exactly as transformers
    encodes it plus EOS, and the stream's only special ids are the packer's."""
    name, folder = family
    texts = [PLAIN[0], SPECIAL[0], SPECIAL[1], PLAIN[5]]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    source = build(files_cfg(tmp_path, paths, tokenizer_path=str(folder), val_fraction=0.0))
    tok = open_tokenizer(str(folder / "tokenizer.json"))
    assert (source.bos_id, source.eos_id) == (tok.bos_id if tok.add_bos else None, tok.eos_id)

    tokens, offsets = load_split(source.cache_path, read_complete(source.cache_path), "train")
    docs = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    theirs = _oracle(folder, split_special_tokens=True)
    assert sorted(docs) == sorted(theirs.encode(t) + [tok.eos_id] for t in texts)
    lead = [tok.bos_id] if FAMILIES[name]["bos"] else []  # Gemma: <bos> first; Qwen3: none
    specials = _special_ids(tok)
    assert [i for i in tokens.tolist() if i in specials] == (lead + [tok.eos_id]) * len(texts)

    out = tmp_path / "run" / "tokenizer"  # the run's copy loads with the same ids and tokens
    assert source.save_tokenizer(str(out))
    copied = _oracle(out, split_special_tokens=True)
    assert (copied.bos_token_id, copied.eos_token_id) == (theirs.bos_token_id, tok.eos_id)
    assert sorted(copied.encode(t) + [tok.eos_id] for t in texts) == sorted(docs)


def test_a_gemma3_model_needs_no_row_for_the_image_token(tmp_path, folders):
    """Gemma 3 1B: 262144 embedding rows, a tokenizer of 262145 ids whose last, the special
    <image_soft_token>, text never gives (as here: 600 rows, 601 ids). Such a model trains;
    one without a row for an id text gives is refused."""
    from support.data import small_stdlib

    folder = folders["gemma3"]
    tok = open_tokenizer(str(folder / "tokenizer.json"))
    image = tok.token_to_id("<image_soft_token>")
    assert image == tok.vocab_size - 1
    cfg = small_stdlib(tmp_path / "cache", tokenizer_path=str(folder), max_docs=8, seq_len=32)
    source = build(cfg, vocab=image)
    assert max(int(source.streams["train"].tokens.max()), int(source.streams["val"].tokens.max())
               ) < image
    with pytest.raises(ConfigError) as info:
        build(cfg, vocab=image - 1)
    assert info.value.key == "data.tokenizer_path"
    assert f"has {tok.vocab_size} ids (text and BOS/EOS give ids up to {image - 1}) but " \
           f"model.vocab_size is {image - 1}" in info.value.message
