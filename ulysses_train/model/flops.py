"""Model FLOPs of a training step (MFU's numerator, the planner's compute time).

Weights: 6 FLOPs per matmul weight per token (Kaplan et al. 2020, sec. 2.1). Attention: 12 *
Hq * D FLOPs per visible (query, key) pair (q k^T and p v, 2 * Hq * D each forward, x3 with
backward; D = `model.head_dim`, so Hq * D is d_model only when head_dim is d_model / Hq, which
Qwen3 and Gemma 3 do not have), counted per layer over the pairs that layer's mask leaves
visible: causal x document (`data.document_mask`) x window (`model.sliding_window` on the
`sliding_attention` layers, `config/architecture.py layer_windows`). The kernels skip the rest
(FlexAttention's block mask, flash-attn's varlen and `window_size`), so counting them would
overstate MFU.

The unit of the attention count is the *span count* c = 2 * pairs - tokens, summed over the
spans (a document, or the whole row without documents): for full causal attention over a span
of n tokens it is exactly n^2, the S^2 per row MFU has always counted (the causal triangle's
n^2 / 2 pairs), so all-full models keep their MFU; see `span_count` for a window.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..config.architecture import head_dim, layer_windows
from ..config.parallel import padded_vocab
from ..config.schema import ModelConfig

Spans = int | Mapping[int, int]  # one count (every layer full), or window (0 = full) -> count


def span_count(length: int, window: int = 0) -> int:
    """The span count 2 * pairs - length of one causal span of `length` tokens in which a query
    sees at most `window` keys (0 = no window): attention_flops' unit.

    Derivation: the query at 1-based position i sees the keys i - W < j <= i of its span, i.e.
    min(i, W) of them (transformers' sliding_window_causal). Summing over the span,
        pairs = sum_{i=1..L} min(i, W) = L (L + 1) / 2                  for L <= W (or no window),
              = W (W + 1) / 2 + (L - W) W = W L - W (W - 1) / 2         for L >= W,
    so c = sum_i (2 min(i, W) - 1) = L^2 without a window (the sum of the first L odd numbers)
    and c = 2 W L - W (W - 1) - L once the span is longer than the window: linear in L, ~2 W L.
    The per-token summand 2 min(i, W) - 1 is what `train.metrics.span_sq_sum` adds on device.
    Raises ValueError for a negative length or window.
    """
    if length < 0 or window < 0:
        raise ValueError(f"span_count needs length >= 0 and window >= 0, got {length}, {window}")
    if window == 0 or length <= window:
        return length * length
    return 2 * window * length - window * (window - 1) - length


def row_spans(cfg: ModelConfig, seq_len: int, rows: int = 1) -> dict[int, int]:
    """`rows` rows of `seq_len` tokens, one span each (no documents, the planner's and
    `flops_per_token`'s case): window -> span count, for each distinct window of `cfg`."""
    return {w: rows * span_count(seq_len, w) for w in set(layer_windows(cfg))}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token of one causal sequence of `seq_len` tokens:
    `model_flops` of one row as one span: 6 N + 6 Hq D * sum over layers of span_count(S, W_l)
    / S (6 N + 6 n_layers Hq D S for an all-full model; Hq D = d_model when head_dim is 0)."""
    return model_flops(cfg, seq_len, row_spans(cfg, seq_len)) // seq_len


def model_flops(cfg: ModelConfig, n_tokens: int, spans: Spans) -> int:
    """Training FLOPs (forward + backward) of `n_tokens` tokens: 6 * N * n_tokens + attention.

    N counts every matmul weight a token passes through: all block weights, the final norm and
    the output head (d_model * Vpad, also when tied, since the head matmul still runs), but not
    the embedding lookup; 2 FLOPs per weight forward, 4 backward (Kaplan et al. 2020, sec. 2.1).
    Per layer, with D = head_dim(cfg) and d = d_model:
        d (Hq + 2 Hkv) D + Hq D d   wq, wk, wv (d -> Hq D, Hkv D, Hkv D) and wo (Hq D -> d)
        + 3 d ffn_hidden            the gated MLP's w1, w3, w2 (SwiGLU or GeGLU alike)
        + 2 d                       the two pre-norms' weights, as before
        + 2 D [qk_norm] + 2 d [sandwich_norm]   QK-norm's q and k weights, the post norms
    (norm weights are counted as weights, as the file always has: ~0.01 % of N).
    The attention term is `attention_flops(cfg, spans)`. Recompute is not counted.
    """
    d, hd = cfg.d_model, head_dim(cfg)
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d  # wq wk wv, wo
    norms = 2 * d + (2 * hd if cfg.qk_norm else 0) + (2 * d if cfg.sandwich_norm else 0)
    per_layer = attn + 3 * d * cfg.ffn_hidden + norms
    n = cfg.n_layers * per_layer + d + d * padded_vocab(cfg.vocab_size)  # + final norm + head
    return 6 * n * n_tokens + attention_flops(cfg, spans)


def attention_flops(cfg: ModelConfig, spans: Spans) -> int:
    """Training FLOPs of the attention kernels of every layer over the visible pairs.

    `spans`: for each window the model's layers use (0 = full; `layer_windows(cfg)`), the span
    count (`span_count`) summed over the spans of the tokens, e.g. the sum of squared document
    lengths for full layers (`train.metrics.span_sq_sum`). A bare int is the full layers' count
    and is accepted only when every layer is full (a sliding layer's count cannot be derived
    from it): ValueError otherwise, and when a layer's window is missing from the mapping.

    A span count c is 2 * pairs - tokens; a visible pair costs 12 * Hq * D FLOPs (q k^T and
    p v, 2 * Hq * D each forward, x3 with backward; D = head_dim(cfg), kv heads do not matter:
    every query head reads one), so a layer costs 6 * Hq * D * c (up to the diagonal's half pair
    per token, which keeps c = n^2 for a full span). For one span of S tokens and full layers
    that is 6 * L * Hq * D * S per token: PaLM's 12 * L * H * Q * T (Chowdhery et al. 2022,
    app. B; H * Q = Hq * D, d_model for Llama shapes) counts the full S x S square, we count the
    causal triangle once, as the kernels compute it; a window W < S gives ~12 * Hq * D * W per
    token and layer, independent of S.
    """
    windows = layer_windows(cfg)
    if not isinstance(spans, Mapping):
        if any(windows):
            raise ValueError("attention_flops: this model has sliding-window layers; pass the "
                             "span count per window ({window: count}), not one count")
        spans = {0: spans}
    missing = sorted(set(windows) - set(spans))
    if missing:
        raise ValueError(f"attention_flops: no span count for window(s) {missing}")
    return 6 * cfg.n_heads * head_dim(cfg) * sum(spans[w] for w in windows)
