"""<run_dir>/tokenizer/: the files the run used, loadable by transformers' AutoTokenizer with the
same ids as ours (transformers is the oracle here, never imported by the package)."""
import json
import os

import pytest

from support.tokenizers import SAMPLE, make_hf_tokenizer, stdlib_texts
from ulysses_train.data.tokenizer import open_tokenizer
from ulysses_train.data.tokenizer_files import save_run_tokenizer

TEXTS = [SAMPLE, "x", " two  spaces\n\n", "<s>literal</s> <unk>",
         *(t[:4000] for t in stdlib_texts(3, skip=300))]


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece"])
def test_autotokenizer_loads_the_run_tokenizer_with_our_ids(tmp_path, kind, hf_tokenizer,
                                                           spm_tokenizer):
    from transformers import AutoTokenizer

    tok = open_tokenizer(str(hf_tokenizer if kind == "tokenizer.json" else spm_tokenizer))
    out = tmp_path / "run" / "tokenizer"
    out.parent.mkdir()
    assert save_run_tokenizer(tok, str(out))
    expected = {"tokenizer.json": ["tokenizer.json", "tokenizer_config.json"],
                "sentencepiece": ["tokenizer.model", "tokenizer_config.json"]}[kind]
    assert sorted(os.listdir(out)) == expected
    assert sorted(os.listdir(out.parent)) == ["tokenizer"]  # no temporary left behind
    # split_special_tokens: special-token strings in text are text, as we encode documents.
    theirs = AutoTokenizer.from_pretrained(str(out), split_special_tokens=True)
    for text, ours in zip(TEXTS, tok.encode_batch(TEXTS)):
        assert theirs.encode(text, add_special_tokens=False) == ours
        # With special tokens transformers adds what our packer writes before a document.
        assert theirs.encode(text) == ([tok.bos_id] if tok.add_bos else []) + ours
    assert (theirs.eos_token_id, theirs.bos_token_id) == (tok.eos_id, tok.bos_id)


def test_saving_again_keeps_the_folder_and_another_tokenizer_replaces_it(tmp_path, hf_tokenizer,
                                                                         spm_tokenizer):
    out = tmp_path / "tokenizer"
    assert save_run_tokenizer(open_tokenizer(str(spm_tokenizer)), str(out))
    written = (out / "tokenizer_config.json").stat().st_mtime_ns
    assert not save_run_tokenizer(open_tokenizer(str(spm_tokenizer)), str(out))  # a resume
    assert (out / "tokenizer_config.json").stat().st_mtime_ns == written
    assert save_run_tokenizer(open_tokenizer(str(hf_tokenizer)), str(out))  # a new run, same dir
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["tokenizer"]
    assert json.loads((out / "tokenizer_config.json").read_text()) == json.loads(
        (hf_tokenizer.parent / "tokenizer_config.json").read_text())  # its own config, as is


def test_a_tokenizer_json_without_config_gets_one_naming_bos_and_eos(tmp_path):
    folder = tmp_path / "bare"
    make_hf_tokenizer(folder, texts=stdlib_texts(5), config={})
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    tok = open_tokenizer(str(folder / "tokenizer.json"))
    save_run_tokenizer(tok, str(tmp_path / "tokenizer"))
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == (
        "<|begin_of_text|>", "<|end_of_text|>", True)
