"""Passkey retrieval accuracy per context length and depth (prompts: data/passkey.py).

A trial is one prompt with a fresh random key. It counts as retrieved when *every* token of
the answer is the model's top-1 prediction under teacher forcing — the same as greedy decoding
reproducing the key, since each greedy step then sees exactly the teacher-forced prefix. Chance
is about 10^-5 for five digits. `token_accuracy`, the share of answer tokens that are top-1,
shows partial retrieval (chance 1/10 per digit for a model that knows only that a digit comes).

Trials are a pure function of (seed, length, depth, trial), so every layout evaluates the same
prompts; each rank scores its dp rows and sp columns, and a trial's verdict is the sum of its
wrong answer tokens over dp x sp (a key can straddle two sp slices).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch

from ..data import IGNORE_INDEX
from ..data.passkey import Tokenizer, passkey_window, random_key
from ..parallel.grad_sync import all_reduce_
from .tokens import local_piece, token_stats

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def trial_batch(tok: Tokenizer, length: int, depth: float, trials: int, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), (trials, length) each: labels are -100 except on the answer."""
    windows, labels = [], []
    for trial in range(trials):
        rng = np.random.default_rng([seed, length, round(depth * 1e6), trial])
        window, n_answer = passkey_window(tok, length, depth, random_key(rng))
        label = window[1:].clone()  # (L+1,) -> (L,): next token
        label[:-n_answer] = IGNORE_INDEX
        windows.append(window[:-1])
        labels.append(label)
    return torch.stack(windows), torch.stack(labels)  # trials x (L,) -> (trials, L)


@torch.no_grad()
def passkey_accuracy(model: torch.nn.Module, dims, tok: Tokenizer, lengths: Sequence[int],
                     depths: Sequence[float], trials: int, micro_batch: int, seed: int = 0,
                     seq_len: int | None = None, autocast=contextlib.nullcontext,
                     log: Callable[[str], None] = lambda _: None) -> list[dict]:
    """[{"length", "depth", "accuracy", "token_accuracy", "trials"}] for every (length, depth).

    Collective: every rank of the job calls it with the same arguments. `micro_batch` rows per
    forward per dp rank; `seq_len` the length a ring layout was built for (tokens.local_piece).
    Raises ValueError for a length too short for the prompt.
    """
    device = next(iter(model.parameters())).device
    rows = []
    for length in lengths:
        for depth in depths:
            ids, labels = trial_batch(tok, length, depth, trials, seed)
            ids, positions, labels, row_index = local_piece(dims, ids, labels, seq_len=seq_len)
            wrong = torch.zeros(trials, dtype=torch.float64, device=device)  # per trial
            tokens = torch.zeros(2, dtype=torch.float64, device=device)  # (answer tokens, hits)
            for start in range(0, len(ids), micro_batch):
                part = slice(start, start + micro_batch)
                lab = labels[part].to(device)
                _, correct = token_stats(model, ids[part].to(device), positions[part].to(device),
                                         lab, None, autocast)
                answer = lab != IGNORE_INDEX
                misses = (answer & ~correct).sum(dim=1).double()  # (mb,)
                index = row_index[part].to(device)
                real = index >= 0  # padding rows (dp) count nowhere
                wrong.index_add_(0, index[real], misses[real])
                tokens += torch.stack([answer[real].sum(), (answer & correct)[real].sum()])
            all_reduce_(wrong, dims.group("dp_sp"))
            all_reduce_(tokens, dims.group("dp_sp"))
            accuracy = float((wrong == 0).double().mean())
            token_accuracy = float(tokens[1] / tokens[0])
            rows.append({"length": int(length), "depth": float(depth), "accuracy": accuracy,
                         "token_accuracy": token_accuracy, "trials": int(trials)})
            log(f"eval: passkey length {length} depth {depth:g}: {accuracy:.0%} of {trials} "
                f"(key tokens top-1: {token_accuracy:.0%})")
    return rows
