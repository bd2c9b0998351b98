"""THE place where parallelism enters the single-device GPT: `parallelize(cfg, dims)`.

Every way a layout changes the model is applied here, in this order (torchtitan's
`parallelize.py` order; docs/architecture.md, "Where parallelism enters"):
1. the attention function (`build_attention`): the local kernel alone (sp = 1), Ulysses around it
   over the sp group (ring = 1), or the Ulysses x ring layer, which reads the token layout the
   data path shards by (parallel/batching.py); with `parallel.ulysses_chunks` G > 1 the
   Ulysses exchange runs in G pipelined head groups (parallel/ulysses_pipeline.py);
2. construction on the meta device (no memory spent on a throwaway init);
3. tensor parallelism (parallel/tensor.py: a DTensor plan, the vocab-parallel loss as the
   model's `loss_fn`, and the QK-norms' `weight_fn` that sums their gradient over tp), first,
   because its plan names the unwrapped modules;
4. activation checkpointing and compile, per block (names unchanged);
5. FSDP2 (zero 2/3, HSDP), which wraps whatever layout TP left — it gathers the weights in the
   compute dtype; without it (one rank, DDP, tp at zero=0) under bf16, `WeightCasts`: one bf16
   copy of each weight per step instead of autocast's cast at every use;
6. `to_empty` and `init_weights(seed)`: parameters are materialised and initialised by name,
   shard by shard, so every layout starts from the same weights;
7. the gradient reduction (`GradSync`: plain, DDP or FSDP2), which the training step drives
   without knowing which one it has.
Nothing else in the package wraps, shards or rewires the model.
"""
from __future__ import annotations

import torch

from ..config.architecture import layer_windows
from ..config.schema import Config
from ..model import GPT, select_attention
from ..model.precision import WeightCasts, resolve_dtype
from .activations import apply_activation_checkpointing, apply_compile
from .grad_sync import DDP, FSDP, GradSync, Plain, replicate
from .mesh import ParallelDims
from .sharding import apply_sharding
from .tensor import apply_tensor_parallel
from .ulysses import UlyssesAttention
from .ulysses_pipeline import PipelinedUlyssesAttention


def build_attention(cfg: Config, dims: ParallelDims):
    """The model's `attention_fn` for this layout (step 1 of the module docstring). Every one
    takes q/k/v of this rank's tokens and a DocumentMask of the padded global rows."""
    local_attention = select_attention(dims.device, cfg.data.document_mask,
                                       sliding=any(layer_windows(cfg.model)))
    chunks = cfg.parallel.ulysses_chunks
    if dims.sp == 1:
        return local_attention
    if dims.ring == 1:
        if chunks > 1:
            return PipelinedUlyssesAttention(local_attention, dims.group("sp"), chunks)
        return UlyssesAttention(local_attention, dims.group("sp"))
    from .ring import UlyssesRingAttention  # only where a ring is asked for

    return UlyssesRingAttention(dims.group("ulysses"), dims.group("ring"),
                                dims.sequence_layout(cfg.data.seq_len), chunks=chunks)


def build_model(cfg: Config, dims: ParallelDims) -> GPT:
    """Steps 1-6 of the module docstring: the model of this layout, built, sharded and
    initialised (the same weights in every layout). For training use `parallelize`, which adds
    the gradient reduction; evaluation and tests that run no optimizer step use this alone."""
    attention_fn = build_attention(cfg, dims)
    t = cfg.train
    with torch.device("meta"):
        model = GPT(cfg.model, attention_fn=attention_fn, loss_chunk=t.loss_chunk,
                    mlp_chunk=t.mlp_chunk)
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.meshes["tp"])
    apply_activation_checkpointing(model, t.activation_checkpointing, t.activation_offload)
    if t.compile:
        apply_compile(model)
    param_dtype = resolve_dtype(cfg.train.precision, dims.device)
    sharded = apply_sharding(model, dims, cfg.parallel.zero,
                             param_dtype=None if param_dtype == torch.float32 else param_dtype)
    if param_dtype != torch.float32 and not sharded and not t.compile:
        # FSDP2 casts once per gather; elsewhere one cached copy per weight per step replaces
        # autocast's cast at every use (model/precision.py WeightCasts; docs/parallelism.md).
        model.weight_casts = casts = WeightCasts(model, param_dtype)
        if model.output is None:  # the tied head reads the table outside the embedding's call
            model._logits = casts.around(model._logits, model.tok_embeddings)
    model.to_empty(device=dims.device)
    model.init_weights(cfg.train.seed)
    return model


def build_grad_sync(model: GPT, cfg: Config, dims: ParallelDims) -> GradSync:
    """Step 7: FSDP2 when the model is sharded (zero 2/3 over more than one rank); else DDP over
    dp x sp for plain parameters; else (tp > 1: DTensor parameters, which DDP cannot take; or
    one rank) one coalesced all-reduce after backward, a no-op alone."""
    group = dims.group("dp_sp")  # None alone
    if cfg.parallel.zero > 0 and dims.dp_sp > 1:
        sync = FSDP(model, cfg.parallel.zero)
    elif group is not None and dims.tp == 1:
        sync = DDP(replicate(model, group, dims.device))
    else:
        sync = Plain(model, group)
    # the step's bf16 weight copies are stale once the optimizer steps: freed after the backward
    sync.weight_casts = getattr(model, "weight_casts", None)
    return sync


def parallelize(cfg: Config, dims: ParallelDims) -> tuple[GPT, GradSync]:
    """(model, gradient sync) of this layout: what the trainer (and, through it, the planner's
    measurement) trains. Call after `dims.build_mesh()`; a collective when distributed (DDP
    checks the parameters' shapes across ranks)."""
    model = build_model(cfg, dims)
    return model, build_grad_sync(model, cfg, dims)
