"""One transformer block: attention and a gated MLP, each behind a pre-norm and a residual add.

The block covers the Llama, Mistral, Qwen2/3 and Gemma 3 text families with a few named
switches of ModelConfig (docs/models.md lists which family sets which):

    x = x + post_attention_norm(Attention(attention_norm(x)))   # post norm: sandwich_norm only
    x = x + post_ffn_norm(MLP(ffn_norm(x)))

Attention: q, k, v projections (n_heads / n_kv_heads heads of `head_dim`), an RMSNorm over
each head's q and k (`qk_norm`), RoPE, the injected kernel, the output projection. MLP:
w2(act(w1 x) * w3 x) with act = silu (SwiGLU) or tanh-GELU (GeGLU, `mlp_activation`).
Attribute names are part of the tensor-parallel and Hugging Face contracts (model/gpt.py).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config.architecture import head_dim
from ..config.schema import ModelConfig
from .norm import RMSNorm
from .rope import apply_rotary
from .tiling import tiled_mlp

AttentionFn = Callable[..., torch.Tensor]
_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Attention(nn.Module):
    """Projections + QK-norm + RoPE around an injected kernel `attention_fn(q, k, v, causal=True)`.

    `window` > 0 (a sliding-window layer, `layer_windows`) is passed as `window=` on every call;
    0 passes nothing, so kernels without window support keep working for full layers and fail
    loudly (TypeError) rather than attend to the whole past on a sliding one.

    The kernels scale logits by head_dim^-0.5. A model with `query_pre_attn_scalar` s (Gemma)
    wants s^-0.5, so q is multiplied by (head_dim / s)^0.5 after RoPE: the same logits with any
    kernel (the ring's, flash-attn's) and no scale argument to thread through them. Skipped
    when s = head_dim (every Gemma 3 size but 27B).
    """

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn, window: int = 0):
        super().__init__()
        self.window = window
        self.head_dim = head_dim(cfg)
        bias = cfg.qkv_bias  # Qwen2: biases on q, k, v only (never on wo or the MLP)
        q_width, kv_width = cfg.n_heads * self.head_dim, cfg.n_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.d_model, q_width, bias=bias)
        self.wk = nn.Linear(cfg.d_model, kv_width, bias=bias)
        self.wv = nn.Linear(cfg.d_model, kv_width, bias=bias)
        self.wo = nn.Linear(q_width, cfg.d_model, bias=False)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # one weight of head_dim shared by every head (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_weight_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_weight_offset)
        scalar = cfg.query_pre_attn_scalar
        self.q_scale = math.sqrt(self.head_dim / scalar) if scalar else 1.0
        self.attention_fn = attention_fn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask=None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: the local head count, which is smaller under a tensor-parallel plan.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)  # (B, S, Hq*D) -> (B, S, Hq, D)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)  # (B, S, Hkv*D) -> (B, S, Hkv, D)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)  # (B, S, Hkv*D) -> (B, S, Hkv, D)
        if self.q_norm is not None:  # over D, per head, before RoPE (transformers' order)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        # `mask` (a document mask, see masking.py) is only passed when set, so kernels without
        # mask support keep working for the plain causal case.
        kwargs = {"causal": True} if mask is None else {"causal": True, "mask": mask}
        if self.window:
            kwargs["window"] = self.window
        out = self.attention_fn(q, k, v, **kwargs)  # (B, S, Hq, D)
        return self.wo(out.reshape(bsz, seq, -1))  # (B, S, Hq, D) -> (B, S, Hq*D) -> (B, S, d)


class FeedForward(nn.Module):
    """Gated MLP w2(act(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down.
    act: silu (SwiGLU, Shazeer 2020) or the tanh approximation of GELU (GeGLU, Gemma)."""

    def __init__(self, d_model: int, hidden: int, activation: str = "silu"):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block; the unit of activation checkpointing and FSDP wrapping.

    `checkpoint_fn` (None = plain autograd) is injected by the activation-checkpointing pass:
    `checkpoint_fn(run, x, cos, sin, mask=...)` must return `run(x, cos, sin, mask=...)`,
    deciding only what is kept for backward. `mlp_chunk` > 0 tiles the MLP (tiling.py).
    `post_attention_norm` / `post_ffn_norm` exist only with `model.sandwich_norm`.
    """

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn, mlp_chunk: int = 0,
                 window: int = 0):
        super().__init__()
        offset = cfg.norm_weight_offset
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps, offset)
        self.attention = Attention(cfg, attention_fn, window)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, offset)
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden, cfg.mlp_activation)
        self.post_attention_norm = self.post_ffn_norm = None
        if cfg.sandwich_norm:
            self.post_attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps, offset)
            self.post_ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, offset)
        self.mlp_chunk = mlp_chunk
        self.checkpoint_fn: Callable | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask=None) -> torch.Tensor:
        if self.checkpoint_fn is None:
            return self._run(x, cos, sin, mask=mask)
        return self.checkpoint_fn(self._run, x, cos, sin, mask=mask)

    def _run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             mask=None) -> torch.Tensor:
        # mask by keyword: a tensor-parallel input plan lays out the positional inputs only.
        h = self.attention(self.attention_norm(x), cos, sin, mask=mask)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        x = x + h
        h = tiled_mlp(self.feed_forward, self.ffn_norm(x), self.mlp_chunk)
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + h
