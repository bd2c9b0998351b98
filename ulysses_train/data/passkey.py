"""The passkey retrieval task: prompts (for evaluation) and `data=passkey` training rows.

The task (Mohtashami & Jaggi 2023, "Landmark Attention", app. — the prompt reused by LongLoRA,
YaRN and most context-extension papers): a random 5-digit key is hidden at a relative depth in
repeated filler text, and the prompt ends with the question, whose answer is the key:

    <INTRO> <filler ...> <KEY_LINE with the key> <filler ...> <QUESTION> <key>

A prompt of length L is a window of L + 1 token ids (`passkey_window`): the model reads the
first L, and the key's tokens are the labels of the last ones. The filler is cut to make the
window exactly L + 1 tokens, and `depth` in [0, 1] places the key line after that share of it.

Tokens: any tokenizer with `encode(text) -> list[int]` (the run's sentencepiece or HF
tokenizer, for a real model), or `WordTokenizer`, a fixed vocabulary of the prompt's own words,
digits and punctuation — what `data=passkey` trains on: one id per word, and digit ids only in
the key (the templates hold no digit).

What `data=passkey` trains on (`PasskeyTokens`): the same prompts, one per row, but only the
key's *repeats* are labels — the answer after the question and the key's second mention in the
key line (`{key} is the pass key`); every other label is the ignore index. The first mention is
random (nothing to learn) and the filler is repeated text: as labels, the filler is learnt at
once and then its many tokens swamp the five answer tokens' gradient (measured: plain language-
model training stayed at 0 % passkey accuracy). The short-range second mention is a copy the
model learns first and that speeds up learning the long-range one (measured:
docs/evaluation.md).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Protocol, Sequence

import numpy as np
import torch

from .batch import IGNORE_INDEX, Batch, batch_from_windows
from .packing import SPLIT_CODES, as_seed

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize them. I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
_STREAM_TAG = 0x9A55  # keeps these seeds apart from other users of (seed, split, g)
_WORD = re.compile(r"\d|[A-Za-z]+|\n|[^\sA-Za-z\d]")  # one digit, a word, a newline, a sign


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class WordTokenizer:
    """Ids of the prompt's words: 0 = EOS (unused), then every word, sign and digit of the
    templates in first-seen order. Spaces are implied between words (not tokens). Fixed by the
    templates alone, so every run and every eval agree on it."""

    def __init__(self):
        words = _WORD.findall(INTRO + FILLER + KEY_LINE.format(key="") + QUESTION + " 0123456789")
        self.vocab = ["<eos>"] + list(dict.fromkeys(words))
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.eos_id = 0
        self.first_digit = self.ids["0"]  # "0".."9" are the last ten ids, in order

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; KeyError for a word outside the vocabulary."""
        return [self.ids[w] for w in _WORD.findall(text)]


def random_key(rng: np.random.Generator) -> str:
    """A uniform 5-digit key, 10000..99999."""
    return str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS)))


def passkey_window(tok: Tokenizer, length: int, depth: float, key: str
                   ) -> tuple[torch.Tensor, int]:
    """(window of length + 1 int64 token ids, number of answer tokens at its end).

    The filler (FILLER repeated, as ids) is cut to fill the window exactly and split at
    round(depth * its length). Raises ValueError when `length` leaves no room for the filler.
    """
    bos = getattr(tok, "bos_id", None)  # a model trained on BOS-led documents sees one here too
    intro = ([] if bos is None else [bos]) + tok.encode(INTRO)
    question = tok.encode(QUESTION)
    key_line, answer = tok.encode(KEY_LINE.format(key=key)), tok.encode(" " + key)
    n_filler = length + 1 - (len(intro) + len(key_line) + len(question) + len(answer))
    if n_filler < 0:
        raise ValueError(f"a passkey prompt needs at least {length + 1 - n_filler - 1} tokens "
                         f"with this tokenizer, got length {length}")
    unit = tok.encode(FILLER)
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    cut = round(depth * n_filler)
    ids = intro + filler[:cut] + key_line + filler[cut:] + question + answer
    return torch.tensor(ids, dtype=torch.int64), len(answer)


def min_length(tok: Tokenizer) -> int:
    """The shortest prompt length (model inputs) `tok` allows: the prompt without filler."""
    key = "1" * KEY_DIGITS
    bos = int(getattr(tok, "bos_id", None) is not None)
    return bos + sum(len(tok.encode(t)) for t in (INTRO, KEY_LINE.format(key=key), QUESTION,
                                                   " " + key)) - 1


def repeat_labels(window: torch.Tensor, tok: WordTokenizer) -> torch.Tensor:
    """(S,) labels of a WordTokenizer window (S+1,): the next token where it is a key digit
    after the key's first mention (the second mention and the answer), else IGNORE_INDEX.
    Exact because the templates hold no digit, so digit ids occur only in the key."""
    target = window[1:]  # (S+1,) -> (S,): next token
    digit = (target >= tok.first_digit) & (target < tok.first_digit + 10)
    repeat = digit & (digit.cumsum(0) > KEY_DIGITS)  # the first KEY_DIGITS digits: 1st mention
    return torch.where(repeat, target, IGNORE_INDEX)


class PasskeyTokens:
    """`data=passkey`: row g of a split is one passkey prompt of `seq_len` inputs, with a random
    key and a uniform random depth drawn from (seed, split, g) alone. Labels: the key's repeats
    only (`repeat_labels`; the module docstring says why)."""

    def __init__(self, seq_len: int, *, seed: int, split: str):
        self.tok = WordTokenizer()
        self.seq_len = seq_len
        self.seed = as_seed(seed)
        self.split = split
        passkey_window(self.tok, seq_len, 0.0, "1" * KEY_DIGITS)  # raises if too short

    def row(self, g: int) -> torch.Tensor:
        """Global sample g: a window of seq_len + 1 ids."""
        rng = np.random.default_rng([self.seed, SPLIT_CODES.get(self.split, 2), g, _STREAM_TAG])
        key = random_key(rng)
        return passkey_window(self.tok, self.seq_len, float(rng.random()), key)[0]

    def batch(self, sample_indices: Sequence[int]) -> Batch:
        windows = torch.stack([self.row(g) for g in sample_indices]) if sample_indices else \
            torch.empty(0, self.seq_len + 1, dtype=torch.int64)  # N x (S+1,) -> (N, S+1)
        batch = batch_from_windows(windows, torch.zeros(len(windows), self.seq_len))
        labels = torch.stack([repeat_labels(w, self.tok) for w in windows]) if len(windows) \
            else batch.labels  # N x (S,) -> (N, S)
        return replace(batch, labels=labels)

    def describe(self) -> str:
        return (f"passkey: one prompt per row (5-digit key at a random depth; labels: the key's "
                f"repeats), {len(self.tok)} word ids")
