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

Context extension (`model.rope_scaling`, see `rope_scaled_inv_freq`) only changes the inverse
frequencies, plus, for yarn, one scalar `mscale` that multiplies cos and sin. Positions stay the
true global positions under every method, so sequence parallelism is unaffected.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D) for i in [0, D/2): a float32 tensor of shape (D/2,).

    Created on the current default device (so it follows a `torch.device(...)` context).
    """
    if head_dim % 2 != 0:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim  # (D/2,)
    return 1.0 / (theta ** exponents)


def rope_scaled_inv_freq(head_dim: int, theta: float, method: str, factor: float = 1.0,
                         original_seq_len: int = 8192, beta_fast: float = 32.0,
                         beta_slow: float = 1.0, low_freq_factor: float = 1.0,
                         high_freq_factor: float = 4.0) -> torch.Tensor:
    """fp32 inverse frequencies (D/2,) of `rope_inv_freq`, rescaled for context extension.

    `factor` is target context / `original_seq_len` (the pretraining context). Methods:
    - none: theta^(-2i/D) unchanged.
    - linear (position interpolation, Chen et al. 2023): every frequency / factor, i.e. position
      p is rotated as p / factor would have been, so S * factor positions span the angles S did.
    - ntk ("NTK-aware", bloc97 2023): base theta * factor^(D / (D - 2)). The fastest pair
      (i = 0) is untouched and the slowest (i = D/2 - 1) is divided by exactly `factor`.
    - yarn (Peng et al. 2023, "NTK-by-parts"): per pair, r = original_seq_len / wavelength
      counts its turns over the pretraining context. r <= beta_slow: interpolate (/ factor);
      r >= beta_fast: keep; linear in r between. The temperature is `yarn_mscale(factor)`.
    - llama3 (Llama 3.1): wavelength > original / low_freq_factor: / factor; wavelength <
      original / high_freq_factor: kept; in between linear in original / wavelength = r, so it
      is yarn's ramp with (beta_slow, beta_fast) = (low_freq_factor, high_freq_factor).
    Created on the current default device, like `rope_inv_freq`.
    """
    inv_freq = rope_inv_freq(head_dim, theta)
    if method == "none":
        return inv_freq
    if method == "linear":
        return inv_freq / factor
    if method == "ntk":
        if head_dim <= 2:
            raise ValueError(f"ntk scaling needs a head dim > 2, got {head_dim}")
        return rope_inv_freq(head_dim, theta * factor ** (head_dim / (head_dim - 2)))
    if method == "yarn":
        return _ramp(inv_freq, factor, original_seq_len, beta_slow, beta_fast)
    if method == "llama3":
        return _ramp(inv_freq, factor, original_seq_len, low_freq_factor, high_freq_factor)
    raise ValueError(f"unknown rope scaling {method!r}")


def _ramp(inv_freq: torch.Tensor, factor: float, original_seq_len: int, lo: float,
          hi: float) -> torch.Tensor:
    """Blend interpolation (inv_freq / factor) and extrapolation (inv_freq) by turns r per pair.

    Why per pair: a pair that turned many times within the pretraining context has seen every
    angle, so longer sequences need nothing new from it and interpolating would only blur the
    local positions it resolves; a pair that turned less than once would meet unseen angles
    beyond the original context, so it is interpolated into the range it was trained on.
    """
    turns = original_seq_len * inv_freq / (2 * math.pi)  # r = L / wavelength, (D/2,)
    keep = ((turns - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0 = interpolate, 1 = keep
    return inv_freq * ((1.0 - keep) / factor + keep)


def yarn_mscale(factor: float) -> float:
    """YaRN's attention temperature: sqrt(1/t) = 0.1 ln(factor) + 1, applied to cos and sin.

    Scaling both q and k by it multiplies every attention logit by 1/t: sharper attention to
    offset the flatter (higher-entropy) softmax over a longer, interpolated context. The
    constants are the paper's empirical fit; factor <= 1 (no extension) gets no temperature.
    """
    return 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq, mscale) for a model: the fp32 (D/2,) frequencies of `cfg.rope_scaling` and the
    factor cos and sin are multiplied by (`yarn_mscale` for yarn, else 1.0).
    """
    inv_freq = rope_scaled_inv_freq(
        cfg.d_model // cfg.n_heads, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor,
        cfg.rope_original_seq_len, cfg.rope_beta_fast, cfg.rope_beta_slow,
        cfg.rope_low_freq_factor, cfg.rope_high_freq_factor)
    return inv_freq, (yarn_mscale(cfg.rope_factor) if cfg.rope_scaling == "yarn" else 1.0)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 mscale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) tables of shape (B, S, 1, D), broadcastable over heads.

    Computed once per forward and shared by every layer (recomputing them per layer would cost
    a (B, S, D) transcendental pass per layer for nothing). Both tables are multiplied by
    `mscale` (yarn's attention temperature, 1.0 otherwise; see `yarn_mscale`).
    """
    angles = position_ids.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # (B, S, D/2)
    # Duplicate so that element i and i + D/2 see the same angle (rotate-half pairing).
    angles = torch.cat((angles, angles), dim=-1)  # (B, S, D/2) -> (B, S, D)
    angles = angles.unsqueeze(2)  # (B, S, D) -> (B, S, 1, D): one table for all heads
    if mscale == 1.0:  # skip a (B, S, D) pass that would change nothing
        return angles.cos(), angles.sin()
    return angles.cos() * mscale, angles.sin() * mscale


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (..., D) -> 2 x (..., D/2)
    return torch.cat((-x2, x1), dim=-1)  # 2 x (..., D/2) -> (..., D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, S, H, D) by precomputed fp32 tables (B, S, 1, D); returns x's dtype."""
    xf = x.float()  # the rotation itself in fp32 too, so bf16 inputs round only once
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
               mscale: float = 1.0) -> torch.Tensor:
    """Apply rotary embeddings to x of shape (B, S, H, D) at global `position_ids` (B, S) int64.

    Returns a tensor of the same shape and dtype as x.
    """
    if x.dim() != 4 or position_ids.shape != x.shape[:2]:
        raise ValueError(f"expected x (B, S, H, D) and position_ids (B, S); got "
                         f"{tuple(x.shape)} and {tuple(position_ids.shape)}")
    cos, sin = rope_cos_sin(position_ids, inv_freq, mscale)
    return apply_rotary(x, cos, sin)
