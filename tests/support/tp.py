"""Helpers for tests/parallel/test_tensor.py: inputs, the model build in the trainer's order,
comparisons, an attention recorder and the optimizer variants. Imported by its spawned ranks too."""
from __future__ import annotations

import torch

from support.common import small_config
from ulysses_train.model.attention import sdpa_attention
from ulysses_train.model.gpt import GPT
from ulysses_train.parallel.sharding import apply_sharding
from ulysses_train.parallel.tensor import apply_tensor_parallel
from ulysses_train.train.optim import build_optimizer

SEED, SEQ, BATCH, VOCAB = 7, 32, 2, 256
TOL = dict(rtol=1e-5, atol=1e-6)


def make_inputs(vocab: int = VOCAB):
    """(input_ids, position_ids, labels), (B, S), ids below `vocab`: row 0 keeps only its first
    5 labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    inputs, labels = ids[:, :-1], ids[:, 1:].clone()
    labels[0, 5:] = -100
    labels[1, ::3] = -100
    return inputs, torch.arange(SEQ).expand(BATCH, SEQ), labels


def model_config(**model):
    return small_config(model=model)


def build_gpt(cfg, tp_mesh=None, attention_fn=sdpa_attention, zero3_dims=None) -> GPT:
    """The trainer's order: meta -> TP -> FSDP2 (ZeRO-3 over dp_sp) -> to_empty -> init."""
    with torch.device("meta"):
        model = GPT(cfg.model, attention_fn=attention_fn)
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh)
    if zero3_dims is not None:
        apply_sharding(model, zero3_dims, zero=3)
    model.to_empty(device=torch.device("cpu"))
    model.init_weights(SEED)
    return model


def assert_close_tol(got, expected, what=""):
    torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{what}: {m}")


def local_of(t):
    return t.to_local() if hasattr(t, "to_local") else t


def full_of(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class Recorder:
    """An attention_fn that records what reaches it: (type name, q shape, k shape)."""

    def __init__(self, fn):
        self.fn, self.seen = fn, set()

    def __call__(self, q, k, v, **kw):
        self.seen.add((type(q).__name__, tuple(q.shape), tuple(k.shape)))
        return self.fn(q, k, v, **kw)


def make_optimizer(model, cfg, kind):
    """The trainer's AdamW (fused only on CUDA), or its param groups with foreach/fused forced."""
    opt = build_optimizer(model, cfg.optim)  # groups: matrices (DTensors under TP), norms (plain)
    if kind == "default":
        return opt
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, **{kind: True})


def error_of(call, exc_type) -> str | None:
    try:
        call()
    except exc_type as exc:
        return str(exc)
    return None
