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


# Sliding-window sources (issue 20 §5): 3 layers, window 8 (shorter than data.seq_len=32).
WINDOW = 8
WINDOWED = {"mistral": dict(sliding_window=WINDOW),
            # layer i slides when i >= max_window_layers: full, sliding, sliding
            "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)}


def save_windowed(path: str, model_type: str, seed: int = 0, layer_types: bool = True,
                  **overrides) -> str:
    """A tiny random fp32 `model_type` (mistral | qwen2) model with the WINDOWED window saved
    by transformers into `path`; `layer_types=False` drops the list transformers 5 writes, as
    in Qwen2 config.json files written before it (transformers then derives it from
    max_window_layers). Returns `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY, "num_hidden_layers": 3,
                                                 **WINDOWED[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # as save_llama: every weight visibly matters
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    if not layer_types:
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        c.pop("layer_types", None)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f)
    return path


# Qwen3 and Gemma 3 sources (issue 21): head_dim 16 != 48 / 4 heads, GQA (2 kv heads), four
# layers mixing sliding (window 8 < data.seq_len 32) and full attention, fp32 on disk.
FAMILY_BASE = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=90, num_hidden_layers=4, vocab_size=300,
                   max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=WINDOW)
FAMILIES = {
    # transformers derives layer_types from max_window_layers: full, sliding, sliding, sliding
    "qwen3": dict(use_sliding_window=True, max_window_layers=1,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # local : global as Gemma 3 mixes them; the global layers with their own base and linear x2,
    # the local ones unscaled with another base; an attention scalar != head_dim
    "gemma3": dict(layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                "sliding_attention"], query_pre_attn_scalar=24,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 1e5},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 1e4}}),
}
# A tiny SigLIP tower for a Gemma3ForConditionalGeneration (2 x 2 patches = mm_tokens_per_image).
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                   num_attention_heads=2, image_size=28, patch_size=14)


def family_config(family: str, vision: bool = False, **overrides):
    """transformers' config of a tiny `family` ("qwen3" | "gemma3") model: FAMILY_BASE +
    FAMILIES[family] + `overrides`; with `vision` (gemma3 only) a Gemma3Config whose
    text_config that is, with the TINY_VISION tower."""
    import transformers

    text = {**FAMILY_BASE, **FAMILIES[family], **overrides}
    if family == "qwen3":
        assert not vision, "only Gemma 3 has a vision tower"
        return transformers.Qwen3Config(**text)
    if not vision:
        return transformers.Gemma3TextConfig(**text)
    return transformers.Gemma3Config(text_config=text, vision_config=TINY_VISION,
                                     mm_tokens_per_image=4)


def randomize_(model: torch.nn.Module, norm_center: float = 1.0) -> None:
    """Weights large enough that every one visibly matters: matrices N(0, 0.2), vectors (norm
    weights, biases) U(norm_center - 0.5, norm_center + 0.5); norm_center 0 for Gemma's
    x_hat * (1 + w) norms, whose zero init would hide the offset."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(norm_center - 0.5,
                                                                norm_center + 0.5)


def save_family(path: str, family: str, seed: int = 0, vision: bool = False,
                **overrides) -> str:
    """A tiny random fp32 model of `family` saved by transformers' save_pretrained into
    `path`; returns `path`. family "qwen3": Qwen3ForCausalLM; "gemma3": Gemma3ForCausalLM
    (model_type gemma3_text), or with `vision` a Gemma3ForConditionalGeneration (model_type
    gemma3: the language model under `language_model.model.*` next to a vision tower).
    Shapes and windows: FAMILY_BASE / FAMILIES; `overrides` go to the (text) config."""
    import transformers

    torch.manual_seed(seed)
    config = family_config(family, vision, **overrides)
    cls = (transformers.Gemma3ForConditionalGeneration if vision
           else transformers.AutoModelForCausalLM.from_config)
    model = cls(config)
    randomize_(model, norm_center=0.0 if family == "gemma3" else 1.0)
    model.save_pretrained(path)
    return path


def auto_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits (B, S, V) of the model dir `path` (any model_type) for token
    ids (B, S); it must load without a warning and with no missing or unexpected keys."""
    from transformers import AutoModelForCausalLM

    with TransformersWarnings() as said:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True, attn_implementation="eager")
    assert not said.messages, said.messages
    assert not any(info.values()), info
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def checkpoint_logits(step: str, ids: torch.Tensor, pos: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Logits (B, S, V) of a plain GPT holding our checkpoint `step`'s model tensors (its
    meta.json model; the real vocabulary only) for token ids (B, S) at positions `pos` (B, S),
    by default 0..S-1."""
    import torch.distributed.checkpoint as dcp

    from ulysses_train.model import GPT

    with open(os.path.join(step, "meta.json")) as f:
        saved = json.load(f)["model"]
    model = GPT(ModelConfig(**saved))
    state = model.state_dict()
    dcp.load({"model": state}, checkpoint_id=step)
    with torch.no_grad():
        pos = torch.arange(ids.shape[1]).expand_as(ids) if pos is None else pos
        return model(ids, pos)[..., :saved["vocab_size"]]


def export_round_trip(run: str, out: str, ids: torch.Tensor, source: str | None = None) -> dict:
    """Export our one-step `run` (fp32) to `out`: transformers' logits of it equal the
    checkpoint's, and `source`'s (a run at lr ~0 from it), within 1e-4. Returns config.json."""
    from ulysses_train.cli.export import main as export_main

    assert export_main([str(run), str(out), "--dtype", "fp32"]) == 0
    theirs = auto_logits(str(out), ids)
    delta = (checkpoint_logits(os.path.join(run, "checkpoints", "step_00000001"), ids)
             - theirs).abs().max()
    print(f"export {run}: max|ours - transformers| = {delta:.2e}")  # pytest -s shows it
    assert delta <= 1e-4
    if source is not None:
        delta = (auto_logits(source, ids) - theirs).abs().max()
        print(f"export {run}: max|source - export| in transformers = {delta:.2e}")
        assert delta <= 1e-4
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


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
