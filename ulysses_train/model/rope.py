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
frequencies, plus, for yarn, one scalar `attention_scaling` that multiplies cos and sin. Positions
stay the true global positions under every method, so sequence parallelism is unaffected.
`linear`, `llama3` and `yarn` reproduce Hugging Face transformers' `ROPE_INIT_FUNCTIONS`
(transformers/modeling_rope_utils.py, v5) operation for operation, so a checkpoint trained with
either reads the same angles in the other; `ntk` (static) is ours alone.
"""
from __future__ import annotations

import math

import torch

from ..config.architecture import head_dim
from ..config.schema import ModelConfig


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
                         high_freq_factor: float = 4.0, truncate: bool = True) -> torch.Tensor:
    """fp32 inverse frequencies (D/2,) of `rope_inv_freq`, rescaled for context extension.

    `factor` is target context / `original_seq_len` (the pretraining context). Methods:
    - none: theta^(-2i/D) unchanged.
    - linear (position interpolation, Chen et al. 2023): every frequency / factor, i.e. position
      p is rotated as p / factor would have been, so S * factor positions span the angles S did.
    - ntk (static "NTK-aware", bloc97 2023; ours, transformers has only the dynamic variant):
      base theta * factor^(D / (D - 2)). The fastest pair (i = 0) is untouched and the slowest
      (i = D/2 - 1) is divided by exactly `factor`.
    - yarn (Peng et al. 2023, "NTK-by-parts", as transformers computes it): see `_yarn`.
    - llama3 (Llama 3.1, as transformers computes it): see `_llama3`.
    Created on the current default device, like `rope_inv_freq`. ValueError for another method.
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
        return _yarn(head_dim, theta, factor, original_seq_len, beta_fast, beta_slow, truncate)
    if method == "llama3":
        return _llama3(inv_freq, factor, original_seq_len, low_freq_factor, high_freq_factor)
    raise ValueError(f"unknown rope scaling {method!r}")


def _llama3(inv_freq: torch.Tensor, factor: float, original: int, low: float,
            high: float) -> torch.Tensor:
    """Llama 3.1: wavelengths > original / low are divided by `factor`, wavelengths < original /
    high are kept, and in between the kept share grows linearly in original / wavelength.

    Why per frequency: a pair that turned many times within the pretraining context has seen
    every angle, so longer sequences need nothing new from it; a pair that turned less than
    once would meet unseen angles and is interpolated into the range it was trained on.
    Written as transformers' `_compute_llama3_parameters` so the fp32 roundings are the same.
    """
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq  # (D/2,)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_correction_range(head_dim: int, theta: float, original: int, beta_fast: float,
                          beta_slow: float, truncate: bool = True) -> tuple[float, float]:
    """(low, high) pair indices between which yarn's ramp runs (transformers'
    `find_correction_range`): pair i makes original * theta^(-2i/D) / (2 pi) turns over the
    pretraining context, so the pair making r turns is i(r) = D ln(original / (2 pi r)) /
    (2 ln theta). low = i(beta_fast), high = i(beta_slow); `truncate` floors low and ceils
    high; then clamped to [0, D - 1] (transformers' bound, not D/2 - 1).
    """
    def pair(turns: float) -> float:
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair(beta_fast), pair(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def _yarn(head_dim: int, theta: float, factor: float, original: int, beta_fast: float,
          beta_slow: float, truncate: bool) -> torch.Tensor:
    """YaRN's frequencies: pairs below the correction range (fast, many turns) are kept, pairs
    above it (slow) divided by `factor`, and the kept share falls linearly in the pair *index*
    across the range (`yarn_correction_range`). Operation for operation transformers'
    `_compute_yarn_parameters` (and the YaRN reference code), so the fp32 values are identical.
    """
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)  # (D/2,)
    low, high = yarn_correction_range(head_dim, theta, original, beta_fast, beta_slow, truncate)
    if low == high:
        high += 0.001  # a one-point range would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate
    return interpolation * (1 - keep) + extrapolation * keep


def yarn_attention_factor(factor: float, attention_factor: float | None = None,
                          mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
    """YaRN's attention scaling, the factor cos and sin are multiplied by (so every attention
    logit by its square): sharper attention to offset the flatter softmax over a longer,
    interpolated context. As transformers: `attention_factor` when given; else, when both
    `mscale` and `mscale_all_dim` are set (DeepSeek's variant), m(factor, mscale) /
    m(factor, mscale_all_dim); else m(factor, 1), where m(s, k) = 0.1 k ln(s) + 1 for s > 1
    and 1 otherwise (the paper's empirical fit sqrt(1/t)).
    """
    if attention_factor is not None:
        return float(attention_factor)

    def m(scale: float, k: float = 1.0) -> float:
        return 0.1 * k * math.log(scale) + 1.0 if scale > 1 else 1.0

    if mscale and mscale_all_dim:
        return float(m(factor, mscale) / m(factor, mscale_all_dim))
    return m(factor)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) for a model: the fp32 (D/2,) frequencies of
    `cfg.rope_scaling` and the factor cos and sin are multiplied by (`yarn_attention_factor`
    for yarn, else 1.0).
    """
    inv_freq = rope_scaled_inv_freq(
        head_dim(cfg), cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor,
        cfg.rope_original_seq_len, cfg.rope_beta_fast, cfg.rope_beta_slow,
        cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_truncate)
    if cfg.rope_scaling != "yarn":
        return inv_freq, 1.0
    return inv_freq, yarn_attention_factor(cfg.rope_factor, cfg.rope_attention_factor,
                                           cfg.rope_mscale, cfg.rope_mscale_all_dim)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) tables of shape (B, S, 1, D), broadcastable over heads.

    Computed once per forward and shared by every layer (recomputing them per layer would cost
    a (B, S, D) transcendental pass per layer for nothing). Both tables are multiplied by
    `attention_scaling` (yarn's attention scaling, 1.0 otherwise; see `yarn_attention_factor`).
    """
    angles = position_ids.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # (B, S, D/2)
    # Duplicate so that element i and i + D/2 see the same angle (rotate-half pairing).
    angles = torch.cat((angles, angles), dim=-1)  # (B, S, D/2) -> (B, S, D)
    angles = angles.unsqueeze(2)  # (B, S, D) -> (B, S, 1, D): one table for all heads
    if attention_scaling == 1.0:  # skip a (B, S, D) pass that would change nothing
        return angles.cos(), angles.sin()
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


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
               attention_scaling: float = 1.0) -> torch.Tensor:
    """Apply rotary embeddings to x of shape (B, S, H, D) at global `position_ids` (B, S) int64.

    Returns a tensor of the same shape and dtype as x.
    """
    if x.dim() != 4 or position_ids.shape != x.shape[:2]:
        raise ValueError(f"expected x (B, S, H, D) and position_ids (B, S); got "
                         f"{tuple(x.shape)} and {tuple(position_ids.shape)}")
    cos, sin = rope_cos_sin(position_ids, inv_freq, attention_scaling)
    return apply_rotary(x, cos, sin)
