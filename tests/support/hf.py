"""Real-format Hugging Face model directories for tests, built locally (no network).

`save_llama` writes a tiny random `LlamaForCausalLM` with transformers' own `save_pretrained`
(GQA, a vocabulary that is not a multiple of 128, bf16 on disk like published checkpoints,
optionally sharded with an index). `model_config` reads it back into our ModelConfig by hand —
a stand-in for the config side of `model.init_from` (hf/config.py, another part of issue 11),
so these tests exercise only the weights.
"""
from __future__ import annotations

import json
import os

import torch

from ulysses_train.config.schema import ModelConfig

# d_model 48 / 4 heads = head_dim 12, 2 kv heads (GQA); ffn 90 and kv rows 24 split unevenly
# over some FSDP2 meshes; vocab 300 -> padded 384.
TINY = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=90,
            num_hidden_layers=2, vocab_size=300, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=256, hidden_act="silu")


def save_llama(path: str, tie: bool, max_shard_size: str | None = None, seed: int = 0,
               dtype=torch.bfloat16, **overrides) -> str:
    """A tiny random Llama saved by transformers into `path`; returns `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default 0.02 so every weight visibly matters
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def model_config(path: str) -> ModelConfig:
    """Our ModelConfig for the HF dir `path` (architecture keys only)."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(name="hf", n_layers=c["num_hidden_layers"], d_model=c["hidden_size"],
                       n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"],
                       ffn_hidden=c["intermediate_size"], vocab_size=c["vocab_size"],
                       rope_theta=float(theta), tie_embeddings=bool(c["tie_word_embeddings"]),
                       norm_eps=c["rms_norm_eps"])


def hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits (B, S, V) of the model in `path` for token ids (B, S)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


class TransformersWarnings:
    """Every warning transformers gives inside the `with` block: Python `warnings` and records
    of its `transformers` logger (which does not propagate, so pytest's caplog misses it).
    `warning_once`'s cache is cleared on entry, so a message an earlier test triggered is
    seen again. `.messages`: the texts, in order."""

    def __enter__(self):
        import logging
        import warnings

        self.messages: list[str] = []
        logging.Logger.warning_once.cache_clear()  # transformers' lru_cache'd warning_once
        collector = self

        class Collect(logging.Handler):
            def emit(self, record):
                if record.levelno >= logging.WARNING:
                    collector.messages.append(record.getMessage())

        self._handler, self._logger = Collect(), logging.getLogger("transformers")
        self._logger.addHandler(self._handler)
        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        self._logger.removeHandler(self._handler)
        self.messages += [str(w.message) for w in self._caught]
        return False
