"""Head-group pipelined Ulysses: the all-to-alls of one head group overlap another's attention.

`UlyssesAttention` (ulysses.py) exchanges all of a rank's heads at once, waits, computes, and
exchanges the output back: nothing overlaps and the full-sequence buffers of every local head
are alive together. Here the Hq/P local query heads (with their kv heads) are processed in G
groups, one after another (the head-chunked pipeline of "Untied Ulysses", arXiv 2602.21196;
DeepSpeed's `sp_stream` overlap is the same idea at the projection level). Forward, per group g:

    post a2a(q,k,v of g+1) | kernel(g) | wait a2a(g+1) ... post a2a(out g) | kernel(g+1) | wait a2a(out g)

i.e. the sequence->heads exchange of group g+1 is posted before group g's kernel and waited after
it, and group g's heads->sequence exchange runs while group g+1 computes. Backward mirrors it:
the exchange of group g+1's output gradient is in flight during group g's attention backward,
and group g's q/k/v gradients travel home during group g+1's. At most two groups' send/receive
buffers are alive at once, so the working set of these buffers falls by about G/2; the bytes
sent are those of `UlyssesAttention` exactly (each head travels once each way).

Head groups (`HeadGroups`): group g holds local query heads g*Hq/(PG) ... of every rank. Its kv
heads: when G divides the kv heads per rank Hkv', each group carries Hkv'/G of them (whole GQA
groups); when Hkv' divides G (e.g. one replicated kv head per rank, Hkv < P), all kv heads
travel with group 0 and stay for the groups that read them (each group reads one kv head), and
their gradients travel home, summed over groups in fp32, with the last group's. Any other G is
refused (`check_head_groups`).

The layer is one autograd Function that owns forward and backward (the order above cannot be
left to autograd's scheduler); the kernels are called through `group_kernels` as explicit
forward/backward pairs. Under selective activation checkpointing its collectives and fused
kernels are ops the policy keeps (parallel/activations.py): recomputation replays their
outputs (each group's received q/k/v, the kernel's output and LSE) and repeats only the
packing copies, never the communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from ..config.parallel import valid_ulysses_chunks
from .comm import group_size, kv_replication, post
from .group_kernels import group_kernel
from .ulysses import check_ulysses_shapes


@dataclass(frozen=True)
class HeadGroups:
    """How P ranks' heads split into `chunks` pipelined groups (see the module docstring).

    hq / hkv: query and kv heads at the layer's input (per tp rank); p: Ulysses ranks.
    """

    hq: int
    hkv: int
    p: int
    chunks: int

    @property
    def rep(self) -> int:  # copies of each kv head sent (P / Hkv when Hkv < P)
        return kv_replication(self.hkv, self.p)

    @property
    def hq_g(self) -> int:  # query heads per group per rank
        return self.hq // self.p // self.chunks

    @property
    def hkv_l(self) -> int:  # kv heads per rank after the exchange (1 when replicated)
        return max(self.hkv // self.p, 1)

    @property
    def resident(self) -> bool:  # kv travels once, with group 0
        return self.hkv_l % self.chunks != 0

    @property
    def hkv_g(self) -> int:  # kv heads each group carries (split mode)
        return 0 if self.resident else self.hkv_l // self.chunks

    def kv_heads(self, g: int) -> slice:
        """The local kv heads group g's queries read."""
        if self.resident:
            h = g * self.hkv_l // self.chunks
            return slice(h, h + 1)
        return slice(g * self.hkv_g, (g + 1) * self.hkv_g)


def check_head_groups(hq: int, hkv: int, p: int, chunks: int) -> HeadGroups:
    """HeadGroups for G = `chunks`, or ValueError naming the rule and the valid G."""
    valid = valid_ulysses_chunks(hq, hkv, p)
    if chunks not in valid:
        raise ValueError(f"{chunks!r} head groups: G must divide the {hq // p} query heads per "
                         f"Ulysses rank and divide or be a multiple of its {max(hkv // p, 1)} kv "
                         f"heads, so that every group reads whole kv heads; valid: {valid}")
    return HeadGroups(hq, hkv, p, chunks)


def _by_rank(t: torch.Tensor, hg: HeadGroups, heads: slice | None) -> torch.Tensor:
    """`(B, S/P, H, D)` -> the 6-D view `(P/rep, rep, B, S/P, h, D)`: chunk (i, j) is what rank
    i*rep + j receives, its rank-local heads `heads` (None: all); replicated kv is expanded."""
    bsz, s_local, h_all, dim = t.shape
    groups, rep = hg.p // hg.rep, hg.rep
    if h_all == hg.hq:  # query heads: rank i*rep + j holds block i*rep + j
        per = t.reshape(bsz, s_local, groups, rep, h_all // hg.p, dim)
    else:  # kv heads: one block per kv group, the same for its rep ranks (stride 0)
        per = t.reshape(bsz, s_local, groups, 1, h_all // groups, dim)
        per = per.expand(bsz, s_local, groups, rep, h_all // groups, dim)
    if heads is not None:
        per = per[..., heads, :]
    return per.permute(2, 3, 0, 1, 4, 5)  # (B, S/P, P/rep, rep, h, D) -> (P/rep, rep, B, S/P, h, D)


def _pack(parts: list[torch.Tensor], p: int) -> torch.Tensor:
    """6-D parts side by side on the head dim -> one contiguous send buffer `(P, B, S/P, W, D)`."""
    send = torch.cat(parts, dim=4)  # one copy, contiguous
    return send.view(p, *send.shape[2:])


def _to_seq_major(recv: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """Receive buffer `(P, B, S/P, W, D)` (dim 0 = source rank = token block) -> one
    `(B, S, w, D)` per width (views when B == 1)."""
    p, bsz, s_local, _, dim = recv.shape
    return [t.transpose(0, 1).reshape(bsz, p * s_local, t.shape[3], dim)
            for t in recv.split(widths, dim=3)]


def _to_rank_major(t: torch.Tensor, p: int) -> torch.Tensor:
    """`(B, S, h, D)` -> `(P, B, S/P, h, D)` view: token block j goes to rank j."""
    bsz, seq, h, dim = t.shape
    return t.reshape(bsz, p, seq // p, h, dim).transpose(0, 1)


def _send_qkv(q, k, v, hg: HeadGroups, g: int) -> torch.Tensor:
    qs = slice(g * hg.hq_g, (g + 1) * hg.hq_g)
    parts = [_by_rank(q, hg, qs)]
    if not hg.resident:
        kvs = slice(g * hg.hkv_g, (g + 1) * hg.hkv_g)
        parts += [_by_rank(k, hg, kvs), _by_rank(v, hg, kvs)]
    elif g == 0:
        parts += [_by_rank(k, hg, None), _by_rank(v, hg, None)]
    return _pack(parts, hg.p)


def _qkv_widths(hg: HeadGroups, g: int) -> list[int]:
    kv = hg.hkv_g if not hg.resident else hg.hkv_l if g == 0 else 0
    return [hg.hq_g] + ([kv, kv] if kv else [])


def _place(full: torch.Tensor, recv: torch.Tensor, hg: HeadGroups, g: int) -> None:
    """Write a group's heads->sequence receive `(P, B, S/P, h, D)` (dim 0 = source rank) into
    `full` viewed `(B, S/P, P, G, h, D)`."""
    full[:, :, :, g].copy_(recv.permute(1, 2, 0, 3, 4))  # (P, B, S/P, h, D) -> (B, S/P, P, h, D)


def _hooks_active() -> bool:
    """Whether saved-tensor hooks are installed (activation checkpointing, activation offload):
    then every tensor kept for backward must go through `save_for_backward`, where they see it.
    torch's own AOT autograd reads the same private query; without it, assume hooks."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class _Saved:
    """Each group's tensors for backward, released group by group in backward.

    Under saved-tensor hooks (activation checkpointing, offload) they go through
    `ctx.save_for_backward`, where the hooks see them, and are unpacked once (the checkpoint
    hands recomputed tensors over and drops its own references). Otherwise they are held here:
    autograd would keep `save_for_backward`'s until the whole backward returns. Either way the
    backward drops a group's tensors as soon as its kernel is done, so the kept groups shrink
    while the received gradients grow."""

    def __init__(self, ctx, groups: list[tuple], hooked: bool):
        self.per_group, self.hooked = len(groups[0]), hooked
        if hooked:
            ctx.save_for_backward(*(t for grp in groups for t in grp))
            self.groups = None
        else:
            self.groups = groups

    def take(self, ctx, g: int) -> tuple:
        if self.groups is None:  # first call of a hooked backward: unpack every group once
            flat, n = ctx.saved_tensors, self.per_group
            self.groups = [tuple(flat[i * n:(i + 1) * n]) for i in range(len(flat) // n)]
        group, self.groups[g] = self.groups[g], None
        return group


class _HeadGroupPipeline(torch.autograd.Function):
    """q `(B, S/P, Hq, D)`, k/v `(B, S/P, Hkv, D)` -> out `(B, S/P, Hq, D)`; see the module."""

    @staticmethod
    def forward(ctx, q, k, v, hg: HeadGroups, group: ProcessGroup, kernel):
        bsz, s_local, _, dim = q.shape
        out = q.new_empty(bsz, s_local, hg.p, hg.chunks, hg.hq_g, dim)  # (B, S/P, P, G, h, D)
        saved, kv = [], None
        pending = post(_send_qkv(q, k, v, hg, 0), group)
        out_pending = None
        for g in range(hg.chunks):
            parts = _to_seq_major(pending.wait(), _qkv_widths(hg, g))
            if g + 1 < hg.chunks:  # in flight during this group's kernel
                pending = post(_send_qkv(q, k, v, hg, g + 1), group)
            q_g = parts[0]
            if len(parts) == 3:
                kv = parts[1], parts[2]
            kvh = hg.kv_heads(g) if hg.resident else slice(None)
            k_g, v_g = kv[0][:, :, kvh], kv[1][:, :, kvh]
            o_g, keep = kernel.forward(q_g, k_g, v_g)  # (B, S, h, D)
            if out_pending is not None:  # the previous group's output, sent during this kernel
                _place(out, out_pending.wait(), hg, g - 1)
            out_pending = post(_to_rank_major(o_g, hg.p).contiguous(), group)
            saved.append((q_g, k_g, v_g, *keep))
            del parts, o_g, q_g, k_g, v_g, keep  # only `saved` keeps them
        _place(out, out_pending.wait(), hg, hg.chunks - 1)
        ctx.hg, ctx.group, ctx.kernel = hg, group, kernel
        ctx.kv_shape, ctx.kv_dtype = tuple(k.shape), k.dtype
        ctx.saved = _Saved(ctx, saved, _hooks_active())
        return out.view(bsz, s_local, hg.hq, dim)

    @staticmethod
    def backward(ctx, dout):
        hg, group = ctx.hg, ctx.group
        bsz, s_local, _, dim = dout.shape
        dout = dout.reshape(bsz, s_local, hg.p, hg.chunks, hg.hq_g, dim)  # (B, S/P, P, G, h, D)
        grads = _Grads(hg, ctx.kv_shape, ctx.kv_dtype, dout.device)
        pending = post(dout[:, :, :, 0].permute(2, 0, 1, 3, 4).contiguous(), group)
        grad_pending = None
        for g in range(hg.chunks):
            (dout_g,) = _to_seq_major(pending.wait(), [hg.hq_g])  # (B, S, h, D)
            if g + 1 < hg.chunks:  # (B, S/P, P, h, D) -> (P, B, S/P, h, D), in flight now
                pending = post(dout[:, :, :, g + 1].permute(2, 0, 1, 3, 4).contiguous(), group)
                if g + 2 == hg.chunks:  # every group's share is on its way: let it go
                    dout = None
            q_g, k_g, v_g, *keep = ctx.saved.take(ctx, g)
            dq_g, dk_g, dv_g = ctx.kernel.backward(dout_g, q_g, k_g, v_g, tuple(keep))
            del dout_g, q_g, k_g, v_g, keep  # this group's saved tensors go now
            if grad_pending is not None:  # group g-1's gradients travelled during this backward
                grads.received(grad_pending.wait())
            grad_pending = post(grads.send(dq_g, dk_g, dv_g, g), group)
            del dq_g, dk_g, dv_g
        grads.received(grad_pending.wait())
        dq, dk, dv = grads.assemble((bsz, s_local, hg.p, hg.chunks, hg.hq_g, dim))
        return dq.view(bsz, s_local, hg.hq, dim), dk, dv, None, None, None


class _Grads:
    """The backward's send buffers, and the received pieces they become dq, dk, dv from.

    Pieces are assembled only at the end, after every group's saved tensors are gone: the
    seq-sharded gradients are never alive next to all of them."""

    def __init__(self, hg: HeadGroups, kv_shape, dtype, device):
        self.hg, self.kv_shape, self.dtype, self.pieces = hg, kv_shape, dtype, []
        if hg.resident:  # every group's share of the resident kv heads, summed in fp32
            acc = (kv_shape[0], kv_shape[1] * hg.p, hg.hkv_l, kv_shape[3])  # (B, S, Hkv', D)
            self.acc = [torch.zeros(acc, dtype=torch.float32, device=device) for _ in range(2)]

    def send(self, dq_g, dk_g, dv_g, g: int) -> torch.Tensor:
        hg = self.hg
        parts = [dq_g]
        if not hg.resident:
            parts += [dk_g, dv_g]
        else:
            kvh = hg.kv_heads(g)
            self.acc[0][:, :, kvh] += dk_g
            self.acc[1][:, :, kvh] += dv_g
            if g == hg.chunks - 1:  # complete: home with the last group
                parts += [a.to(self.dtype) for a in self.acc]
                self.acc = None
        # (B, S, h, D) -> (P, B, S/P, h, D) views, side by side -> one contiguous buffer
        return torch.cat([_to_rank_major(t, hg.p) for t in parts], dim=3)

    def received(self, recv: torch.Tensor) -> None:
        self.pieces.append(recv)  # (P, B, S/P, W, D), dim 0 = source rank

    def assemble(self, dq_shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hg, h = self.hg, self.hg.hq_g
        dq = self.pieces[0].new_empty(dq_shape)  # (B, S/P, P, G, h, D)
        dk, dv = (self.pieces[0].new_empty(self.kv_shape) for _ in range(2))
        for g in range(len(self.pieces)):
            piece = self.pieces[g]
            _place(dq, piece[:, :, :, :h], hg, g)
            if not hg.resident:
                w = hg.hkv_g
                for full, part in ((dk, piece[:, :, :, h:h + w]), (dv, piece[:, :, :, h + w:])):
                    _place(full.view(*full.shape[:2], hg.p, hg.chunks, w, full.shape[3]), part, hg, g)
            elif g == hg.chunks - 1:  # (P, B, S/P, Hkv', D) -> (P/rep, rep, ...) summed over replicas
                w = hg.hkv_l
                for full, part in ((dk, piece[:, :, :, h:h + w]), (dv, piece[:, :, :, h + w:])):
                    summed = part.unflatten(0, (hg.p // hg.rep, hg.rep)).sum(1)
                    full.copy_(summed.permute(1, 2, 0, 3, 4).reshape(full.shape))  # -> (B, S/P, Hkv, D)
            self.pieces[g] = piece = None  # placed: free it before the next is read
        self.pieces = []
        return dq, dk, dv


class PipelinedUlyssesAttention(nn.Module):
    """Ulysses attention over `chunks` pipelined head groups (module docstring).

    Args:
        local_attention: the kernel (as for `UlyssesAttention`), or a `RingAttention` layer for
            Ulysses x ring.
        group: the Ulysses process group (None: the default group).
        chunks: G, the number of head groups; validated on the first call's head counts
            (`check_head_groups`; the config checks it before any process group exists).

    Call like `UlyssesAttention`: q `(B, S/P, Hq, D)`, k/v `(B, S/P, Hkv, D)`, keyword arguments
    (`causal`, `mask`, `window`) for the kernel. Returns `(B, S/P, Hq, D)`. Same values and
    gradients as `UlyssesAttention` (to rounding: the kernels run per head group); on a size-1
    group it is `local_attention(q, k, v, **kw)`.
    Collectives: forward G + G all-to-alls, backward G + G, carrying the same bytes in total as
    `UlyssesAttention`'s 2 + 2. Raises ValueError before anything is sent for shapes Ulysses
    cannot split, a G the heads do not allow, or a mask or window the kernel refuses.
    """

    def __init__(self, local_attention, group: ProcessGroup | None, chunks: int):
        super().__init__()
        self.local_attention = local_attention
        self.group = dist.group.WORLD if group is None else group
        self.world_size = group_size(group)
        self.chunks = chunks

    # Not traced by torch.compile (train.compile): the pipeline's order of posts and waits is
    # its point, and it calls private torch queries dynamo cannot trace; the rest of the block
    # still compiles, around one graph break here.
    @torch.compiler.disable
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.world_size == 1:
            return self.local_attention(q, k, v, **kwargs)
        check_ulysses_shapes(q, k, v, self.world_size)
        hg = check_head_groups(q.shape[2], k.shape[2], self.world_size, self.chunks)
        bsz, s_local, _, dim = q.shape
        like = q.new_zeros(()).expand(bsz, s_local * self.world_size, hg.hq_g, dim)  # no memory
        kernel = group_kernel(self.local_attention, like, **kwargs)
        return _HeadGroupPipeline.apply(q, k, v, hg, self.group, kernel)

    def extra_repr(self) -> str:
        return f"world_size={self.world_size}, chunks={self.chunks}"
