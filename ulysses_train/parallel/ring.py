"""Ring attention and the hybrid Ulysses x ring attention layer.

Sources: Ring Attention (Liu, Zaharia & Abbeel, 2023) passes K/V blocks around a ring of ranks
and merges blockwise results by their log-sum-exp; DeepSpeed-Ulysses (Jacobs et al., 2023)
trades the sequence for heads with all-to-alls; USP (Fang & Zhao, 2024) composes the two: an
all-to-all inside each Ulysses group, then a ring across groups. The zig-zag chunk order that
balances causal work is Megatron-LM's context parallelism (see parallel/layout.py).

Groups: the sequence-parallel group of P ranks is R ring ranks x U = P/R Ulysses ranks,
sp-group rank = ring_rank * U + ulysses_rank (layout.py). `ulysses_group` holds the U ranks of
one ring rank, in ulysses-rank order; `ring_group` holds the R ranks with the same Ulysses
rank, in ring-rank order.

What travels: forward, the packed K/V block (2, B, S'/R, Hkv, D) moves R-1 times around the
ring, the transfer for step t+1 posted (isend/irecv) before step t's kernels and waited after
them. Backward, K/V travel again the same way, and each block's dK/dV (fp32) travel with it,
accumulating every rank's contribution, and make one more hop home to the block's owner.

Sliding-window layers (`window=W`) take parallel/ring_window.py's halo exchange instead: only
the K/V slices the window reaches travel (its own ops, `ring_window_attention`).

Autograd: the ring forward is one custom op, `torch.ops.ulysses_train.ring_attention`,
returning (out, LSE); its registered backward is a second op that uses the saved output and
LSE (the ring forward is never recomputed). Being ops, they are what selective activation
checkpointing can name (parallel/activations.py keeps the forward op's outputs, so recompute
does not re-run the ring) and what torch.compile keeps as graph nodes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from ..model.attention import sdpa_attention
from ..model.masking import DocumentMask
from . import ring_kernels as kernels
from .comm import group_size, head_to_seq, seq_to_head_qkv
from .layout import SequenceLayout
from .ring_window import ring_window_attention_backward_op, ring_window_attention_op
from .ulysses import UlyssesAttention, check_ulysses_shapes

KV_TAG, GRAD_TAG = 0, 1  # two transfers may be in flight between the same peers in backward


class Transfer:
    """One posted ring hop: `send` goes to the next ring rank while a buffer of the same shape
    is filled from the previous one. `wait()` returns the received tensor."""

    def __init__(self, send: torch.Tensor, group: ProcessGroup, tag: int):
        rank, size = group.rank(), group.size()
        self.recv = torch.empty_like(send)
        nxt = dist.get_global_rank(group, (rank + 1) % size)
        prev = dist.get_global_rank(group, (rank - 1) % size)
        self.works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt, group, tag),
                                             dist.P2POp(dist.irecv, self.recv, prev, group, tag)])
        self.send = send  # keep the source alive until the send completes

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        self.send = None
        return self.recv


def _bias(document_ids, blk, c, dtype):
    if blk.kind != kernels.MASKED:
        return None, None
    return kernels.document_bias(document_ids, blk, c, dtype)


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None,
                 causal: bool, group: ProcessGroup, host_ids: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring forward: q (B, L, Hq, D), k/v (B, L, Hkv, D) -> out (B, L, Hq, D), LSE (B, Hq, L) fp32.

    L = S'/R tokens in the zig-zag order; `document_ids` the global (B, S') ids or None, and
    `host_ids` the same on the CPU (`DocumentMask.host_ids`: the plan is decided on the host;
    None: copied here, a device sync).
    """
    ring, rank = group.size(), group.rank()
    plans = kernels.step_plans(rank, ring, q.shape[1], causal,
                               kernels.host_copy(document_ids, host_ids))
    c = q.shape[1] // len(kernels.rank_chunks(rank, ring))
    qt = q.transpose(1, 2)  # (B, L, Hq, D) -> (B, Hq, L, D), a view
    kv = torch.stack((k, v))  # (2, B, L, Hkv, D): one contiguous buffer to send
    out = torch.zeros(qt.shape, dtype=torch.float32, device=q.device)  # (B, Hq, L, D)
    lse = torch.full(qt.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)  # (B, Hq, L)
    for t in range(ring):
        transfer = Transfer(kv, group, KV_TAG) if t + 1 < ring else None  # next block, in flight
        kt, vt = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # (B, L, Hkv, D) -> (B, Hkv, L, D)
        for blk in plans[t]:
            bias, empty = _bias(document_ids, blk, c, q.dtype)
            o, s = kernels.block_forward(qt[:, :, blk.q_rows], kt[:, :, blk.k_rows],
                                         vt[:, :, blk.k_rows], blk.kind, bias)
            if empty is not None:  # rows seeing no key here: LSE -inf, not the op's 0
                s = s.masked_fill(empty.unsqueeze(1), float("-inf"))  # (B, c) -> (B, 1, c)
            out[:, :, blk.q_rows], lse[:, :, blk.q_rows] = kernels.merge(
                out[:, :, blk.q_rows], lse[:, :, blk.q_rows], o, s)
        if transfer is not None:
            kv = transfer.wait()  # after this step's kernels: the transfer overlapped them
    return out.to(q.dtype).transpose(1, 2).contiguous(), lse  # (B, Hq, L, D) -> (B, L, Hq, D)


@torch.library.custom_op("ulysses_train::ring_attention", mutates_args=())
def ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      document_ids: torch.Tensor | None, host_ids: torch.Tensor | None,
                      causal: bool, group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`ring_forward` as an op (the group by name: ops take no ProcessGroup objects)."""
    return ring_forward(q, k, v, document_ids, causal, kernels.group_by_name(group_name), host_ids)


@ring_attention_op.register_fake
def _(q, k, v, document_ids, host_ids, causal, group_name):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


def ring_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, document_ids: torch.Tensor | None,
                  causal: bool, group: ProcessGroup, host_ids: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring backward from the saved out and LSE: dq like q, and dk/dv stacked (2, B, L, Hkv, D)
    in fp32 (one buffer, so one return; split outside the op, which may not return aliases)."""
    ring, rank = group.size(), group.rank()
    plans = kernels.step_plans(rank, ring, q.shape[1], causal,
                               kernels.host_copy(document_ids, host_ids))
    c = q.shape[1] // len(kernels.rank_chunks(rank, ring))
    # (B, L, H, D) -> (B, H, L, D) views
    qt, dot, ot = q.transpose(1, 2), grad_out.to(q.dtype).transpose(1, 2), out.transpose(1, 2)
    kv = torch.stack((k, v))  # (2, B, L, Hkv, D)
    dq = torch.zeros(qt.shape, dtype=torch.float32, device=q.device)  # (B, Hq, L, D)
    grad_transfer = None
    for t in range(ring):
        transfer = Transfer(kv, group, KV_TAG) if t + 1 < ring else None
        kt, vt = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # (B, Hkv, L, D) views
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # this block's (2, B, L, Hkv, D)
        dkt, dvt = dkv[0].transpose(1, 2), dkv[1].transpose(1, 2)  # (B, Hkv, L, D) views
        for blk in plans[t]:
            bias, _ = _bias(document_ids, blk, c, q.dtype)
            r, s = blk.q_rows, blk.k_rows
            g = kernels.block_backward(dot[:, :, r], qt[:, :, r], kt[:, :, s], vt[:, :, s],
                                       ot[:, :, r], lse[:, :, r], blk.kind, bias)
            dq[:, :, r] += g[0]
            dkt[:, :, s] += g[1]
            dvt[:, :, s] += g[2]
        if grad_transfer is not None:  # the previous ranks' share of this block's dK/dV
            dkv += grad_transfer.wait()
        if ring > 1:  # on to the next rank; after the last step this is the hop home
            grad_transfer = Transfer(dkv, group, GRAD_TAG)
        if transfer is not None:
            kv = transfer.wait()
    dkv = grad_transfer.wait() if grad_transfer is not None else dkv  # my own block, complete
    return dq.transpose(1, 2).to(q.dtype).contiguous(), dkv


@torch.library.custom_op("ulysses_train::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                               document_ids: torch.Tensor | None, host_ids: torch.Tensor | None,
                               causal: bool, group_name: str
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`ring_backward` as an op."""
    return ring_backward(grad_out, q, k, v, out, lse, document_ids, causal,
                         kernels.group_by_name(group_name), host_ids)


@ring_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, document_ids, host_ids, causal, group_name):
    return torch.empty_like(q), k.new_empty((2, *k.shape), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, document_ids, host_ids, causal, group_name = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, document_ids, host_ids)
    ctx.causal, ctx.group_name = causal, group_name
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, document_ids, host_ids = ctx.saved_tensors
    dq, dkv = ring_attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, document_ids,
                                         host_ids, ctx.causal, ctx.group_name)
    return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_layout(name: str, group: ProcessGroup | None, expected: int, what: str) -> None:
    if group_size(group) != expected:
        raise ValueError(f"{name}: the {what} group has {group_size(group)} ranks but the layout "
                         f"expects {expected}; build the groups and the SequenceLayout from the same mesh")


class RingAttention(nn.Module):
    """Ring attention over `ring_group` on head-sharded q/k/v in the zig-zag layout.

    Args:
        ring_group: the R ranks of one ring, in ring-rank order (None: the default group).
        layout: the SequenceLayout of the row; `layout.ring` must equal R.

    Call `attn(q, k, v, causal=True, mask=None, window=0)` with q `(B, S'/R, Hq, D)` and k, v
    `(B, S'/R, Hkv, D)` (Hq % Hkv == 0, GQA in the repeat_interleave convention: query head h
    reads kv head h // (Hq/Hkv)) holding the tokens at `layout.ring_positions(ring_rank)`, in
    that order: chunks i and 2R-1-i of the padded row (one chunk, the whole row, when R = 1).
    `mask`: None, or a DocumentMask of the GLOBAL padded rows `(B, S')` (document ids in
    natural position order; padding with its own id). Returns `(B, S'/R, Hq, D)` for the same
    tokens, in q's dtype, contiguous. Only the output is differentiable; the LSE (B, Hq, S'/R)
    fp32, natural log, is an internal result kept for backward (`forward_with_lse`).

    Per ring step the K/V block of rank (i - t) mod R is here; fully masked sub-blocks are
    skipped (parallel/ring_kernels.py), the rest run a local kernel that returns its LSE, and
    results are merged in fp32. Sends per call: R-1 K/V hops forward; R-1 K/V hops and R dK/dV
    hops backward (none when R = 1). `window` W > 0 (a sliding-window layer, causal only):
    W < seq_len runs the halo exchange instead (parallel/ring_window.py: only the K/V slices
    the window reaches travel, at most 2 (W - 1) tokens per rank); W >= seq_len is this full
    ring. Raises ValueError on shapes, a mask or a window that do not match, before anything
    is sent. Source: Liu et al. 2023, "Ring Attention with Blockwise
    Transformers"; zig-zag balance as Megatron-LM context parallelism.
    """

    def __init__(self, ring_group: ProcessGroup | None, layout: SequenceLayout):
        super().__init__()
        if ring_group is None:
            ring_group = dist.group.WORLD
        _check_layout("RingAttention", ring_group, layout.ring, "ring")
        self.group, self.layout = ring_group, layout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                mask: DocumentMask | None = None, window: int = 0) -> torch.Tensor:
        return self.forward_with_lse(q, k, v, causal=causal, mask=mask, window=window)[0]

    def forward_with_lse(self, q, k, v, causal: bool = True, mask: DocumentMask | None = None,
                         window: int = 0):
        """`(out, lse)`: the call's output and its LSE (B, Hq, S'/R) fp32. A `window` W > 0
        shorter than the true sequence runs the halo exchange (parallel/ring_window.py); W >= S
        sees every real token's whole past, so it is the full causal ring."""
        self._check(q, k, v, causal, mask, window)
        ids, host = (None, None) if mask is None else (mask.document_ids, mask.host_ids)
        if window and window < self.layout.seq_len:
            return ring_window_attention_op(q, k, v, ids, host, window, self.group.group_name)
        return ring_attention_op(q, k, v, ids, host, causal, self.group.group_name)

    def split(self, q, causal: bool = True, mask: DocumentMask | None = None, window: int = 0):
        """This layer as a forward/backward pair for the head-group pipeline
        (parallel/group_kernels.py): its ops called directly, the backward from the saved output
        and LSE. `q` is any group's query (for the checks). Raises as `forward` would."""
        self._check(q, q[:, :, :1], q[:, :, :1], causal, mask, window)
        return _RingPair(self, causal, mask, window)

    def _check(self, q, k, v, causal, mask, window) -> None:
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"RingAttention: window must be an int >= 0 tokens (0 = none), got {window!r}")
        if window and not causal:
            raise ValueError("a sliding window is causal (i - W < j <= i): pass causal=True")
        local = self.layout.padded_len // self.layout.ring
        if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"RingAttention expects q (B, S'/R, Hq, D) and k, v (B, S'/R, Hkv, D); "
                             f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if q.shape[1] != local or q.shape[2] % k.shape[2]:
            raise ValueError(f"RingAttention: q {tuple(q.shape)} must hold S'/R = {local} tokens "
                             f"and a multiple of k's {k.shape[2]} heads")
        if mask is not None:
            if not causal:
                raise ValueError("a DocumentMask is causal within each document: pass causal=True")
            if mask.shape != (q.shape[0], self.layout.padded_len):
                raise ValueError(f"RingAttention: DocumentMask of shape {mask.shape} must describe "
                                 f"the global padded rows (B, S') = ({q.shape[0]}, {self.layout.padded_len})")

    def extra_repr(self) -> str:
        return f"ring={self.layout.ring}, padded_len={self.layout.padded_len}"


class _RingPair:
    """`RingAttention.split`'s pair: forward -> (out, (out, lse)); backward from them."""

    def __init__(self, ring: RingAttention, causal: bool, mask: DocumentMask | None, window: int):
        self.ring, self.causal, self.mask, self.window = ring, causal, mask, window
        self.ids = None if mask is None else mask.document_ids
        self.host_ids = None if mask is None else mask.host_ids
        self.halo = bool(window) and window < ring.layout.seq_len  # forward_with_lse's rule

    def forward(self, q, k, v):
        with torch.no_grad():
            out, lse = self.ring.forward_with_lse(q, k, v, causal=self.causal, mask=self.mask,
                                                  window=self.window)
        return out, (out, lse)

    def backward(self, dout, q, k, v, saved):
        out, lse = saved
        name = self.ring.group.group_name
        if self.halo:
            dq, dkv = ring_window_attention_backward_op(dout.contiguous(), q, k, v, out, lse,
                                                        self.ids, self.host_ids, self.window,
                                                        name)
        else:
            dq, dkv = ring_attention_backward_op(dout.contiguous(), q, k, v, out, lse, self.ids,
                                                 self.host_ids, self.causal, name)
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class UlyssesRingAttention(nn.Module):
    """Hybrid sequence-parallel attention (USP): Ulysses all-to-all, ring attention, inverse.

    Args:
        ulysses_group: the U ranks of this ring rank, in ulysses-rank order.
        ring_group: the R ranks sharing this Ulysses rank, in ring-rank order.
        layout: SequenceLayout(seq_len, sp=U*R, ring=R).
        local_attention: the kernel for a size-1 ring (then this layer is exactly
            `UlyssesAttention(local_attention, ulysses_group)`); default `sdpa_attention`.
        chunks: G > 1 exchanges and attends the heads in G pipelined groups
            (`PipelinedUlyssesAttention` around the ring, or the kernel); 1 = one exchange.

    Called like UlyssesAttention: `attn(q, k, v, causal=True, mask=None, window=0)` with q
    `(B, S'/P, Hq, D)`, k/v `(B, S'/P, Hkv, D)` holding this rank's `layout.rank_positions(r)`
    tokens (RoPE already applied at those global positions), `mask` a DocumentMask of the
    GLOBAL padded rows `(B, S')` or None. Returns `(B, S'/P, Hq, D)`.
    Steps: (B, S'/P, H, D) -> all-to-all over the Ulysses group -> (B, S'/R, H/U, D), which
    holds `layout.ring_positions(ring_rank)` -> RingAttention -> inverse all-to-all.
    Head rules as UlyssesAttention for U (kv heads replicated when Hkv < U); ValueError otherwise.
    Sources: Jacobs et al. 2023 (DeepSpeed-Ulysses), Liu et al. 2023 (Ring Attention), Fang &
    Zhao 2024 (USP: "A Unified Sequence Parallelism Approach for Long Context Generative AI").
    """

    def __init__(self, ulysses_group: ProcessGroup | None, ring_group: ProcessGroup | None,
                 layout: SequenceLayout, local_attention=sdpa_attention, chunks: int = 1):
        super().__init__()
        _check_layout("UlyssesRingAttention", ulysses_group, layout.ulysses, "Ulysses")
        _check_layout("UlyssesRingAttention", ring_group, layout.ring, "ring")
        self.ulysses_group, self.layout = ulysses_group, layout
        self.pipeline = None
        if layout.ring == 1:  # exactly today's layer: no ring, no LSE merge
            self.ulysses = UlyssesAttention(local_attention, ulysses_group)
            # what model.attention.document_mask_for looks for to prebuild the mask's form
            self.local_attention = local_attention
            kernel = local_attention
        else:
            self.ring = RingAttention(ring_group, layout)
            kernel = self.ring
        if chunks > 1 and layout.ulysses > 1:  # head groups around the kernel (or the ring)
            from .ulysses_pipeline import PipelinedUlyssesAttention

            self.pipeline = PipelinedUlyssesAttention(kernel, ulysses_group, chunks)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.pipeline is not None:
            return self.pipeline(q, k, v, **kwargs)
        if self.layout.ring == 1:
            return self.ulysses(q, k, v, **kwargs)
        u = self.layout.ulysses
        if u > 1:
            check_ulysses_shapes(q, k, v, u)
        # (B, S'/P, Hq, D), (B, S'/P, Hkv, D) x2 -> (B, S'/R, Hq/U, D), (B, S'/R, Hkv', D) x2
        q_h, k_h, v_h = seq_to_head_qkv(q, k, v, self.ulysses_group)
        out = self.ring(q_h, k_h, v_h, **kwargs)  # (B, S'/R, Hq/U, D)
        return head_to_seq(out, self.ulysses_group)  # -> (B, S'/P, Hq, D)

    def extra_repr(self) -> str:
        return f"ulysses={self.layout.ulysses}, ring={self.layout.ring}"
