"""Local (single-device) attention kernels.

Every kernel has the signature `fn(q, k, v, *, causal=True) -> out` with
    q   (B, S, Hq, D)
    k,v (B, S, Hkv, D),  Hq % Hkv == 0
    out (B, S, Hq, D), contiguous, in q's dtype.

Why (B, S, H, D) and not SDPA's (B, H, S, D): it is the layout the projections produce and the
layout the Ulysses all-to-all splits (sequence on dim 1, heads on dim 2), so a
`UlyssesAttention(local_attention, group)` wrapper can call any of these kernels on its
gathered `(B, S, H/P, D)` tensors without knowing which one it holds.

GQA convention: query head h reads kv head h // (Hq // Hkv), i.e. consecutive query heads share
a kv head (the `repeat_interleave` layout of Llama / HF `repeat_kv` and SDPA's `enable_gqa`).
A Ulysses wrapper that replicates kv heads must preserve this mapping per rank.

The kernels are stateless functions: the model stores whichever one it is given and never
looks inside it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q (B, S, Hq, D) and k, v (B, S, Hkv, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"query heads {hq} is not a multiple of kv heads {hkv}")
    return hq, hkv


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   causal: bool = True) -> torch.Tensor:
    """Attention through `torch.nn.functional.scaled_dot_product_attention` (the default).

    GQA goes through SDPA's `enable_gqa`, which avoids materialising Hq/Hkv copies of k and v
    (at 128k tokens those copies would cost more memory than q itself).
    """
    hq, hkv = _check_shapes(q, k, v)
    # SDPA wants heads before sequence: (B, S, H, D) -> (B, H, S, D). The transposes are views;
    # SDPA accepts strided inputs as long as the last dim is contiguous, which it is.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=hq != hkv)
    # (B, Hq, S, D) -> (B, S, Hq, D); contiguous because the next op is a view to (B, S, Hq*D)
    # and, under Ulysses, an all-to-all (which silently misreads non-contiguous tensors).
    return out.transpose(1, 2).contiguous()


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    causal: bool = True) -> torch.Tensor:
    """Explicit reference: softmax(q k^T / sqrt(D) + causal mask) v, computed in fp32.

    Materialises the (B, Hq, S, S) score matrix: for tests and debugging, never long sequences.
    """
    hq, hkv = _check_shapes(q, k, v)
    seq, head_dim = q.shape[1], q.shape[3]
    qf = q.float().transpose(1, 2)  # (B, S, Hq, D) -> (B, Hq, S, D)
    # Expand kv to one copy per query head (the GQA mapping h -> h // (Hq/Hkv)).
    kf = k.float().repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hq, S, D)
    vf = v.float().repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hq, S, D)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(head_dim)  # (B, Hq, S, S)
    if causal:
        future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)  # (S, S): key > query
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # fp32 softmax
    out = probs @ vf  # (B, Hq, S, S) @ (B, Hq, S, D) -> (B, Hq, S, D)
    return out.transpose(1, 2).contiguous().to(q.dtype)  # (B, Hq, S, D) -> (B, S, Hq, D)
