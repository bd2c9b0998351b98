"""Local (single-device) attention kernels.

Every kernel has the signature `fn(q, k, v, *, causal=True, mask=None, window=0) -> out` with
    q   (B, S, Hq, D)
    k,v (B, S, Hkv, D),  Hq % Hkv == 0
    out (B, S, Hq, D), contiguous, in q's dtype
    mask  None (plain causal) or a `DocumentMask` (masking.py) of the same (B, S): causal
          within each document. It requires causal=True.
    window  0 (none) or W > 0 tokens: query i sees key j only when i - W < j (transformers'
          sliding window; i, j index the whole row, so under Ulysses the global sequence).
          Intersected with causal and the document mask; requires causal=True. The model
          passes `window=` only to sliding-window layers, so a kernel that cannot apply one
          fails with a TypeError instead of silently attending to the whole past.

Why (B, S, H, D) and not SDPA's (B, H, S, D): it is the layout the projections produce and the
layout the Ulysses all-to-all splits (sequence on dim 1, heads on dim 2), so a
`UlyssesAttention(local_attention, group)` wrapper can call any of these kernels on its
gathered `(B, S, H/P, D)` tensors without knowing which one it holds.

GQA convention: query head h reads kv head h // (Hq // Hkv), i.e. consecutive query heads share
a kv head (the `repeat_interleave` layout of Llama / HF `repeat_kv` and SDPA's `enable_gqa`).
A Ulysses wrapper that replicates kv heads must preserve this mapping per rank.

The kernels are stateless functions: the model stores whichever one it is given and never
looks inside it. `select_attention` picks one for a device and a data configuration.
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

from .masking import DocumentMask, window_block_mask, window_dense


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q (B, S, Hq, D) and k, v (B, S, Hkv, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"query heads {hq} is not a multiple of kv heads {hkv}")
    return hq, hkv


def _check_mask(mask: DocumentMask, q: torch.Tensor, causal: bool) -> None:
    if not isinstance(mask, DocumentMask):
        raise TypeError(f"mask must be a DocumentMask, got {type(mask).__name__}")
    if not causal:  # a document mask is causal by definition; a silent mix would be a bug
        raise ValueError("a DocumentMask is causal within each document: pass causal=True")
    mask.check(q)


def _check_window(window: int, causal: bool) -> None:
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 tokens (0 = none), got {window!r}")
    if window and not causal:  # a sliding window here is the causal one: refuse a silent mix
        raise ValueError("a sliding window is causal (i - W < j <= i): pass causal=True")


def _visible(q: torch.Tensor, causal: bool, mask: DocumentMask | None,
             window: int) -> torch.Tensor | None:
    """The dense bool mask (True = visible) of SDPA and the eager reference, broadcastable to
    (B, H, S, S); None for plain causal or no mask (the kernels' own `is_causal`)."""
    _check_window(window, causal)
    if mask is not None:
        _check_mask(mask, q, causal)
        return mask.dense(window)  # (B, 1, S, S)
    if window:
        return window_dense(q.shape[1], window, q.device)  # (S, S), cached per (S, W, device)
    return None


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   causal: bool = True, mask: DocumentMask | None = None,
                   window: int = 0) -> torch.Tensor:
    """Attention through `torch.nn.functional.scaled_dot_product_attention` (the default).

    GQA goes through SDPA's `enable_gqa`, which avoids materialising Hq/Hkv copies of k and v
    (at 128k tokens those copies would cost more memory than q itself).

    With a DocumentMask or a sliding window, SDPA gets a dense boolean `(B, 1, S, S)` (or
    `(S, S)`) matrix: B * S^2 bytes of mask, and only the kernels that take an arbitrary mask
    (no FlashAttention). That is the CPU fallback and a reference; on CUDA
    `flex_attention_kernel` skips masked blocks instead.
    """
    hq, hkv = _check_shapes(q, k, v)
    # SDPA wants heads before sequence: (B, S, H, D) -> (B, H, S, D). The transposes are views;
    # SDPA accepts strided inputs as long as the last dim is contiguous, which it is.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    visible = _visible(q, causal, mask, window)
    if visible is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=hq != hkv)
    else:
        # Every query sees at least itself, so no softmax row is all -inf (no NaN).
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, enable_gqa=hq != hkv)
    # (B, Hq, S, D) -> (B, S, Hq, D); contiguous because the next op is a view to (B, S, Hq*D)
    # and, under Ulysses, an all-to-all (which silently misreads non-contiguous tensors).
    return out.transpose(1, 2).contiguous()


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    causal: bool = True, mask: DocumentMask | None = None,
                    window: int = 0) -> torch.Tensor:
    """Explicit reference: softmax(q k^T / sqrt(D) + causal mask) v, computed in fp32.

    With a DocumentMask and/or a window the causal mask is their dense intersection.

    Materialises the (B, Hq, S, S) score matrix: for tests and debugging, never long sequences.
    """
    hq, hkv = _check_shapes(q, k, v)
    seq, head_dim = q.shape[1], q.shape[3]
    qf = q.float().transpose(1, 2)  # (B, S, Hq, D) -> (B, Hq, S, D)
    # Expand kv to one copy per query head (the GQA mapping h -> h // (Hq/Hkv)).
    kf = k.float().repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hq, S, D)
    vf = v.float().repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hq, S, D)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(head_dim)  # (B, Hq, S, S)
    visible = _visible(q, causal, mask, window)
    if visible is not None:  # (B, 1, S, S) or (S, S), over all heads
        scores = scores.masked_fill(~visible, float("-inf"))
    elif causal:
        future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)  # (S, S): key > query
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # fp32 softmax
    out = probs @ vf  # (B, Hq, S, S) @ (B, Hq, S, D) -> (B, Hq, S, D)
    return out.transpose(1, 2).contiguous().to(q.dtype)  # (B, Hq, S, D) -> (B, S, Hq, D)


@functools.cache
def _compiled_flex_attention():
    """flex_attention through torch.compile, built once per process.

    Eager flex_attention materializes the whole score matrix; only the compiled one generates
    the fused kernel that skips masked blocks. dynamic=False: S and the head counts are fixed
    for a run, and static shapes give the best kernel.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          causal: bool = True, mask: DocumentMask | None = None,
                          window: int = 0) -> torch.Tensor:
    """Document-masked and/or sliding-window attention through FlexAttention and a BlockMask.

    On CUDA it runs compiled (fused, skips fully masked 128 x 128 blocks, so the cost is the sum
    of the documents' causal triangles, or ~S x W for a window); elsewhere eager, which
    materializes the scores and, on CPU, has no backward (torch refuses): CPU training uses
    `sdpa_attention` instead. Without mask and window it is exactly `sdpa_attention`. GQA
    through flex's `enable_gqa` (the same repeat_interleave mapping, no kv copies).
    """
    _check_window(window, causal)
    if mask is None and not window:
        return sdpa_attention(q, k, v, causal=causal)
    hq, hkv = _check_shapes(q, k, v)
    if mask is not None:
        _check_mask(mask, q, causal)
        block_mask = mask.block_mask(window)
    else:
        block_mask = window_block_mask(q.shape[1], window, q.device)
    if q.device.type == "cuda":
        flex = _compiled_flex_attention()
    else:
        from torch.nn.attention.flex_attention import flex_attention as flex
    # (B, S, H, D) -> (B, H, S, D) views, as for SDPA.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = flex(qt, kt, vt, block_mask=block_mask, enable_gqa=hq != hkv)
    return out.transpose(1, 2).contiguous()  # (B, Hq, S, D) -> (B, S, Hq, D)


def flash_attn_available() -> bool:
    """Whether flash-attn is installed (looked up without importing it: the import is slow)."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           causal: bool = True, mask: DocumentMask | None = None,
                           window: int = 0) -> torch.Tensor:
    """Document-masked / sliding-window attention through flash-attn. UNTESTED.

    flash-attn is installed on no machine this was developed on: only the cu_seqlens,
    `window_size` and reshape plumbing is tested (against stand-in functions); the real kernel
    has never run here. With a mask, rows are flattened to one `(B*S)` stream cut at every
    document and row start (`flash_attn_varlen_func`), so each document is its own causal
    sequence and no masked block is ever computed. A window W goes to flash-attn as
    `window_size=(W - 1, 0)`: W - 1 keys to the left plus the query itself, i.e. i - W < j <= i
    (flash-attn's window is relative to the query's index within its varlen sequence, which
    differs from the global one by the document start on both sides). Without a mask and a
    window: `flash_attn_func(causal=True, window_size=...)`. flash-attn runs only fp16/bf16 on
    CUDA: other inputs go to `flex_attention_kernel`. Neither mask nor window: `sdpa_attention`.
    """
    _check_window(window, causal)
    if mask is None and not window:
        return sdpa_attention(q, k, v, causal=causal)
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return flex_attention_kernel(q, k, v, causal=causal, mask=mask, window=window)
    import flash_attn  # lazily: never at package import

    if mask is None:
        return _dense_flash(q, k, v, window, flash_attn.flash_attn_func)
    return _varlen_attention(q, k, v, mask, causal, flash_attn.flash_attn_varlen_func, window)


def _flash_window(window: int) -> tuple[int, int]:
    """flash-attn's `window_size` (left, right) for our window W (0 = none: (-1, -1))."""
    return (window - 1, 0) if window else (-1, -1)


def _dense_flash(q, k, v, window: int, flash_fn) -> torch.Tensor:
    """`flash_fn` (flash_attn_func) on (B, S, H, D) q/k/v, causal with `window`."""
    _check_shapes(q, k, v)
    return flash_fn(q, k, v, causal=True, window_size=_flash_window(window))  # (B, S, Hq, D)


def _varlen_attention(q, k, v, mask: DocumentMask, causal: bool, varlen_fn,
                      window: int = 0) -> torch.Tensor:
    """Call a flash-attn style `varlen_fn` on the flattened rows; see flash_varlen_attention."""
    _check_shapes(q, k, v)
    _check_mask(mask, q, causal)
    bsz, seq, _, head_dim = q.shape
    cu_seqlens, max_seqlen = mask.varlen()
    # (B, S, H, D) -> (B*S, H, D): the token stream the cu_seqlens index. GQA is native
    # (query head h reads kv head h // (Hq/Hkv), our convention).
    qf, kf, vf = (t.reshape(bsz * seq, -1, head_dim) for t in (q, k, v))
    kwargs = {"window_size": _flash_window(window)} if window else {}
    out = varlen_fn(qf, kf, vf, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                    **kwargs)
    return out.reshape(bsz, seq, -1, head_dim)  # (B*S, Hq, D) -> (B, S, Hq, D)


def select_attention(device: torch.device | str, document_mask: bool, sliding: bool = False):
    """The local kernel for `device`, `data.document_mask` and whether any layer has a sliding
    window (wrap it in UlyssesAttention for sp).

    - no document mask, no window: `sdpa_attention` (FlashAttention-backed causal SDPA on CUDA);
    - CUDA + mask or window: `flex_attention_kernel` (compiled FlexAttention, block-sparse; its
      full-attention layers without a mask still go to causal SDPA).
      `flash_varlen_attention` is not chosen automatically while it has never run against the
      real flash-attn (see its docstring);
    - CPU + mask or window: `sdpa_attention` with the dense mask (S^2 memory; CPU runs are short).
    Every choice takes `mask=None` and `window=0` too, so validation without a mask still works.
    """
    if not (document_mask or sliding):
        return sdpa_attention
    if torch.device(device).type == "cuda":
        return flex_attention_kernel
    return sdpa_attention


def document_mask_for(document_ids: torch.Tensor, attention_fn,
                      windows: tuple[int, ...] = (0,),
                      host_ids: torch.Tensor | None = None) -> DocumentMask:
    """A micro-batch's DocumentMask with what `attention_fn` reads already built.

    `document_ids`: the global `(B, S)` ids of the micro-batch's rows, on the compute device;
    `host_ids`: their CPU copy if the caller has one (`DocumentMask`: no device sync then).
    `windows`: the distinct windows of the model's layers (0 = full attention): one form is
    built per window. Building eagerly here keeps the one-off work (the BlockMask, the
    cu_seqlens host sync) out of the forward, where a compiled block would otherwise have to
    trace it. A UlyssesAttention wrapper is looked through to its local kernel.
    """
    mask = DocumentMask(document_ids, host_ids)
    kernel = getattr(attention_fn, "local_attention", attention_fn)
    for window in windows:
        if kernel is flex_attention_kernel:
            mask.block_mask(window)
        elif kernel is flash_varlen_attention:
            mask.varlen()
        elif kernel in (sdpa_attention, eager_attention):
            mask.dense(window)
    return mask
