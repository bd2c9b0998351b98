"""The configuration schema: one dataclass per config group, plus validation.

These dataclasses are the whole user-facing schema (docs/architecture.md §2). Hydra composes YAML
files in `configs/` on top of them (registration happens in `train.py`, so importing the package
never imports Hydra); the library only ever sees these plain dataclasses. `validate` checks every
value before any heavy work and reports the first bad one as a `ConfigError` naming its key.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

from .errors import ConfigError, require  # noqa: F401  (ConfigError: re-exported)

# Layout validation lives in config_validate.py (re-exported here: callers import it from config).
from .parallel import (  # noqa: F401
    BACKENDS,
    MAX_TIMEOUT_S,
    VOCAB_MULTIPLE,
    ZERO_STAGES,
    check_tp,
    check_ulysses_heads,
    padded_vocab,
    validate_eval,
    validate_layout,
    validate_parallel,
)
from .parallel import finite as _finite
from .parallel import one_of as _one_of
from .parallel import positive as _positive

MODEL_PRESETS = ("tiny", "llama_125m", "tinyllama_1b", "llama3_8b")
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")
DATA_SOURCES = ("stdlib", "files", "hf", "synthetic", "passkey")
PRECISIONS = ("auto", "fp32", "bf16")
AC_MODES = ("none", "full", "selective")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class ModelConfig:
    name: str = "tiny"
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_hidden: int = 688
    vocab_size: int = 8192  # embedding rows; rounded up to a multiple of 128 by the model
    rope_theta: float = 10000.0
    # Context extension (model/rope.py): none | linear | ntk | yarn | llama3. Each key below is
    # read only by the methods its comment names; defaults: Llama 3.1's, the YaRN paper's betas.
    rope_scaling: str = "none"
    rope_factor: float = 8.0  # target context / rope_original_seq_len (every method)
    rope_original_seq_len: int = 8192  # the pretraining context (yarn, llama3)
    rope_beta_fast: float = 32.0  # yarn: pairs making >= this many turns over the original are kept
    rope_beta_slow: float = 1.0  # yarn: pairs making <= this many turns are interpolated
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths > original / this are interpolated
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original / this are kept
    # yarn's attention scaling of cos/sin (transformers' names): attention_factor wins; else
    # mscale/mscale_all_dim when both are set; null = transformers' default 0.1 ln(factor) + 1.
    rope_attention_factor: Optional[float] = None
    rope_mscale: Optional[float] = None
    rope_mscale_all_dim: Optional[float] = None
    rope_truncate: bool = True  # yarn: floor/ceil the correction range (transformers' truncate)
    tie_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections with a bias (Qwen2); initialised to zero
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # A Hugging Face model dir or one of our run/step dirs: the architecture (model.*) comes
    # from it (hf/config.py), the weights too (init_from.py), and its tokenizer files are
    # data.tokenizer_path's default (data/tokenizer_files.py). "" = train from scratch.
    init_from: str = ""


@dataclass
class ParallelConfig:
    tp: int = 1
    sp: int = 1
    dp: int = -1  # -1: whatever the world size leaves after tp * sp
    # Ring degree inside the sequence-parallel group: sp = ring x Ulysses (sp/ring ranks per
    # all-to-all). 1 = Ulysses only. Changes the layout, not the math (checkpoints reshard).
    ring: int = 1
    zero: int = 0
    backend: str = "auto"
    # Seconds a collective may wait for its peers before it fails: a rank that dies or stalls
    # then ends every rank within this time instead of leaving them hanging. Also bounds the
    # first rendezvous. Long enough for the slowest legitimate wait (a checkpoint written by
    # rank 0 while the others stand at a barrier).
    timeout_s: float = 600.0
    # Hybrid sharding (HSDP): ZeRO shards within groups of this many ranks of the dp x sp group
    # (typically one node's) and replicates across the groups, so parameter all-gathers and
    # gradient reduce-scatters stay inside a group and only one gradient all-reduce per step
    # crosses them. 0 (or -1) = the whole dp x sp group: plain ZeRO, no replication.
    shard_group: int = 0
    # Pick tp/sp/dp/zero and the memory knobs from `python -m ulysses_train.plan`'s best layout
    # for this world size and device memory; parallel.* keys set explicitly are kept (plan/auto.py).
    auto: bool = False


@dataclass
class PlanConfig:
    """`python -m ulysses_train.plan` and `parallel.auto` (validated in plan/config.py)."""

    gpus: int = 0  # GPUs to plan for (0: the world size under parallel.auto)
    gpu_mem_gib: float = 0.0  # memory per GPU (0 under parallel.auto: what the device reports)
    gpus_per_node: int = 8
    intra_node_gbps: float = 7200.0  # Gbit/s per GPU inside a node (NVLink 4: 900 GB/s)
    inter_node_gbps: float = 400.0  # Gbit/s per GPU between nodes (one 400G NIC per GPU)
    tflops: float = 0.0  # sustained TFLOP/s per GPU (0: plan/timing.py DEFAULT_TFLOPS)
    format: str = "table"  # table | json


@dataclass
class DataConfig:
    name: str = "stdlib"
    seq_len: int = 256
    document_mask: bool = False
    paths: List[str] = field(default_factory=list)  # data=files: .txt/.jsonl/.parquet
    text_field: str = "text"  # column holding the text in jsonl/parquet/hf rows
    hf_name: str = ""  # data=hf: a hub dataset name or a local dataset script/dir
    hf_config: str = ""
    hf_split: str = "train"
    max_docs: int = 0  # 0 = every document; caps what is read (useful for streaming sources)
    val_fraction: float = 0.02  # share of documents held out for validation (split by document)
    cache_dir: str = "~/.cache/ulysses_train"
    # A sentencepiece .model, a Hugging Face tokenizer.json, or a directory with one; "" = the
    # tokenizer files of model.init_from, else train a sentencepiece model on the corpus.
    tokenizer_path: str = ""
    tokenizer_sample_bytes: int = 8_000_000


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 8  # sequences per optimizer step, whole job
    micro_batch_size: int = 4  # sequences per dp rank per forward
    seed: int = 0
    precision: str = "auto"
    grad_clip: float = 1.0  # 0 = off
    activation_checkpointing: str = "none"  # none | full | selective (keeps attention outputs)
    activation_offload: bool = False  # checkpointed block inputs in pinned CPU memory
    loss_chunk: int = 4096  # tokens per tile of the output head + loss (0 = whole sequence)
    mlp_chunk: int = 0  # tokens per tile of the MLP (0 = untiled)
    compile: bool = False  # torch.compile each block
    exit_after_steps: int = 0  # 0 = off; else stop (with a checkpoint) after this many steps
    val_every: int = 100  # 0 = off
    val_batches: int = 4
    deterministic: bool = False  # bit-reproducible kernels on GPU too (guards.set_deterministic)
    max_skipped_steps: int = 5  # stop after this many non-finite steps in a row (guards.py)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    schedule: str = "cosine"
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class CheckpointConfig:
    every: int = 100  # 0 = no periodic saves (the last step, exit_after_steps still save)
    keep: int = 3
    resume: str = "auto"  # auto | never | PATH to a step directory
    async_save: bool = False


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "ulysses_train"
    name: str = ""


@dataclass
class LoggingConfig:
    every: int = 10
    progress: bool = True  # tqdm bar on rank 0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class DebugConfig:
    """Fault injection for tests; never set these in a real run."""

    crash_in_save_at_step: int = 0  # hard-exit mid-save (files written, not yet committed)
    # Sleep forever inside the save of this step (after writing `debug_paused` in the run dir),
    # so a test can SIGKILL it there; before "commit" (DCP files written, not yet renamed into
    # place) or before "latest" (committed, `latest` not yet moved).
    pause_in_save_at_step: int = 0
    pause_in_save_before: str = "commit"
    crash_at_step: int = 0  # the last rank os._exit(1)s after this step (torchrun attempt 0 only)
    nan_at_step: int = 0  # make the loss (so every gradient) NaN at this step ...
    nan_steps: int = 1  # ... and the nan_steps - 1 steps after it
    peak_flops: float = 0.0  # peak FLOP/s per device for MFU (0 = metrics.PEAK_FLOPS by name)


@dataclass
class EvalConfig:
    """Long-context evaluation (scripts/eval.py; `every` also in training). README: "Long-context
    evaluation"."""

    checkpoint: str = ""  # scripts/eval.py: a run dir (its latest), a step_N dir or an HF dir
    every: int = 0  # training: loss by position every N steps (0 = off)
    buckets: List[int] = field(default_factory=list)  # position edges; [] = 0, 64, 128, ..., seq_len
    batches: int = 4  # held-out global batches for the loss by position
    passkey_lengths: List[int] = field(default_factory=list)  # [] = seq_len/4, seq_len/2, seq_len
    passkey_depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 10  # prompts per (length, depth); 0 = no passkey


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


def validate_model(m: ModelConfig) -> None:
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size"):
        _positive(getattr(m, key), f"model.{key}")
    require(m.d_model % m.n_heads == 0, "model.d_model",
            f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
    require((m.d_model // m.n_heads) % 2 == 0, "model.d_model",
            f"head dim {m.d_model // m.n_heads} must be even for rotary embeddings")
    require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
            f"model.n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}")
    _positive(m.rope_theta, "model.rope_theta")
    _positive(m.norm_eps, "model.norm_eps")
    _positive(m.init_std, "model.init_std")
    validate_rope(m)


def validate_rope(m: ModelConfig) -> None:
    """Every scaling key is checked whatever the method: a bad value fails now, not in the run
    that first switches to the method reading it.
    """
    require(m.rope_scaling != "dynamic", "model.rope_scaling", "dynamic NTK scaling is "
            "inference-only (its frequencies change with each input's length, so no one table "
            "can be trained); use yarn, llama3, linear or ntk")
    _one_of(m.rope_scaling, ROPE_SCALINGS, "model.rope_scaling")
    require(m.rope_scaling != "ntk" or m.d_model // m.n_heads > 2, "model.rope_scaling",
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
    require(d.name != "files" or len(d.paths) > 0, "data.paths",
            "data=files needs at least one path, e.g. data.paths=[corpus.jsonl]")
    if d.name == "files":  # missing files, directories, unknown types: now, not after torch
        from ..data.paths import resolve_paths

        resolve_paths(list(d.paths))
    require(d.name != "hf" or bool(d.hf_name), "data.hf_name",
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


def validate(cfg: Config, world_size: int = 1, run_dir: str | None = None) -> None:
    """Check every key; raise `ConfigError` naming the first bad one. Needs no process group.
    A run in `run_dir` that will resume does not read model.init_from: its source may be gone."""
    validate_model(cfg.model)
    validate_parallel(cfg.parallel, world_size)
    validate_data(cfg.data)
    validate_train(cfg.train, validate_layout(cfg, world_size))
    validate_optim(cfg.optim)
    if cfg.model.init_from:  # files and headers only: fails before any heavy work
        from ..checkpoint.store import resume_source
        from ..hf.init_from import check_initial_weights

        if not (run_dir and resume_source(run_dir, cfg.checkpoint.resume)):
            check_initial_weights(cfg.model.init_from, cfg.model)
    c = cfg.checkpoint
    require(c.every >= 0, "checkpoint.every", f"must be >= 0 (0 = off), got {c.every}")
    _positive(c.keep, "checkpoint.keep")
    require(bool(c.resume), "checkpoint.resume", "must be auto, never or a checkpoint path")
    resume = os.path.expanduser(c.resume)
    require(c.resume in ("auto", "never") or os.path.isdir(resume), "checkpoint.resume",
            f"{c.resume} {'is not a directory' if os.path.exists(resume) else 'does not exist'}"
            "; give auto, never or a checkpoints/step_* directory")
    if c.resume not in ("auto", "never"):  # complete and of this model's shape (meta.json only)
        from ..checkpoint.store import check_resume_path

        check_resume_path(os.path.abspath(os.path.expanduser(c.resume)), cfg.model)
    _positive(cfg.logging.every, "logging.every")
    _one_of(cfg.logging.wandb.mode, WANDB_MODES, "logging.wandb.mode")
    for key in ("crash_in_save_at_step", "pause_in_save_at_step", "crash_at_step", "nan_at_step"):
        require(getattr(cfg.debug, key) >= 0, f"debug.{key}", "must be >= 0 (0 = off)")
    _positive(cfg.debug.nan_steps, "debug.nan_steps")
    _finite(cfg.debug.peak_flops, "debug.peak_flops", 0.0)
    _one_of(cfg.debug.pause_in_save_before, ("commit", "latest"), "debug.pause_in_save_before")
    validate_eval(cfg.eval, cfg.data)
