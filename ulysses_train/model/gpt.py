"""The single-device Llama-style GPT.

Architecture (Llama 2/3): token embedding -> n_layers x [x + Attn(RMSNorm(x)), x + SwiGLU(RMSNorm(x))]
-> RMSNorm -> linear head. Attention uses RoPE on q and k and grouped-query attention.

Ownership and invariants:
- This module contains no distributed code. Sequence parallelism enters only through the injected
  `attention_fn` (a `UlyssesAttention(local_attention, group)` wrapper later); tensor parallelism
  is applied from outside by a plan that refers to the attribute names below, which are therefore
  part of the contract: `tok_embeddings`, `layers[i].{attention_norm, attention.{wq, wk, wv, wo},
  ffn_norm, feed_forward.{w1, w2, w3}}`, `norm`, `output` (None when embeddings are tied);
  `wq`/`wk`/`wv` carry a `bias` only with `model.qkv_bias`.
- Head counts are never baked into reshapes (`view(B, S, -1, D)`), so the same code runs on the
  local heads of a tensor-parallel shard.
- Every token's computation sees only its own row of `input_ids`/`position_ids`, except inside
  `attention_fn`: a rank holding a slice of the sequence runs this model unchanged.
- `forward(..., labels)` returns a token *sum* and a count, never a mean (the trainer divides by
  the global count; docs/architecture.md §1 "loss is token-weighted").
- Build on the meta device, `to_empty`, then `init_weights(seed)`; see `init.py` for why the
  initial values are independent of layout and module order.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config.architecture import layer_windows
from ..config.parallel import padded_vocab
from ..config.schema import ModelConfig
from .attention import document_mask_for, sdpa_attention
from .init import _is_dtensor, init_param_
from .masking import DocumentMask
from .precision import compute_dtype
from .rope import apply_rotary, rope_cos_sin, rope_frequencies
from .tiling import tiled_head_loss, tiled_mlp
from .vocab import mask_padded_vocab_

AttentionFn = Callable[..., torch.Tensor]
IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim of x (..., d).

    Statistics and the product in fp32, the result in the compute dtype (`precision.py`: the
    autocast dtype, else x's dtype). The weight is first rounded to the compute dtype: that is
    the value FSDP2's bf16 parameter copy holds, so a fp32 master weight under autocast (zero=0)
    and the FSDP2-gathered bf16 weight (zero>0) compute exactly the same norm. In fp32 this is
    `F.rms_norm` unchanged; in a lower dtype `_LowPrecisionRMSNorm`, which keeps x as it is for
    backward (torch's CPU `rms_norm` keeps fp32 copies of a bf16 input: twice the bytes).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if dtype == torch.float32:
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        # fp32 statistics: in bf16 the mean of squares of a 4096-wide row loses ~3 digits.
        return _LowPrecisionRMSNorm.apply(x.to(dtype), self.weight.to(dtype), self.eps)


class _LowPrecisionRMSNorm(torch.autograd.Function):
    """RMSNorm of a low-precision x (..., d) with weight (d,) in x's dtype, computed in fp32.

    Forward: rstd = 1 / sqrt(mean(x^2) + eps) (..., 1) fp32; y = round(x * rstd * w). Saves x
    (its own dtype), w and rstd, not a fp32 copy of x. Backward (fp32, with xh = x * rstd,
    gw = g * w): dx = rstd * (gw - xh * mean(gw * xh)), dw = sum over tokens of g * xh — the
    standard RMSNorm gradient (Zhang & Sennrich 2019). Both directions run with autocast off.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.device_type = x.device.type
        with torch.autocast(ctx.device_type, enabled=False):
            xf = x.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
            ctx.save_for_backward(x, weight, rstd)
            return (xf * rstd * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        with torch.autocast(ctx.device_type, enabled=False):
            xh = x.float() * rstd  # (..., d)
            g = grad.float()
            gw = g * weight.float()
            dx = rstd * (gw - xh * (gw * xh).mean(-1, keepdim=True))
            dw = (g * xh).reshape(-1, x.shape[-1]).sum(0)  # (..., d) -> (N, d) -> (d,)
        return dx.to(x.dtype), dw.to(weight.dtype), None


class Attention(nn.Module):
    """Projections + RoPE around an injected attention kernel `attention_fn(q, k, v, causal=True)`.

    `window` > 0 (a sliding-window layer, `layer_windows`) is passed as `window=` on every call;
    0 passes nothing, so kernels without window support keep working for full layers and fail
    loudly (TypeError) rather than attend to the whole past on a sliding one.
    """

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn, window: int = 0):
        super().__init__()
        self.window = window
        self.head_dim = cfg.d_model // cfg.n_heads
        bias = cfg.qkv_bias  # Qwen2: biases on q, k, v only (never on wo or the MLP)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.attention_fn = attention_fn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask=None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: the local head count, which is smaller under a tensor-parallel plan.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)  # (B, S, Hq*D) -> (B, S, Hq, D)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)  # (B, S, Hkv*D) -> (B, S, Hkv, D)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)  # (B, S, Hkv*D) -> (B, S, Hkv, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # `mask` (a document mask, see masking.py) is only passed when set, so kernels without
        # mask support keep working for the plain causal case.
        kwargs = {"causal": True} if mask is None else {"causal": True, "mask": mask}
        if self.window:
            kwargs["window"] = self.window
        out = self.attention_fn(q, k, v, **kwargs)  # (B, S, Hq, D)
        return self.wo(out.reshape(bsz, seq, -1))  # (B, S, Hq, D) -> (B, S, Hq*D) -> (B, S, d)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block; the unit of activation checkpointing and FSDP wrapping.

    `checkpoint_fn` (None = plain autograd) is injected by the activation-checkpointing pass:
    `checkpoint_fn(run, x, cos, sin, mask=...)` must return `run(x, cos, sin, mask=...)`,
    deciding only what is kept for backward. `mlp_chunk` > 0 tiles the MLP (tiling.py).
    """

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn, mlp_chunk: int = 0,
                 window: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, attention_fn, window)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden)
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
        x = x + self.attention(self.attention_norm(x), cos, sin, mask=mask)
        return x + tiled_mlp(self.feed_forward, self.ffn_norm(x), self.mlp_chunk)


class GPT(nn.Module):
    """Llama-style decoder. See the module docstring for the naming and loss contracts.

    The constructor leaves PyTorch's default init in place (or nothing, on the meta device);
    `init_weights(seed)` is what gives the model its defined initial state.
    """

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn = sdpa_attention,
                 loss_chunk: int = 0, mlp_chunk: int = 0):
        """`loss_chunk` / `mlp_chunk`: tokens per tile of the head+loss / of the MLP (0 = untiled);
        memory options only, the function computed is the same (tiling.py)."""
        super().__init__()
        self.cfg = cfg
        self.loss_chunk = loss_chunk
        self.vocab_size = padded_vocab(cfg.vocab_size)
        self.head_dim = cfg.d_model // cfg.n_heads
        self.tok_embeddings = nn.Embedding(self.vocab_size, cfg.d_model)
        self.attention_fn = attention_fn  # every block's; `document_mask` builds for it
        # Each layer's window (0 = full causal): model.sliding_window x model.layer_types.
        self.windows = layer_windows(cfg)
        self.layers = nn.ModuleList(Block(cfg, attention_fn, mlp_chunk, window)
                                    for window in self.windows)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied: no separate module, the head reads tok_embeddings.weight directly. (Sharing one
        # Parameter between two modules breaks silently under `to_empty`, which re-creates each
        # module's parameters separately.)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, self.vocab_size, bias=False)
        # Non-persistent: derived from the config, recomputed by init_weights, not checkpointed.
        # attention_scaling: yarn's factor on cos/sin (1.0 for the other scalings), a float.
        inv_freq, self.attention_scaling = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # (logits, labels) -> (loss_sum, n_valid). Injected, like attention_fn: a tensor-parallel
        # plan replaces it with a vocab-parallel loss for its vocab-sharded logits.
        self.loss_fn = token_loss_sum

    def document_mask(self, document_ids: torch.Tensor) -> DocumentMask:
        """The `attn_mask` for global document ids `(B, S)` (the whole padded rows, on the
        compute device), with what this model's attention kernel reads already built."""
        return document_mask_for(document_ids, self.attention_fn, tuple(sorted(set(self.windows))))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor | None = None, attn_mask=None):
        """input_ids, position_ids (and labels) are (B, S) int64; positions are global.

        `attn_mask`: None (plain causal attention over the whole packed row) or a document mask
        built once per batch from the *global* document ids (`masking.py`); it is handed to
        every layer's `attention_fn` as `mask=`, never looked into here. A sliding-window layer
        also passes its `window=` (the intersection is the kernel's business).

        Returns logits (B, S, Vpad) when `labels` is None — the padding columns >=
        `cfg.vocab_size` at -inf (vocab.py) — else `(loss_sum, n_valid)`: the fp32
        sum of per-token cross-entropy over labels != -100 (0-dim, differentiable) and the number
        of such labels (0-dim int64). Labels are already shifted by the data pipeline.
        """
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} != "
                             f"input_ids {tuple(input_ids.shape)}")
        h = self.tok_embeddings(input_ids)  # (B, S) -> (B, S, d)
        # The residual stream is in the compute dtype in every layout: autocast leaves the
        # lookup of a fp32 table in fp32, while FSDP2's bf16 parameter copy already yields bf16.
        h = h.to(compute_dtype(h))
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, self.attention_scaling)  # 2 x (B, S, 1, D)
        for layer in self.layers:
            h = layer(h, cos, sin, mask=attn_mask)
        h = self.norm(h)
        if labels is None:
            return self._logits(h)
        return tiled_head_loss(h, labels, self._head_loss, self.loss_chunk)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        # (B, S, d) -> (B, S, Vpad). The untied head is called as a module so that wrappers
        # applied from outside (a tensor-parallel plan, FSDP2) see it run. The padding columns
        # become -inf here, once, for every consumer and layout (vocab.py).
        if self.output is None:
            logits = F.linear(h, self.tok_embeddings.weight)
        else:
            logits = self.output(h)
        return mask_padded_vocab_(logits, self.cfg.vocab_size)

    def _head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(self._logits(h), labels)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter and non-persistent buffer deterministically from `seed`.

        Scheme: norm weights 1; q/k/v biases (`qkv_bias`) 0, as Qwen2 initialises them; every
        other weight (embedding, projections, head) N(0, init_std), except the
        residual-stream output projections `wo` and `w2`, drawn with
        init_std / sqrt(2 * n_layers) so that the residual stream's variance does not grow with
        depth (2 residual writes per block; GPT-2 / Megatron scaling). Each parameter is drawn
        in full from its own generator seeded by (seed, name): see `init.py`.
        """
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):  # attention_norm, ffn_norm and the final norm
                init_param_(param, name, seed, lambda t, g: t.fill_(1.0))
                continue
            if name.endswith((".wq.bias", ".wk.bias", ".wv.bias")):
                init_param_(param, name, seed, lambda t, g: t.zero_())
                continue
            if name.endswith((".wo.weight", ".w2.weight")):
                sd = residual_std
            elif name.endswith(".weight"):
                sd = std
            else:  # a new kind of parameter must get an explicit rule, never torch's default
                raise RuntimeError(f"init_weights has no rule for parameter {name!r}")
            init_param_(param, name, seed, lambda t, g, sd=sd: t.normal_(0.0, sd, generator=g))
        device = self.inv_freq.device
        # Reassign instead of copy_: restores fp32 even if the module was cast to a lower dtype.
        inv_freq, self.attention_scaling = rope_frequencies(self.cfg)
        self.inv_freq = inv_freq.to(device)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of fp32 cross-entropy over labels != -100, count of those labels).

    The upcast happens before log-softmax, so bf16 autocast logits still get an fp32 loss.
    With no valid label the sum is an exact 0 (a mean would be NaN). Single-device only: logits
    sharded on the vocab dim (a DTensor from a tensor-parallel head) are refused.
    """
    if _is_dtensor(logits):  # plain cross-entropy would all-gather the full-vocab logits
        raise TypeError("token_loss_sum got vocab-sharded (DTensor) logits: use the loss the "
                        "tensor-parallel plan installs as `model.loss_fn`")
    flat_logits = logits.float().reshape(-1, logits.shape[-1])  # (B, S, V) -> (B*S, V)
    flat_labels = labels.reshape(-1)  # (B, S) -> (B*S,)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    n_valid = (flat_labels != IGNORE_INDEX).sum()
    return loss_sum, n_valid


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters (a tied weight counted once; DTensors counted at global size).

    `exclude_embeddings` drops the token embedding table; an untied output head stays counted
    (it is a real matmul per token), a tied head goes with the embedding it shares.
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates
    if exclude_embeddings:
        total -= model.tok_embeddings.weight.numel()
    return total
