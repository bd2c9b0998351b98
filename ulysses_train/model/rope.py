"""Rotary position embeddings (RoPE), rotate-half convention.

Convention (GPT-NeoX / Hugging Face Llama, *not* the interleaved Meta-checkpoint layout): the
head dimension D is split into two halves, and element i of the first half is rotated together
with element i + D/2 of the second half. For a token at position p, pair i is rotated by the
angle p * theta^(-2i/D):

    out[i]       = x[i] * cos(a_i) - x[i + D/2] * sin(a_i)
    out[i + D/2] = x[i + D/2] * cos(a_i) + x[i] * sin(a_i)

Invariants:
- Positions are *explicit and global*. Under Ulysses sequence parallelism rank r holds tokens
  r*S/P ... (r+1)*S/P - 1 and must pass exactly those positions; nothing here assumes a slice
  starts at 0. With document masking the caller passes positions that restart per document.
- Angles, cos and sin are computed in fp32 whatever the activation dtype (bf16 angles lose whole
  radians at long positions); the rotated result is returned in the input's dtype.
- `inv_freq` is fp32 and never stored in a lower precision (the model recomputes it in
  `init_weights`, so a `.to(bf16)` or `to_empty` cannot silently corrupt it).
"""
from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D) for i in [0, D/2): a float32 tensor of shape (D/2,).

    Created on the current default device (so it follows a `torch.device(...)` context).
    """
    if head_dim % 2 != 0:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim  # (D/2,)
    return 1.0 / (theta ** exponents)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) tables of shape (B, S, 1, D), broadcastable over heads.

    Computed once per forward and shared by every layer (recomputing them per layer would cost
    a (B, S, D) transcendental pass per layer for nothing).
    """
    angles = position_ids.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # (B, S, D/2)
    # Duplicate so that element i and i + D/2 see the same angle (rotate-half pairing).
    angles = torch.cat((angles, angles), dim=-1)  # (B, S, D/2) -> (B, S, D)
    angles = angles.unsqueeze(2)  # (B, S, D) -> (B, S, 1, D): one table for all heads
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (..., D) -> 2 x (..., D/2)
    return torch.cat((-x2, x1), dim=-1)  # 2 x (..., D/2) -> (..., D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, S, H, D) by precomputed fp32 tables (B, S, 1, D); returns x's dtype."""
    xf = x.float()  # the rotation itself in fp32 too, so bf16 inputs round only once
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply rotary embeddings to x of shape (B, S, H, D) at global `position_ids` (B, S) int64.

    Returns a tensor of the same shape and dtype as x.
    """
    if x.dim() != 4 or position_ids.shape != x.shape[:2]:
        raise ValueError(f"expected x (B, S, H, D) and position_ids (B, S); got "
                         f"{tuple(x.shape)} and {tuple(position_ids.shape)}")
    cos, sin = rope_cos_sin(position_ids, inv_freq)
    return apply_rotary(x, cos, sin)
