"""Every rule on config values: pure, collective-free and without I/O.

Each rank checks the same config alone, before any process group exists, and the first bad value
is raised as a `ConfigError` naming its key (`error: <key>: ...`, exit 2 at the entry point).
What needs the file system (data.paths, model.init_from, checkpoint.resume=PATH) is checked by
cli/checks.py; the layout rules (parallel.* against the world size and the model) are
config/parallel.py's.
"""
from __future__ import annotations

import math

from .architecture import head_dim
from .errors import finite as _finite
from .errors import one_of as _one_of
from .errors import positive as _positive
from .errors import require
from .parallel import validate_layout, validate_parallel
from .schema import (
    AC_MODES,
    DATA_SOURCES,
    LAYER_TYPES,
    MLP_ACTIVATIONS,
    PRECISIONS,
    ROPE_SCALINGS,
    SCHEDULES,
    WANDB_MODES,
    Config,
    DataConfig,
    DebugConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from .sources import validate_sources


def validate_model(m: ModelConfig) -> None:
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size"):
        _positive(getattr(m, key), f"model.{key}")
    require(m.head_dim >= 0, "model.head_dim",
            f"must be >= 0 (0 = d_model / n_heads), got {m.head_dim}")
    if m.head_dim:
        require(m.head_dim % 2 == 0, "model.head_dim",
                f"{m.head_dim} must be even for rotary embeddings")
    else:
        require(m.d_model % m.n_heads == 0, "model.d_model",
                f"{m.d_model} is not divisible by model.n_heads={m.n_heads}; set "
                "model.head_dim for heads of another width")
        require((m.d_model // m.n_heads) % 2 == 0, "model.d_model",
                f"head dim {m.d_model // m.n_heads} must be even for rotary embeddings")
    require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
            f"model.n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}")
    _positive(m.rope_theta, "model.rope_theta")
    _positive(m.norm_eps, "model.norm_eps")
    _positive(m.init_std, "model.init_std")
    _one_of(m.mlp_activation, MLP_ACTIVATIONS, "model.mlp_activation")
    _finite(m.norm_weight_offset, "model.norm_weight_offset")
    for key in ("query_pre_attn_scalar", "rope_local_theta"):
        value = getattr(m, key)
        require(math.isfinite(value) and value >= 0, f"model.{key}",
                f"must be a number >= 0 (0 = the default), got {value}")
    validate_rope(m)
    validate_window(m)


def validate_window(m: ModelConfig) -> None:
    """model.sliding_window and model.layer_types (transformers' names and meaning)."""
    require(m.sliding_window >= 0, "model.sliding_window",
            f"must be >= 0 tokens (0 = no window), got {m.sliding_window}")
    types = list(m.layer_types)
    if not types:
        return
    require(len(types) == m.n_layers, "model.layer_types",
            f"has {len(types)} entries for model.n_layers={m.n_layers}: give one per layer "
            "(full_attention | sliding_attention), or [] for every layer alike")
    unknown = sorted({t for t in types if t not in LAYER_TYPES})
    require(not unknown, "model.layer_types",
            f"unknown entries {unknown}: each must be one of {', '.join(LAYER_TYPES)}")
    require(m.sliding_window > 0 or "sliding_attention" not in types, "model.layer_types",
            "has sliding_attention layers but model.sliding_window=0: set the window in tokens "
            "(model.sliding_window=W) or make every layer full_attention")


def validate_rope(m: ModelConfig) -> None:
    """Every scaling key is checked whatever the method: a bad value fails now, not in the run
    that first switches to the method reading it.
    """
    require(m.rope_scaling != "dynamic", "model.rope_scaling", "dynamic NTK scaling is "
            "inference-only (its frequencies change with each input's length, so no one table "
            "can be trained); use yarn, llama3, linear or ntk")
    _one_of(m.rope_scaling, ROPE_SCALINGS, "model.rope_scaling")
    require(m.rope_scaling != "ntk" or head_dim(m) > 2, "model.rope_scaling",
            "ntk needs a head dim > 2 (its base change divides by head_dim - 2)")
    _finite(m.rope_factor, "model.rope_factor")
    require(m.rope_factor >= 1, "model.rope_factor",
            f"must be >= 1 (target context / model.rope_original_seq_len), got {m.rope_factor}")
    _positive(m.rope_original_seq_len, "model.rope_original_seq_len")
    for key in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        _positive(getattr(m, "rope_" + key), f"model.rope_{key}")
    require(m.rope_beta_fast > m.rope_beta_slow, "model.rope_beta_fast",
            f"must be > model.rope_beta_slow={m.rope_beta_slow}, got {m.rope_beta_fast}")
    require(m.rope_high_freq_factor > m.rope_low_freq_factor, "model.rope_high_freq_factor",
            f"must be > model.rope_low_freq_factor={m.rope_low_freq_factor}, "
            f"got {m.rope_high_freq_factor}")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        value = getattr(m, "rope_" + key)
        require(value is None or (math.isfinite(value) and value > 0), f"model.rope_{key}",
                f"must be a positive number or null (transformers' default), got {value}")


def validate_data(d: DataConfig) -> None:
    _one_of(d.name, DATA_SOURCES, "data.name")
    _positive(d.seq_len, "data.seq_len")
    validate_sources(d)  # a mixture replaces the one source data.name/paths/hf_name describe
    require(d.name != "files" or len(d.paths) > 0 or bool(d.sources), "data.paths",
            "data=files needs at least one path, e.g. data.paths=[corpus.jsonl]")
    require(d.name != "hf" or bool(d.hf_name) or bool(d.sources), "data.hf_name",
            "data=hf needs a dataset name, e.g. data.hf_name=wikitext")
    require(d.max_docs >= 0, "data.max_docs", f"must be >= 0 (0 = all), got {d.max_docs}")
    _finite(d.val_fraction, "data.val_fraction", 0.0, 0.5)
    _positive(d.tokenizer_sample_bytes, "data.tokenizer_sample_bytes")
    require(bool(d.cache_dir), "data.cache_dir", "must name a directory")
    require(bool(d.text_field), "data.text_field", "must name the field (column) that holds "
            "the documents' text, e.g. data.text_field=text")


def validate_train(t: TrainConfig, dp: int) -> None:
    for key in ("steps", "global_batch_size", "micro_batch_size", "val_batches"):
        _positive(getattr(t, key), f"train.{key}")
    require(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
            f"{t.global_batch_size} is not divisible by micro_batch_size x dp = "
            f"{t.micro_batch_size} x {dp}")
    _one_of(t.precision, PRECISIONS, "train.precision")
    _finite(t.grad_clip, "train.grad_clip", 0.0)
    _one_of(t.activation_checkpointing, AC_MODES, "train.activation_checkpointing")
    require(not t.activation_offload or t.activation_checkpointing != "none",
            "train.activation_offload", "offload moves the inputs that activation checkpointing "
            "keeps: set train.activation_checkpointing=full or selective too")
    for key in ("loss_chunk", "mlp_chunk"):
        require(getattr(t, key) >= 0, f"train.{key}",
                f"must be >= 0 tokens (0 = no tiling), got {getattr(t, key)}")
    require(t.exit_after_steps >= 0, "train.exit_after_steps", f"must be >= 0, got {t.exit_after_steps}")
    require(t.val_every >= 0, "train.val_every", f"must be >= 0 (0 = off), got {t.val_every}")
    _positive(t.max_skipped_steps, "train.max_skipped_steps")


def validate_optim(o: OptimConfig) -> None:
    _positive(o.lr, "optim.lr")
    _finite(o.min_lr_ratio, "optim.min_lr_ratio", 0.0, 1.0)
    _one_of(o.schedule, SCHEDULES, "optim.schedule")
    require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _finite(o.weight_decay, "optim.weight_decay", 0.0)
    _finite(o.beta1, "optim.beta1", 0.0)
    require(o.beta1 < 1, "optim.beta1", f"must be < 1, got {o.beta1}")
    _finite(o.beta2, "optim.beta2", 0.0)
    require(o.beta2 < 1, "optim.beta2", f"must be < 1, got {o.beta2}")
    _positive(o.eps, "optim.eps")


def validate_checkpoint(c) -> None:
    require(c.every >= 0, "checkpoint.every", f"must be >= 0 (0 = off), got {c.every}")
    _positive(c.keep, "checkpoint.keep")
    require(bool(c.resume), "checkpoint.resume", "must be auto, never or a checkpoint path")


def validate_debug(d: DebugConfig) -> None:
    for key in ("crash_in_save_at_step", "pause_in_save_at_step", "crash_at_step", "nan_at_step"):
        require(getattr(d, key) >= 0, f"debug.{key}", "must be >= 0 (0 = off)")
    _positive(d.nan_steps, "debug.nan_steps")
    _finite(d.peak_flops, "debug.peak_flops", 0.0)
    _one_of(d.pause_in_save_before, ("commit", "latest"), "debug.pause_in_save_before")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check every key's value; raise `ConfigError` naming the first bad one. Pure: no file is
    read and no process group is needed (cli/checks.py adds the file checks)."""
    validate_model(cfg.model)
    validate_parallel(cfg.parallel, world_size)
    validate_data(cfg.data)
    validate_train(cfg.train, validate_layout(cfg, world_size))
    validate_optim(cfg.optim)
    validate_checkpoint(cfg.checkpoint)
    _positive(cfg.logging.every, "logging.every")
    _one_of(cfg.logging.wandb.mode, WANDB_MODES, "logging.wandb.mode")
    validate_debug(cfg.debug)
    validate_eval(cfg.eval, cfg.data)


def validate_eval(e: EvalConfig, d: DataConfig) -> None:
    """The eval.* keys (scripts/eval.py, eval.every); eval.every needs held-out data."""
    require(e.every >= 0, "eval.every", f"must be >= 0 (0 = off), got {e.every}")
    _positive(e.batches, "eval.batches")
    require(e.passkey_trials >= 0, "eval.passkey_trials", f"must be >= 0, got {e.passkey_trials}")
    b = list(e.buckets)
    require(not b or (len(b) >= 2 and b[0] >= 0 and all(x < y for x, y in zip(b, b[1:]))),
            "eval.buckets", f"{b} must be >= 2 increasing position edges from >= 0, e.g. "
            "[0,64,128,256] (or [] for powers of two up to data.seq_len)")
    require(all(n > 0 for n in e.passkey_lengths), "eval.passkey_lengths",
            f"{list(e.passkey_lengths)} must be positive token counts")
    require(len(e.passkey_depths) > 0 and all(0 <= x <= 1 for x in e.passkey_depths),
            "eval.passkey_depths", f"{list(e.passkey_depths)} must be relative depths in [0, 1]")
    require(e.every == 0 or d.val_fraction > 0 or d.name in ("synthetic", "passkey"),
            "eval.every", "needs held-out data: set data.val_fraction > 0 or eval.every=0")
