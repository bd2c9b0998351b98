"""The single-device Llama-style GPT.

Architecture (Llama 2/3): token embedding -> n_layers x [x + Attn(RMSNorm(x)), x + SwiGLU(RMSNorm(x))]
-> RMSNorm -> linear head. Attention uses RoPE on q and k and grouped-query attention. The
Mistral, Qwen2/3 and Gemma 3 text families are the same skeleton with named switches
(block.py; docs/models.md): sliding-window layers, q/k/v biases, any head_dim, QK-norm,
sandwich norms, GeGLU, Gemma's norm offset and embedding scale, a RoPE base of their own for
the sliding layers.

Ownership and invariants:
- This module contains no distributed code. Sequence parallelism enters only through the injected
  `attention_fn` (a `UlyssesAttention(local_attention, group)` wrapper later); tensor parallelism
  is applied from outside by a plan that refers to the attribute names below, which are therefore
  part of the contract: `tok_embeddings`, `layers[i].{attention_norm, attention.{wq, wk, wv, wo},
  ffn_norm, feed_forward.{w1, w2, w3}}`, `norm`, `output` (None when embeddings are tied);
  `wq`/`wk`/`wv` carry a `bias` only with `model.qkv_bias`; `attention.{q_norm, k_norm}` exist
  only with `model.qk_norm`, `layers[i].{post_attention_norm, post_ffn_norm}` only with
  `model.sandwich_norm`.
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

import torch
import torch.nn.functional as F
from torch import nn

from ..config.architecture import head_dim, layer_windows
from ..config.parallel import padded_vocab
from ..config.schema import ModelConfig
from .attention import document_mask_for, sdpa_attention
from .block import AttentionFn, Block
from .init import _is_dtensor, init_param_
from .masking import DocumentMask
from .norm import RMSNorm
from .precision import compute_dtype
from .rope import rope_cos_sin, rope_frequencies, rope_inv_freq
from .tiling import tiled_head_loss
from .vocab import mask_padded_vocab_

IGNORE_INDEX = -100


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
        self.head_dim = head_dim(cfg)
        self.tok_embeddings = nn.Embedding(self.vocab_size, cfg.d_model)
        self.attention_fn = attention_fn  # every block's; `document_mask` builds for it
        # Each layer's window (0 = full causal): model.sliding_window x model.layer_types.
        self.windows = layer_windows(cfg)
        self.layers = nn.ModuleList(Block(cfg, attention_fn, mlp_chunk, window)
                                    for window in self.windows)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_weight_offset)
        # Tied: no separate module, the head reads tok_embeddings.weight directly. (Sharing one
        # Parameter between two modules breaks silently under `to_empty`, which re-creates each
        # module's parameters separately.)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, self.vocab_size, bias=False)
        # Non-persistent: derived from the config, recomputed by init_weights, not checkpointed.
        # attention_scaling: yarn's factor on cos/sin (1.0 for the other scalings), a float.
        inv_freq, self.attention_scaling = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # The sliding layers' own RoPE (model.rope_local_theta > 0: Gemma 3), unscaled.
        self.register_buffer("inv_freq_local", self._local_inv_freq(), persistent=False)
        # (logits, labels) -> (loss_sum, n_valid). Injected, like attention_fn: a tensor-parallel
        # plan replaces it with a vocab-parallel loss for its vocab-sharded logits.
        self.loss_fn = token_loss_sum

    def document_mask(self, document_ids: torch.Tensor,
                      host_ids: torch.Tensor | None = None) -> DocumentMask:
        """The `attn_mask` for global document ids `(B, S)` (the whole padded rows, on the
        compute device; `host_ids` their CPU copy, if any), with what this model's attention
        kernel reads already built."""
        return document_mask_for(document_ids, self.attention_fn,
                                 tuple(sorted(set(self.windows))), host_ids)

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
        if self.cfg.scale_embeddings:  # x sqrt(d) rounded to h's dtype first, as transformers
            h = h * torch.tensor(math.sqrt(self.cfg.d_model), dtype=h.dtype)  # Gemma does
        rope = rope_cos_sin(position_ids, self.inv_freq, self.attention_scaling)  # 2 x (B, S, 1, D)
        local = rope if self.inv_freq_local is None else rope_cos_sin(position_ids,
                                                                     self.inv_freq_local)
        for layer, window in zip(self.layers, self.windows):
            cos, sin = local if window else rope
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

        Scheme: norm weights 1 - model.norm_weight_offset (so every norm starts as the
        identity: 1, or Gemma's 0 under its offset 1); q/k/v biases (`qkv_bias`) 0, as Qwen2 initialises them; every
        other weight (embedding, projections, head) N(0, init_std), except the
        residual-stream output projections `wo` and `w2`, drawn with
        init_std / sqrt(2 * n_layers) so that the residual stream's variance does not grow with
        depth (2 residual writes per block; GPT-2 / Megatron scaling). Each parameter is drawn
        in full from its own generator seeded by (seed, name): see `init.py`.
        """
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):  # every RMSNorm: blocks, QK-norms, the final one
                one = 1.0 - self.cfg.norm_weight_offset
                init_param_(param, name, seed, lambda t, g, one=one: t.fill_(one))
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
        local = self._local_inv_freq()
        self.inv_freq_local = None if local is None else local.to(device)

    def _local_inv_freq(self) -> torch.Tensor | None:
        """fp32 (D/2,) frequencies of the sliding layers' unscaled RoPE with base
        `model.rope_local_theta` (transformers' Gemma 3 `rope_parameters["sliding_attention"]`),
        or None when every layer shares `inv_freq` (rope_local_theta 0, or no sliding layer)."""
        if not self.cfg.rope_local_theta or not any(self.windows):
            return None
        return rope_inv_freq(self.head_dim, self.cfg.rope_local_theta)


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
