"""Training our own sentencepiece tokenizer on the corpus (what `data.tokenizer_path=""` does).

The trained model is BPE with byte fallback (no text is unrepresentable: unseen characters
become byte pieces) and identity normalization without dummy prefix or whitespace collapsing,
so `decode(encode(text)) == text` for code and prose alike. Training sentences are chunks of
whole lines, newlines included, so pieces such as "):\n" and runs of indentation can be learned.
Ids: 0 = <unk>, 1 = </s> (EOS, appended after every document), no BOS or padding pieces.
`sentencepiece` is imported inside the functions: `import ulysses_train.data` stays light.
"""
from __future__ import annotations

import io
import os
import re
from typing import Callable, Iterable, Iterator

from ..config.errors import ConfigError

# Everything here is part of the cache key: change a setting and caches rebuild.
TRAINER_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
    split_digits=True, character_coverage=0.9999, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
    max_sentence_length=1 << 16, train_extremely_large_corpus=False,
)
CHUNK_CHARS = 4000  # training sentence size: several lines, well under max_sentence_length

_TOO_HIGH = re.compile(r"Vocabulary size too high.*?<= *(\d+)", re.S)
_TOO_LOW = re.compile(r"smaller than required_chars\. *(\d+) vs (\d+)", re.S)


def line_chunks(texts: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut documents into training sentences of whole lines, at most `chunk_chars` long.

    A single longer line is cut hard; nothing is dropped, and no chunk spans two documents.
    """
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            while len(line) > chunk_chars:  # pathological lines (minified data, long literals)
                if chunk:
                    yield chunk
                    chunk = ""
                yield line[:chunk_chars]
                line = line[chunk_chars:]
            if chunk and len(chunk) + len(line) > chunk_chars:
                yield chunk
                chunk = ""
            chunk += line
        if chunk:
            yield chunk


def train_tokenizer(texts: list[str], vocab_size: int, out_path: str,
                    log: Callable[[str], None] = print) -> int:
    """Train a model on `texts` with as many pieces as they support, up to `vocab_size`.

    Sentencepiece refuses a vocab larger than the corpus allows and says the largest it would
    accept; we retry once with that. Returns the number of pieces of the written model.
    """
    import sentencepiece as spm

    spm.set_min_log_level(2)  # its INFO lines would drown our log
    size = vocab_size
    for _attempt in range(3):
        buffer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=line_chunks(texts), model_writer=buffer, vocab_size=size,
                num_threads=max(1, os.cpu_count() or 1), **TRAINER_SETTINGS)
        except RuntimeError as e:
            too_high, too_low = _TOO_HIGH.search(str(e)), _TOO_LOW.search(str(e))
            if too_high and int(too_high.group(1)) < size:
                log(f"data: the corpus supports at most {too_high.group(1)} tokenizer pieces "
                    f"(model.vocab_size allows {vocab_size}); using {too_high.group(1)}")
                size = int(too_high.group(1))
                continue
            if too_low:
                raise ConfigError("model.vocab_size", f"{vocab_size} is too small for a "
                                  f"byte-fallback tokenizer of this corpus (needs at least "
                                  f"{too_low.group(2)}); raise it or set data.tokenizer_path"
                                  ) from None
            raise
        with open(out_path, "wb") as f:
            f.write(buffer.getvalue())
        return size
    raise RuntimeError(f"sentencepiece kept refusing vocab sizes down to {size}")
