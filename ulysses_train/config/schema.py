"""The configuration schema: one dataclass per config group and the allowed values of each key.

These dataclasses are the whole user-facing schema (docs/config-reference.md is generated from
them by scripts/gen_config_docs.py). Hydra composes the YAML files in `configs/` on top of them (the
registration is in cli/compose.py, so importing the package never imports Hydra); the library
only ever sees these plain dataclasses. The rules on their values are config/validate.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

MODEL_PRESETS = ("tiny", "llama_125m", "tinyllama_1b", "llama3_8b", "qwen3_4b", "gemma3_4b")
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")
DATA_SOURCES = ("stdlib", "files", "hf", "synthetic", "passkey")
SOURCE_KINDS = ("stdlib", "files", "hf", "megatron", "tokens")  # kinds of one data.sources entry
TOKEN_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64")  # flat token .bin
PRECISIONS = ("auto", "fp32", "bf16")
AC_MODES = ("none", "full", "selective")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("offline", "online", "disabled")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' config.json spelling
MLP_ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU (Llama, Qwen) | GeGLU with tanh GELU (Gemma)


@dataclass
class ModelConfig:
    # the preset (model=...) or, with init_from, the source's name; names the run dir
    name: str = "tiny"
    n_layers: int = 4  # transformer blocks
    d_model: int = 256  # hidden size (the residual stream)
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # key/value heads (GQA: n_heads is a multiple of it)
    # Width of each attention head; 0 = d_model / n_heads. Qwen3 and Gemma 3 set their own
    # (Qwen3-4B: 32 heads of 128 on d_model 2560), so q/k/v/o are (n_heads * head_dim, d_model).
    head_dim: int = 0
    ffn_hidden: int = 688  # the gated MLP's hidden size (SwiGLU / GeGLU)
    vocab_size: int = 8192  # embedding rows; rounded up to a multiple of 128 by the model
    rope_theta: float = 10000.0  # RoPE base
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
    rope_mscale: Optional[float] = None  # yarn: see rope_attention_factor
    rope_mscale_all_dim: Optional[float] = None  # yarn: see rope_attention_factor
    rope_truncate: bool = True  # yarn: floor/ceil the correction range (transformers' truncate)
    tie_embeddings: bool = False  # the output head reads the embedding matrix
    qkv_bias: bool = False  # q/k/v projections with a bias (Qwen2); initialised to zero
    # Model-family options (docs/models.md has which preset and which config.json sets which):
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    # The gated MLP's activation: silu (SwiGLU: Llama, Mistral, Qwen) | gelu_tanh (GeGLU with
    # the tanh approximation of GELU: Gemma)
    mlp_activation: str = "silu"
    # RMSNorm computes x_hat * (norm_weight_offset + w) and initialises w to 1 - offset:
    # 0 = Llama's x_hat * w (w = 1), 1 = Gemma's x_hat * (1 + w) (w = 0). Every norm, QK-norm too.
    norm_weight_offset: float = 0.0
    # Norms after attention and after the MLP too, on each sublayer's output before the
    # residual add ("sandwich" norm: Gemma 2 / 3's post_attention / post_feedforward_layernorm)
    sandwich_norm: bool = False
    scale_embeddings: bool = False  # embeddings x sqrt(d_model), rounded to the compute dtype (Gemma)
    # Attention scale query_pre_attn_scalar^-0.5 (Gemma's name); 0 = head_dim^-0.5 (the default)
    query_pre_attn_scalar: float = 0.0
    # RoPE base of the sliding-window layers, which then rotate without any rope_scaling
    # (Gemma 3: local 10,000 unscaled, global rope_theta 1,000,000 with e.g. linear x8);
    # 0 = every layer uses rope_theta and rope_scaling.
    rope_local_theta: float = 0.0
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # N(0, init_std) init (output projections: / sqrt(2 n_layers))
    # Sliding-window attention (docs/attention.md): query i sees key j when i - W < j <= i
    # (transformers' sliding_window). 0 = no window. With empty layer_types every layer slides
    # (Mistral); otherwise only the `sliding_attention` layers.
    sliding_window: int = 0
    # One entry per layer, full_attention | sliding_attention; [] = every layer the same
    # (full without a window, sliding with one). sliding_attention needs sliding_window > 0.
    layer_types: List[str] = field(default_factory=list)
    # A Hugging Face model dir or one of our run/step dirs: the architecture (model.*) comes
    # from it (hf/config.py), the weights too (hf/init_from.py), and its tokenizer files are
    # data.tokenizer_path's default (data/tokenizer_files.py). "" = train from scratch.
    init_from: str = ""


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree
    sp: int = 1  # sequence-parallel degree (Ulysses x ring)
    dp: int = -1  # -1: whatever the world size leaves after tp * sp
    # Ring degree inside the sequence-parallel group: sp = ring x Ulysses (sp/ring ranks per
    # all-to-all). 1 = Ulysses only. Changes the layout, not the math (checkpoints reshard).
    ring: int = 1
    # Ulysses head groups G: each rank's heads are exchanged and attended in G pipelined groups,
    # the all-to-all of one group overlapping another's attention (parallel/ulysses_pipeline.py);
    # one group's exchange buffers in flight instead of all heads'. 1 = one exchange of all heads.
    ulysses_chunks: int = 1
    zero: int = 0  # 0: replicated (DDP) | 2: gradients + optimizer sharded | 3: parameters too
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
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
    """`python -m ulysses_train.plan` and `parallel.auto` (validated in config/plan.py)."""

    gpus: int = 0  # GPUs to plan for (0: the world size under parallel.auto)
    gpu_mem_gib: float = 0.0  # memory per GPU (0 under parallel.auto: what the device reports)
    gpus_per_node: int = 8  # GPUs sharing the fast links
    intra_node_gbps: float = 7200.0  # Gbit/s per GPU inside a node (NVLink 4: 900 GB/s)
    inter_node_gbps: float = 400.0  # Gbit/s per GPU between nodes (one 400G NIC per GPU)
    tflops: float = 0.0  # sustained TFLOP/s per GPU (0: plan/timing.py DEFAULT_TFLOPS)
    format: str = "table"  # table | json


@dataclass
class SourceConfig:
    """One entry of `data.sources` (docs/data.md): where its documents come from, its share of
    the training tokens, and which of its documents are used how often."""

    name: str = ""  # names its metrics (tokens/<name>, val_loss/<name>); "" = <kind><index>
    kind: str = "files"  # stdlib | files | hf | megatron | tokens
    # files: .txt/.jsonl/.parquet; megatron: dataset prefixes (PREFIX.bin + PREFIX.idx);
    # tokens: flat token files (.bin/.npy), or .parquet/.arrow files / saved HF dataset dirs
    # with an ids_field column
    paths: List[str] = field(default_factory=list)
    weight: float = 1.0  # its share of the training tokens (weights are normalised to sum 1)
    text_field: str = "text"  # files/hf: the column holding the text
    ids_field: str = "input_ids"  # tokens: the column holding token ids (parquet/arrow/HF)
    hf_name: str = ""  # hf: a hub dataset name or a local dataset script/dir
    hf_config: str = ""  # hf: the dataset config name
    hf_split: str = "train"  # hf: the split read
    max_docs: int = 0  # 0 = every document; caps what is read
    dtype: str = ""  # tokens .bin: uint8 ... int64 (TOKEN_DTYPES); "" for .npy/parquet
    eos_id: int = -1  # tokens .bin/.npy: the id ending each document (-1 = the tokenizer's EOS)
    min_tokens: int = 0  # keep only documents of at least this many tokens (0 = all)
    max_tokens: int = 0  # keep only documents of at most this many tokens (0 = no limit)
    # Long documents (>= long_tokens tokens) appear length_upsample times in expectation
    # (floor, plus one more with the fractional part's probability, per document): docs/data.md
    length_upsample: float = 1.0
    long_tokens: int = 0  # what length_upsample counts as long (0 = data.seq_len)


@dataclass
class DataConfig:
    name: str = "stdlib"  # the source: stdlib | files | hf | synthetic | passkey (data=...)
    seq_len: int = 256  # tokens per training sequence (any length at any sp)
    document_mask: bool = False  # attend within documents only; positions restart per document
    paths: List[str] = field(default_factory=list)  # data=files: .txt/.jsonl/.parquet
    text_field: str = "text"  # column holding the text in jsonl/parquet/hf rows
    hf_name: str = ""  # data=hf: a hub dataset name or a local dataset script/dir
    hf_config: str = ""  # data=hf: the dataset config name
    hf_split: str = "train"  # data=hf: the split read
    max_docs: int = 0  # 0 = every document; caps what is read (useful for streaming sources)
    val_fraction: float = 0.02  # share of documents held out for validation (split by document)
    # token caches and trained tokenizers (shared between runs)
    cache_dir: str = "~/.cache/ulysses_train"
    # A sentencepiece .model, a Hugging Face tokenizer.json, or a directory with one; "" = the
    # tokenizer files of model.init_from, else train a sentencepiece model on the corpus.
    tokenizer_path: str = ""
    tokenizer_sample_bytes: int = 8_000_000  # bytes of text a new sentencepiece model trains on
    # A weighted mixture (docs/data.md): a non-empty list replaces the one source that
    # name/paths/hf_name describe; the tokenizer, seq_len and val_fraction stay shared.
    sources: List[SourceConfig] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps of the whole run (the LR schedule's length)
    global_batch_size: int = 8  # sequences per optimizer step, whole job
    micro_batch_size: int = 4  # sequences per dp rank per forward
    seed: int = 0  # init and data order
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16
    grad_clip: float = 1.0  # 0 = off
    activation_checkpointing: str = "none"  # none | full | selective (keeps attention outputs)
    activation_offload: bool = False  # checkpointed block inputs in pinned CPU memory
    loss_chunk: int = 4096  # tokens per tile of the output head + loss (0 = whole sequence)
    mlp_chunk: int = 0  # tokens per tile of the MLP (0 = untiled)
    compile: bool = False  # torch.compile each block
    exit_after_steps: int = 0  # 0 = off; else stop (with a checkpoint) after this many steps
    val_every: int = 100  # 0 = off
    val_batches: int = 4  # global batches per validation
    deterministic: bool = False  # bit-reproducible kernels on GPU too (guards.set_deterministic)
    max_skipped_steps: int = 5  # stop after this many non-finite steps in a row (train/guards.py)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | linear | constant, after the warmup
    warmup_steps: int = 20  # linear warmup: lr x (step + 1) / warmup_steps
    weight_decay: float = 0.1  # decoupled, on matrices only (not norms, biases)
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW


@dataclass
class CheckpointConfig:
    every: int = 100  # 0 = no periodic saves (the last step, exit_after_steps still save)
    keep: int = 3  # complete checkpoints kept (older ones of this run removed)
    resume: str = "auto"  # auto | never | PATH to a step directory
    async_save: bool = False  # save in the background (DCP async_save)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled (online without a login logs offline)
    project: str = "ulysses_train"  # wandb project
    name: str = ""  # wandb run name ("" = wandb's)


@dataclass
class LoggingConfig:
    every: int = 10  # steps between metrics rows and log lines
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
    pause_in_save_before: str = "commit"  # commit | latest (see pause_in_save_at_step)
    crash_at_step: int = 0  # the last rank os._exit(1)s after this step (torchrun attempt 0 only)
    nan_at_step: int = 0  # make the loss (so every gradient) NaN at this step ...
    nan_steps: int = 1  # ... and the nan_steps - 1 steps after it
    peak_flops: float = 0.0  # peak FLOP/s per device for MFU (0 = metrics.PEAK_FLOPS by name)


@dataclass
class EvalConfig:
    """Long-context evaluation (scripts/eval.py; `every` also in training). docs/evaluation.md."""

    checkpoint: str = ""  # scripts/eval.py: a run dir (its latest), a step_N dir or an HF dir
    every: int = 0  # training: loss by position every N steps (0 = off)
    buckets: List[int] = field(default_factory=list)  # position edges; [] = 0, 64, 128, ..., seq_len
    batches: int = 4  # held-out global batches for the loss by position
    passkey_lengths: List[int] = field(default_factory=list)  # [] = seq_len/4, seq_len/2, seq_len
    # relative depths of the passkey in the prompt
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
