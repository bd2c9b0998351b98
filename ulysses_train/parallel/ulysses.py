"""UlyssesAttention: sequence-parallel attention around any local attention kernel.

DeepSpeed-Ulysses (Jacobs et al., 2023): every rank of a sequence-parallel group of P ranks
holds S/P consecutive tokens. Attention is the only layer that needs the whole sequence, so it
is wrapped: one all-to-all turns the rank's `(B, S/P, H, D)` q/k/v into `(B, S, H/P, D)` (all
tokens, a 1/P share of the heads), the unmodified local kernel runs causal attention on that,
and a second all-to-all turns the output back into `(B, S/P, H, D)`. Communication per rank is
proportional to S*d/P, constant when sequence length and rank count grow together.

The module owns no parameters and knows nothing about the model around it: it is injected as
the model's `attention_fn` (docs/architecture.md §3, "model code runs on one device"), and it can
wrap any kernel with the signature `fn(q, k, v, **kw)` in the `(B, S, H, D)` layout.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .comm import group_size, head_to_seq, seq_to_head_qkv

LocalAttention = Callable[..., torch.Tensor]


class UlyssesAttention(nn.Module):
    """Sequence-parallel attention: `attn(q, k, v, **kw)` on this rank's sequence slice.

    Args:
        local_attention: a kernel `fn(q, k, v, **kw) -> out` with q `(B, S, Hq, D)`, k/v
            `(B, S, Hkv, D)`, out `(B, S, Hq, D)`, and GQA in the `repeat_interleave` convention
            (query head h reads kv head h // (Hq/Hkv)) — e.g. `sdpa_attention`. A function or an
            `nn.Module`.
        group: the sequence-parallel process group (None: the default group). Its ranks, in
            group-rank order, hold consecutive slices of the sequence.

    Call with q `(B, S/P, Hq, D)` and k, v `(B, S/P, Hkv, D)`: group rank r holds tokens
    r*S/P ... (r+1)*S/P - 1 (positions, e.g. RoPE, must already be global). Keyword arguments
    (e.g. `causal=True`) go unchanged to `local_attention`, so the default is the kernel's own;
    the kernel sees the whole sequence, so a `mask=` (a DocumentMask) must describe the global
    rows, not this rank's slice (the kernels refuse one of the wrong length).
    Returns `(B, S/P, Hq, D)`, contiguous, for the same tokens.

    Head-count rules (ValueError otherwise): Hq % P == 0, Hq % Hkv == 0, and either
    Hkv % P == 0 (each rank gets Hkv/P kv heads) or P % Hkv == 0 (each kv head is replicated to
    the P/Hkv ranks whose query heads read it; the backward sums the copies, which is the exact
    GQA gradient). On a size-1 group the call is exactly `local_attention(q, k, v, **kw)`.

    Collectives per call: 2 all-to-alls forward (q, k, v share one when dtypes and head dims
    agree; else 4) and as many backward.
    """

    def __init__(self, local_attention: LocalAttention, group: ProcessGroup | None = None):
        super().__init__()
        self.local_attention = local_attention
        self.group = group
        self.world_size = group_size(group)  # fixed for the group's lifetime; read once

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.world_size == 1:
            # Size-1 path: exactly the reference, not a no-op all-to-all with copies.
            return self.local_attention(q, k, v, **kwargs)
        check_ulysses_shapes(q, k, v, self.world_size)
        # (B, S/P, Hq, D), (B, S/P, Hkv, D) x2 -> (B, S, Hq/P, D), (B, S, Hkv', D) x2
        # (Hkv' = Hkv/P, or 1 with replication); one all-to-all for all three.
        q_h, k_h, v_h = seq_to_head_qkv(q, k, v, self.group)
        out = self.local_attention(q_h, k_h, v_h, **kwargs)  # (B, S, Hq/P, D)
        return head_to_seq(out, self.group)  # (B, S, Hq/P, D) -> (B, S/P, Hq, D)

    def extra_repr(self) -> str:
        name = getattr(self.local_attention, "__name__", type(self.local_attention).__name__)
        return f"local_attention={name}, world_size={self.world_size}"


def check_ulysses_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: int) -> None:
    """Raise ValueError unless q/k/v are `(B, S/P, H, D)` with head counts Ulysses can split."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"UlyssesAttention expects q, k, v as (B, S/P, H, D); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"UlyssesAttention: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)} disagree on batch, local sequence or kv heads")
    hq, hkv = q.shape[2], k.shape[2]
    if hq % p != 0:
        raise ValueError(f"UlyssesAttention: query heads ({hq}) must be divisible by the "
                         f"sequence-parallel size ({p}); choose sp dividing n_heads")
    if hq % hkv != 0:
        raise ValueError(f"UlyssesAttention: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if hkv % p != 0 and p % hkv != 0:
        raise ValueError(f"UlyssesAttention: kv heads ({hkv}) and sequence-parallel size ({p}) "
                         f"must divide one another (kv_heads % sp == 0, or sp % kv_heads == 0 "
                         f"to replicate kv heads); choose another sp or n_kv_heads")
