"""Building the model for a layout: the one place where parallelism enters the single-device GPT.

`build_model` constructs the model on the meta device with its attention function (Ulysses
around the local kernel when sp > 1 and ring = 1; Ulysses x ring attention when ring > 1),
applies tensor parallelism, activation checkpointing,
compile and FSDP2 in that order (docs/architecture.md §3), then materialises and initialises
the parameters by name, so every layout starts from the same weights. `resolve_dtype` owns
`train.precision`'s meaning.
"""
from __future__ import annotations

import torch

from ..config.schema import Config
from ..model import GPT, select_attention
from . import ParallelDims, UlyssesAttention
from .activations import apply_activation_checkpointing, apply_compile
from .sharding import apply_sharding
from .tensor import apply_tensor_parallel


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` = fp32 on CPU, bf16 on GPU. bf16 is autocast; master weights stay fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def build_attention(cfg: Config, dims: ParallelDims):
    """The model's `attention_fn` for this layout: the local kernel alone (sp = 1), Ulysses
    around it over the sp group (ring = 1), or the hybrid Ulysses x ring layer over the
    ("ulysses", "ring") groups, which reads the token layout (parallel/layout.py) the data path
    shards by. Every one takes q/k/v of this rank's tokens and a DocumentMask of the padded
    global rows."""
    local_attention = select_attention(dims.device, cfg.data.document_mask)
    if dims.sp == 1:
        return local_attention
    if dims.ring == 1:
        return UlyssesAttention(local_attention, dims.group("sp"))
    from .ring import UlyssesRingAttention  # only where a ring is asked for

    return UlyssesRingAttention(dims.group("ulysses"), dims.group("ring"),
                                dims.sequence_layout(cfg.data.seq_len))


def build_model(cfg: Config, dims: ParallelDims) -> GPT:
    """Meta-device construction, parallelism injected, then materialize and initialize.

    The model is single-device code: sequence parallelism enters only as the attention function
    (UlyssesAttention around SDPA on the sp group). Building on meta first means no memory is
    spent on a throwaway init, and `init_weights` gives every layout the same initial weights
    (parameters are seeded by name).
    """
    attention_fn = build_attention(cfg, dims)
    t = cfg.train
    with torch.device("meta"):
        model = GPT(cfg.model, attention_fn=attention_fn, loss_chunk=t.loss_chunk,
                    mlp_chunk=t.mlp_chunk)
    # The order matters (docs/architecture.md §3): TP first (the plan names the unwrapped modules),
    # then activation checkpointing and compile (per block, names unchanged), then FSDP2, which
    # wraps whatever layout TP left; parameters are only materialized, and initialized per name
    # shard by shard, once every wrapper is in place.
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.meshes["tp"])
    apply_activation_checkpointing(model, t.activation_checkpointing, t.activation_offload)
    if t.compile:
        apply_compile(model)
    param_dtype = resolve_dtype(cfg.train.precision, dims.device)
    apply_sharding(model, dims, cfg.parallel.zero,
                   param_dtype=None if param_dtype == torch.float32 else param_dtype)
    model.to_empty(device=dims.device)
    model.init_weights(cfg.train.seed)
    return model
