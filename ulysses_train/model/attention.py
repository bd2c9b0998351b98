"""Local (single-device) attention kernels.

Every kernel has the signature `fn(q, k, v, *, causal=True, mask=None) -> out` with
    q   (B, S, Hq, D)
    k,v (B, S, Hkv, D),  Hq % Hkv == 0
    out (B, S, Hq, D), contiguous, in q's dtype
    mask  None (plain causal) or a `DocumentMask` (masking.py) of the same (B, S): causal
          within each document. It requires causal=True.

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

from .masking import DocumentMask


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


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   causal: bool = True, mask: DocumentMask | None = None) -> torch.Tensor:
    """Attention through `torch.nn.functional.scaled_dot_product_attention` (the default).

    GQA goes through SDPA's `enable_gqa`, which avoids materialising Hq/Hkv copies of k and v
    (at 128k tokens those copies would cost more memory than q itself).

    With a DocumentMask, SDPA gets its dense boolean `(B, 1, S, S)` matrix: B * S^2 bytes of
    mask, and only the kernels that take an arbitrary mask (no FlashAttention). That is the CPU
    fallback and a reference; on CUDA `flex_attention_kernel` skips masked blocks instead.
    """
    hq, hkv = _check_shapes(q, k, v)
    # SDPA wants heads before sequence: (B, S, H, D) -> (B, H, S, D). The transposes are views;
    # SDPA accepts strided inputs as long as the last dim is contiguous, which it is.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=hq != hkv)
    else:
        _check_mask(mask, q, causal)
        # Every query sees at least itself, so no softmax row is all -inf (no NaN).
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.dense(),
                                             enable_gqa=hq != hkv)
    # (B, Hq, S, D) -> (B, S, Hq, D); contiguous because the next op is a view to (B, S, Hq*D)
    # and, under Ulysses, an all-to-all (which silently misreads non-contiguous tensors).
    return out.transpose(1, 2).contiguous()


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    causal: bool = True, mask: DocumentMask | None = None) -> torch.Tensor:
    """Explicit reference: softmax(q k^T / sqrt(D) + causal mask) v, computed in fp32.

    With a DocumentMask the causal mask is its dense within-document one.

    Materialises the (B, Hq, S, S) score matrix: for tests and debugging, never long sequences.
    """
    hq, hkv = _check_shapes(q, k, v)
    seq, head_dim = q.shape[1], q.shape[3]
    qf = q.float().transpose(1, 2)  # (B, S, Hq, D) -> (B, Hq, S, D)
    # Expand kv to one copy per query head (the GQA mapping h -> h // (Hq/Hkv)).
    kf = k.float().repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hq, S, D)
    vf = v.float().repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hq, S, D)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(head_dim)  # (B, Hq, S, S)
    if mask is not None:
        _check_mask(mask, q, causal)
        scores = scores.masked_fill(~mask.dense(), float("-inf"))  # (B, 1, S, S) over all heads
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
                          causal: bool = True, mask: DocumentMask | None = None) -> torch.Tensor:
    """Document-masked attention through FlexAttention and the mask's BlockMask.

    On CUDA it runs compiled (fused, skips fully masked 128 x 128 blocks, so the cost is the sum
    of the documents' causal triangles); elsewhere eager, which materializes the scores and, on
    CPU, has no backward (torch refuses): CPU training uses `sdpa_attention` instead. Without a
    mask it is exactly `sdpa_attention`. GQA through flex's `enable_gqa` (the same
    repeat_interleave mapping, no kv copies).
    """
    if mask is None:
        return sdpa_attention(q, k, v, causal=causal)
    hq, hkv = _check_shapes(q, k, v)
    _check_mask(mask, q, causal)
    if q.device.type == "cuda":
        flex = _compiled_flex_attention()
    else:
        from torch.nn.attention.flex_attention import flex_attention as flex
    # (B, S, H, D) -> (B, H, S, D) views, as for SDPA.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = flex(qt, kt, vt, block_mask=mask.block_mask(), enable_gqa=hq != hkv)
    return out.transpose(1, 2).contiguous()  # (B, Hq, S, D) -> (B, S, Hq, D)


def flash_attn_available() -> bool:
    """Whether flash-attn is installed (looked up without importing it: the import is slow)."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           causal: bool = True, mask: DocumentMask | None = None) -> torch.Tensor:
    """Document-masked attention through flash-attn's `flash_attn_varlen_func`. UNTESTED.

    flash-attn is installed on no machine this was developed on: only the cu_seqlens and
    reshape plumbing is tested (against a stand-in varlen function); the real kernel has never
    run here. Rows are flattened to one `(B*S)` stream cut at every document and row start, so
    each document is its own causal sequence and no masked block is ever computed. flash-attn
    runs only fp16/bf16 on CUDA: other inputs go to `flex_attention_kernel`. Without a mask it
    is exactly `sdpa_attention`.
    """
    if mask is None:
        return sdpa_attention(q, k, v, causal=causal)
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return flex_attention_kernel(q, k, v, causal=causal, mask=mask)
    from flash_attn import flash_attn_varlen_func  # lazily: never at package import

    return _varlen_attention(q, k, v, mask, causal, flash_attn_varlen_func)


def _varlen_attention(q, k, v, mask: DocumentMask, causal: bool, varlen_fn) -> torch.Tensor:
    """Call a flash-attn style `varlen_fn` on the flattened rows; see flash_varlen_attention."""
    _check_shapes(q, k, v)
    _check_mask(mask, q, causal)
    bsz, seq, _, head_dim = q.shape
    cu_seqlens, max_seqlen = mask.varlen()
    # (B, S, H, D) -> (B*S, H, D): the token stream the cu_seqlens index. GQA is native
    # (query head h reads kv head h // (Hq/Hkv), our convention).
    qf, kf, vf = (t.reshape(bsz * seq, -1, head_dim) for t in (q, k, v))
    out = varlen_fn(qf, kf, vf, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    return out.reshape(bsz, seq, -1, head_dim)  # (B*S, Hq, D) -> (B, S, Hq, D)


def select_attention(device: torch.device | str, document_mask: bool):
    """The local kernel for `device` and `data.document_mask` (wrap it in UlyssesAttention for sp).

    - no document mask: `sdpa_attention` (FlashAttention-backed causal SDPA on CUDA);
    - CUDA + mask: `flex_attention_kernel` (compiled FlexAttention, checked on an H200).
      `flash_varlen_attention` is not chosen automatically while it has never run against the
      real flash-attn (see its docstring);
    - CPU + mask: `sdpa_attention` with the dense mask (S^2 memory; CPU runs are short).
    Every choice takes `mask=None` too, so validation without a mask still works.
    """
    if not document_mask:
        return sdpa_attention
    if torch.device(device).type == "cuda":
        return flex_attention_kernel
    return sdpa_attention


def document_mask_for(document_ids: torch.Tensor, attention_fn) -> DocumentMask:
    """A micro-batch's DocumentMask with what `attention_fn` reads already built.

    `document_ids`: the global `(B, S)` ids of the micro-batch's rows, on the compute device.
    Building eagerly here keeps the one-off work (the BlockMask, the cu_seqlens host sync) out
    of the forward, where a compiled block would otherwise have to trace it.
    A UlyssesAttention wrapper is looked through to its local kernel.
    """
    mask = DocumentMask(document_ids)
    kernel = getattr(attention_fn, "local_attention", attention_fn)
    if kernel is flex_attention_kernel:
        mask.block_mask()
    elif kernel is flash_varlen_attention:
        mask.varlen()
    elif kernel in (sdpa_attention, eager_attention):
        mask.dense()
    return mask
