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


# ------------------------------------------------------------------ Qwen3 and Gemma 3 look-alikes
# Built like the released files (Qwen/Qwen3-*, google/gemma-3-*): the same model kind, pipeline,
# special tokens and config keys, with a small vocabulary trained here on stdlib text.

# Qwen2/Qwen3's split pattern: Llama 3's with single digits (\p{N}, not \p{N}{1,3}).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>"]
# Added tokens that are not special in the released files: matched in text like words.
QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
              "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
              "</tool_response>", "<think>", "</think>"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>",
                 "<end_of_turn>", "<start_of_image>", "<end_of_image>"]
GEMMA_IMAGE = "<image_soft_token>"  # an added token after the whole vocabulary (id 262144 there)


def _added_decoder(tok) -> dict:
    """tokenizer_config.json's added_tokens_decoder of a `tokenizers.Tokenizer`."""
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def make_qwen3_tokenizer(folder, vocab_size: int = 600, base: bool = True) -> Path:
    """A Qwen3-like tokenizer.json + tokenizer_config.json in `folder` (Qwen3 ships no
    special_tokens_map.json): NFC, Qwen's split regex, byte-level BPE, a ByteLevel
    post-processor that adds nothing; the specials after the BPE ids, <|endoftext|> first.
    Config as released: bos_token null, eos_token <|endoftext|> (`base`, as Qwen3-*-Base) or
    <|im_end|> (the post-trained Qwen3-*), pad_token <|endoftext|>, add_bos_token false."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN_SPECIAL) - len(QWEN_PLAIN),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(stdlib_texts(), trainer)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": _added_decoder(tok),
        "additional_special_tokens": QWEN_SPECIAL[1:], "bos_token": None,
        "chat_template": "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + "
                         "m['content'] + '<|im_end|>\\n'}}{% endfor %}",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>" if base else "<|im_end|>", "errors": "replace",
        "model_max_length": 32768 if base else 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder / "tokenizer.json"


def _gemma_bpe(vocab_size: int):
    """(vocab, merges) of a sentencepiece-style BPE trained on stdlib text: pieces start with
    "▁" (a space), a small alphabet so rarer characters need the byte fallback."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # words for training
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=80, show_progress=False)
    tok.train_from_iterator(stdlib_texts(), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                            for m in model["merges"]]


def make_gemma3_tokenizer(folder, vocab_size: int = 600) -> Path:
    """A Gemma-3-like tokenizer.json + tokenizer_config.json + special_tokens_map.json in
    `folder`: BPE with byte fallback (<0x00>..<0xFF> pieces) and <unk>, spaces as "▁" (no dummy
    prefix), <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, turn and image markers, a
    TemplateProcessing post-processor that puts <bos> first, and the config's add_bos_token
    true, add_eos_token false; special_tokens_map.json names them as {"content": ...} dicts."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = GEMMA_SPECIAL + [f"<0x{b:02X}>" for b in range(256)]
    trained, merges = _gemma_bpe(vocab_size - len(pieces))
    vocab = {p: i for i, p in enumerate(pieces)}
    for piece in sorted(trained, key=trained.get):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA_SPECIAL])
    tok.add_tokens([AddedToken(GEMMA_IMAGE, special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B:1", special_tokens=[("<bos>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    named = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
             "unk_token": "<unk>", "boi_token": "<start_of_image>",
             "eoi_token": "<end_of_image>", "image_token": GEMMA_IMAGE}
    extra = {k: named[k] for k in ("boi_token", "eoi_token", "image_token")}
    config = {"add_bos_token": True, "add_eos_token": False,
              "added_tokens_decoder": _added_decoder(tok), **named,
              "extra_special_tokens": extra, "clean_up_tokenization_spaces": False,
              "model_max_length": 1000000000000000019884624838656, "padding_side": "left",
              "sp_model_kwargs": None, "spaces_between_special_tokens": False,
              "tokenizer_class": "GemmaTokenizer", "use_default_system_prompt": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    as_dict = {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False} for k, v in named.items()}
    (folder / "special_tokens_map.json").write_text(json.dumps(as_dict, indent=2))
    return folder / "tokenizer.json"
