"""Real-format tokenizer fixtures, built locally from the stdlib corpus (no network).

- `make_hf_tokenizer`: a byte-level BPE `tokenizer.json` trained with `tokenizers`, built like
  Llama 3's (its split regex, then byte-level without a prefix space; a post-processor that puts
  <|begin_of_text|> first), with a `tokenizer_config.json` naming BOS/EOS as Meta's does.
- `make_spm_tokenizer`: our own sentencepiece model (the trainer the project uses), written
  where asked.
- `make_spm_with_user_symbols`: a sentencepiece model whose BOS/EOS are Llama-3-style
  user-defined symbols (which sentencepiece matches inside text), named by a
  tokenizer_config.json.
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

from ulysses_train.data.corpus import stdlib_files
from ulysses_train.data.tokenizer_train import train_tokenizer

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama 3's pre-tokenizer split pattern (its tokenizer.json, "pre_tokenizer" Split).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SAMPLE = ("def f(x):\n    return x ** 2  # squares\n\n\tTabs, ünïcödé, 世界, "
          "emoji \U0001F600 and   spaces   <|end_of_text|> inside.\n")


def stdlib_texts(n: int = 40, skip: int = 0) -> list[str]:
    """The text of `n` stdlib files (after `skip`), in the corpus' order."""
    root = sysconfig.get_paths()["stdlib"]
    return [Path(root, rel).read_text(encoding="utf-8", errors="replace")
            for rel in stdlib_files(root)[skip:skip + n]]


def make_hf_tokenizer(folder, vocab_size: int = 600, texts=None, config: dict | None = None
                      ) -> Path:
    """Train a Llama-3-like byte-level BPE on stdlib text into `folder`; return tokenizer.json's
    path. `config`: the tokenizer_config.json to write (default: names BOS and EOS; None values
    in it drop that key; {} writes none)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts if texts is not None else stdlib_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(folder / "tokenizer.json"))
    defaults = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}
    if config != {}:
        merged = {k: v for k, v in {**defaults, **(config or {})}.items() if v is not None}
        (folder / "tokenizer_config.json").write_text(json.dumps(merged))
    return folder / "tokenizer.json"


def make_spm_tokenizer(folder, vocab_size: int = 600) -> Path:
    """Our sentencepiece model (BPE, byte fallback, EOS id 1, no BOS), trained on stdlib text."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.model"
    train_tokenizer(stdlib_texts(20), vocab_size, str(path), log=lambda _: None)
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    """A copy of folder `src` (its files) at `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def make_spm_with_user_symbols(folder, vocab_size: int = 600) -> Path:
    """A sentencepiece model (our trainer settings) with BOS and EOS as user-defined symbols,
    ids 2 and 3, and a tokenizer_config.json naming them, with add_bos_token."""
    import io

    import sentencepiece as spm

    from ulysses_train.data.tokenizer_train import TRAINER_SETTINGS, line_chunks

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.set_min_log_level(2)  # as train_tokenizer: its INFO lines would drown the test output
    spm.SentencePieceTrainer.train(
        sentence_iterator=line_chunks(stdlib_texts(20)), model_writer=buffer,
        vocab_size=vocab_size, user_defined_symbols=[BOS, EOS], num_threads=1,
        **TRAINER_SETTINGS)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True}))
    return folder / "tokenizer.model"
