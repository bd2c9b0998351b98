"""Attention kernels as separate forward and backward calls, for the head-group pipeline.

The pipelined Ulysses layer (parallel/ulysses_pipeline.py) owns its backward: it must post the
all-to-all of one head group's gradients while another group's attention backward runs, which
autograd's own ordering cannot promise. So it needs each kernel as two calls, `forward` that
returns the output and the tensors its backward needs, and `backward(dout, q, k, v, saved)`.
`group_kernel(local_attention, device, ...)` returns that pair for the kernel the model was
given; every kernel this project has is covered:

- `sdpa_attention` (CPU, any mask or window; CUDA without a mask or window): the fused SDPA ops
  that return their log-sum-exp (`ring_kernels.block_forward/backward`: CPU flash, CUDA
  memory-efficient), the backward from the saved output and LSE (FlashAttention-2's backward,
  Dao 2023). A document mask or window is a dense additive bias `(B, 1, S, S)`, as in
  `sdpa_attention` on CPU.
- a layer with a `split(q, causal=, mask=, window=)` method that returns its own pair: the
  ring (`RingAttention.split`, parallel/ring.py), whose ops' backward also starts from the saved
  output and LSE.
- anything else (FlexAttention on CUDA, flash-attn, the eager reference, a user's kernel):
  `Recompute`, which keeps the group's q/k/v and re-runs the kernel's forward in backward under
  autograd: exact for any kernel, at one extra attention forward per group.

Layout: q `(B, S, Hq_g, D)`, k/v `(B, S, Hkv_g, D)` as the model's kernels take them (GQA in the
repeat_interleave convention); outputs `(B, S, Hq_g, D)`, and dq/dk/dv like q/k/v, possibly
strided views (the pipeline copies them once, into its send buffers).
"""
from __future__ import annotations

import functools

import torch

from ..model.attention import sdpa_attention
from ..model.masking import DocumentMask, window_dense
from . import ring_kernels as kernels


class Recompute:
    """Any kernel `fn(q, k, v, **kw)`: forward without a graph, backward re-runs it with one.

    Saved per group: nothing beyond q/k/v (the caller keeps them). Cost: one more forward of the
    kernel per backward.
    """

    def __init__(self, fn, kwargs: dict):
        self.fn, self.kwargs = fn, kwargs

    def forward(self, q, k, v) -> tuple[torch.Tensor, tuple]:
        with torch.no_grad():
            return self.fn(q, k, v, **self.kwargs), ()

    def backward(self, dout, q, k, v, saved) -> tuple[torch.Tensor, ...]:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            again = self.fn(*leaves, **self.kwargs)
        return torch.autograd.grad(again, leaves, dout)


class DenseSDPA:
    """`sdpa_attention` split into the fused forward (with LSE) and its backward.

    `bias`: None (plain causal, or no mask when not causal) or an additive float `(B, 1, S, S)`
    (0 visible, -inf hidden) built once per call from the DocumentMask and/or window.
    """

    def __init__(self, causal: bool, bias: torch.Tensor | None):
        self.kind = kernels.MASKED if bias is not None else kernels.CAUSAL if causal else kernels.FULL
        self.bias = bias

    def forward(self, q, k, v) -> tuple[torch.Tensor, tuple]:
        # (B, S, H, D) -> (B, H, S, D) views, the ops' layout
        out, lse = kernels.block_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         self.kind, self.bias)[:2]
        # out stays (B, Hq, S, D) for the backward; the caller gets a (B, S, Hq, D) view (it
        # copies it once, into its send buffer)
        return out.transpose(1, 2), (out, lse)

    def backward(self, dout, q, k, v, saved) -> tuple[torch.Tensor, ...]:
        out_t, lse = saved
        grads = kernels.block_backward(dout.transpose(1, 2).contiguous(), q.transpose(1, 2),
                                       k.transpose(1, 2), v.transpose(1, 2), out_t, lse,
                                       self.kind, self.bias)
        return tuple(g.transpose(1, 2) for g in grads)  # (B, H, S, D) -> (B, S, H, D) views


def _dense_bias(q: torch.Tensor, mask: DocumentMask | None, window: int) -> torch.Tensor | None:
    """Additive `(B, 1, S, S)` bias in q's dtype (0 visible, -inf hidden), or None (plain causal)."""
    if mask is not None:
        visible = mask.dense(window)  # (B, 1, S, S) bool, cached on the mask
    elif window:
        visible = window_dense(q.shape[1], window, q.device)  # (S, S), cached per (S, W, device)
    else:
        return None
    return _bias_of(visible, q.dtype).expand(q.shape[0], 1, q.shape[1], q.shape[1])


@functools.lru_cache(maxsize=8)
def _bias_of(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One float bias per visibility matrix (every layer and group of a step shares it; the
    last few micro-batches' are kept)."""
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf"))


def group_kernel(local_attention, q: torch.Tensor, *, causal: bool = True,
                 mask: DocumentMask | None = None, window: int = 0):
    """The forward/backward pair for `local_attention` called with these keyword arguments.

    `q` is any group's query `(B, S, Hq_g, D)` (for its device, dtype and length). A pair has
    `forward(q, k, v) -> (out, saved)` and `backward(dout, q, k, v, saved) -> (dq, dk, dv)`.
    Raises what the kernel would raise for a mask or window it cannot take (checked here,
    before any group is sent).
    """
    split = getattr(local_attention, "split", None)
    if split is not None:  # a layer that brings its own pair (RingAttention.split)
        return split(q, causal=causal, mask=mask, window=window)
    dense_ok = q.device.type == "cpu" or (mask is None and not window)
    if local_attention is sdpa_attention and dense_ok:
        if mask is not None:
            if not causal:
                raise ValueError("a DocumentMask is causal within each document: pass causal=True")
            mask.check(q)
        if window and not causal:
            raise ValueError("a sliding window is causal (i - W < j <= i): pass causal=True")
        return DenseSDPA(causal, _dense_bias(q, mask, window))
    kwargs = {"causal": causal}
    if mask is not None:
        kwargs["mask"] = mask
    if window:
        kwargs["window"] = window
    return Recompute(local_attention, kwargs)
