"""Sliding-window attention under a ring: the halo exchange (issue 20 §3).

A sliding-window layer (window W: query i sees key j when i - W < j <= i, global indices)
needs, for each query chunk a of the zig-zag layout (chunk length c = S'/(2R); ring rank i
holds chunks i and 2R-1-i, parallel/layout.py), only its own chunk and the W - 1 tokens before
it: of key chunk b < a the trailing n(a, b) = min(c, W - 1 - (a - 1 - b) * c) tokens (> 0).
Rotating every K/V block around the ring and masking most of it away would give the same
numbers; here each rank instead receives just those slices from the ranks that hold them (a
"halo": for W <= c + 1 the trailing W - 1 tokens of the neighbouring chunks) and sends its own
slices to the ranks that need them. All ranks derive the same plan from (R, c, W), so no sizes
travel.

Forward: post every halo send/receive (one `batch_isend_irecv`), compute the sub-blocks whose
keys this rank holds, wait, compute the ones on received keys; merge by log-sum-exp in fp32
with the ring's kernels (parallel/ring_kernels.py). Backward: the K/V halo is exchanged again
the same way (nothing extra is kept between forward and backward, as the full ring), and the
fp32 dK/dV of every received slice goes back to its owner, which adds it to its own.

Sub-blocks: (query chunk, key slice) pairs; positionally "causal" (the aligned diagonal when
W >= c), "full" (every pair in the window) or "masked" (an additive 0/-inf bias of the band);
with document ids a sub-block with no visible pair is skipped and one whose documents cut
nothing keeps its plain kind (one host sync per call, as the full ring).

Bytes per rank per layer: see `halo_tokens_sent` and docs/attention.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from . import ring_kernels as kernels

KV_TAG, GRAD_TAG = 2, 3  # distinct from the full ring's tags
LOCAL = -1  # the source of keys this rank holds itself


def owner(chunk: int, ring: int) -> int:
    """The ring rank holding global chunk `chunk` (chunk b < R on rank b, else on 2R-1-b)."""
    return 0 if ring == 1 else chunk if chunk < ring else 2 * ring - 1 - chunk


def _local_start(chunk: int, ring: int, c: int) -> int:
    """First local token of `chunk` on its owner (first or second of the two local chunks)."""
    return 0 if chunk < ring or ring == 1 else c


def reach(a: int, c: int, window: int) -> list[tuple[int, int]]:
    """[(key chunk b, trailing tokens n)] that query chunk a needs from chunks before it."""
    out = []
    for b in range(a - 1, -1, -1):
        n = min(c, window - 1 - (a - 1 - b) * c)
        if n <= 0:
            break
        out.append((b, n))
    return out


def halo_needs(ring_rank: int, ring: int, c: int, window: int) -> dict[int, int]:
    """{key chunk b: trailing tokens} ring rank i receives: the most any of its query chunks
    reads of b, for chunks b held by other ranks (a larger trailing slice covers a smaller)."""
    needs: dict[int, int] = {}
    for a in kernels.rank_chunks(ring_rank, ring):
        for b, n in reach(a, c, window):
            if owner(b, ring) != ring_rank:
                needs[b] = max(needs.get(b, 0), n)
    return needs


def halo_tokens_sent(ring_rank: int, ring: int, c: int, window: int) -> int:
    """Tokens of K (and as many of V) ring rank i sends per halo exchange: the sum, over the
    ranks r needing one of its chunks, of the trailing slice r needs. At most 2 (W - 1)
    (each of its two chunks feeds at most W - 1 tokens to the chunks after it)."""
    return sum(n for r in range(ring) if r != ring_rank
               for b, n in halo_needs(r, ring, c, window).items() if owner(b, ring) == ring_rank)


def halo_tokens_received(ring_rank: int, ring: int, c: int, window: int) -> int:
    """Tokens of K (and of V) ring rank i receives per halo exchange, at most 2 (W - 1) (each
    of its query chunks reads W - 1 tokens before it); in the backward it sends as many tokens
    of fp32 dK (and dV) back."""
    return sum(halo_needs(ring_rank, ring, c, window).values())


@dataclass
class WindowBlock:
    """One sub-block: query rows `q_rows` (global first position q0) against the keys
    `k_rows` of `source` (LOCAL or a peer ring rank's received buffer; global first key k0)."""

    q_rows: slice
    q0: int
    source: int
    k_rows: slice
    k0: int
    kind: str | None


def _positional_kind(q0: int, cq: int, k0: int, ck: int, window: int) -> str:
    """The kind of queries [q0, q0+cq) against keys [k0, k0+ck) from positions alone (k0 <= q0)."""
    if k0 == q0 and ck == cq:
        return kernels.CAUSAL if window >= cq else kernels.MASKED
    full = k0 + ck - 1 <= q0 and k0 > q0 + cq - 1 - window  # every key before, and in reach of, every query
    return kernels.FULL if full else kernels.MASKED


def window_visible(blk: WindowBlock, cq: int, ck: int, window: int,
                   document_ids: torch.Tensor | None, device) -> torch.Tensor:
    """(B or 1, cq, ck) bool: causal, within the window and (with ids) in the same document."""
    qp = torch.arange(blk.q0, blk.q0 + cq, device=device)[:, None]  # (cq, 1) global positions
    kp = torch.arange(blk.k0, blk.k0 + ck, device=device)[None, :]  # (1, ck)
    vis = ((kp <= qp) & (kp > qp - window)).unsqueeze(0)  # (1, cq, ck)
    if document_ids is not None:
        qd = document_ids[:, blk.q0:blk.q0 + cq, None]  # (B, cq, 1)
        vis = vis & (qd == document_ids[:, None, blk.k0:blk.k0 + ck])  # (B, cq, ck)
    return vis


def _host_flags(blk: WindowBlock, c: int, window: int, ids: np.ndarray) -> tuple[bool, bool]:
    """(any key visible, every positionally visible key visible) of one block, from the
    (B, S') host ids in numpy (`window_visible`'s rule)."""
    ck = blk.k_rows.stop - blk.k_rows.start
    qp = np.arange(blk.q0, blk.q0 + c)[:, None]  # (cq, 1) global positions
    kp = np.arange(blk.k0, blk.k0 + ck)[None, :]  # (1, ck)
    pos = (kp <= qp) & (kp > qp - window)  # (cq, ck)
    same = ids[:, blk.q0:blk.q0 + c, None] == ids[:, None, blk.k0:blk.k0 + ck]  # (B, cq, ck)
    vis = pos & same
    return bool(vis.any()), bool((vis == pos).all())


def window_blocks(ring_rank: int, ring: int, c: int, window: int,
                  host_ids: torch.Tensor | None) -> list[WindowBlock]:
    """Every sub-block ring rank i computes (LOCAL sources first), fully masked ones dropped.
    `host_ids`: the global (B, S') document ids on the CPU (`DocumentMask.host_ids`) or None.

    Received buffers hold, per peer, its chunks' trailing slices in chunk order
    (`halo_needs`); a query chunk reading fewer tokens of a chunk takes the buffer's tail."""
    needs = halo_needs(ring_rank, ring, c, window)
    offset, end = {}, {}  # chunk -> where its slice starts in its owner's buffer; peer -> length
    for b in sorted(needs):
        p = owner(b, ring)
        offset[b] = end.get(p, 0)
        end[p] = offset[b] + needs[b]
    blocks = []
    for ai, a in enumerate(kernels.rank_chunks(ring_rank, ring)):
        q_rows = slice(ai * c, (ai + 1) * c)
        diag = _local_start(a, ring, c)
        blocks.append(WindowBlock(q_rows, a * c, LOCAL, slice(diag, diag + c), a * c, None))
        for b, n in reach(a, c, window):
            k0 = (b + 1) * c - n
            if owner(b, ring) == ring_rank:
                start = _local_start(b, ring, c) + c - n
                blocks.append(WindowBlock(q_rows, a * c, LOCAL, slice(start, start + n), k0, None))
            else:
                stop = offset[b] + needs[b]
                blocks.append(WindowBlock(q_rows, a * c, owner(b, ring), slice(stop - n, stop), k0, None))
    for blk in blocks:
        blk.kind = _positional_kind(blk.q0, c, blk.k0, blk.k_rows.stop - blk.k_rows.start, window)
    if host_ids is not None:  # on the host, no sync: skip blocks the documents empty, unmask plain ones
        ids = host_ids.numpy()  # host memory: raises (rather than syncs) if handed device ids
        for blk in blocks:
            any_visible, plain = _host_flags(blk, c, window, ids)
            blk.kind = None if not any_visible else blk.kind if plain else kernels.MASKED
    blocks = [blk for blk in blocks if blk.kind is not None]
    return sorted(blocks, key=lambda blk: blk.source != LOCAL)  # stable: local blocks first


class HaloExchange:
    """Posted sends `{peer: tensor}` to ring peers and receives of the given shapes from them
    (one `batch_isend_irecv`); `wait()` returns `{peer: received tensor}`."""

    def __init__(self, sends: dict[int, torch.Tensor], recv_shapes: dict[int, tuple],
                 like: torch.Tensor, group: ProcessGroup, tag: int):
        self.recv = {p: like.new_empty(shape) for p, shape in recv_shapes.items()}
        ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, p), group, tag)
               for p, t in sends.items()]
        ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, p), group, tag)
                for p, t in self.recv.items()]
        self.works = dist.batch_isend_irecv(ops) if ops else []
        self.sends = sends  # keep the sources alive until the sends complete

    def wait(self) -> dict[int, torch.Tensor]:
        for work in self.works:
            work.wait()
        self.sends = None
        return self.recv


def _routes(ring_rank: int, ring: int, c: int, window: int):
    """({peer: [(local token slice)]} this rank sends, {peer: tokens} it receives)."""
    send: dict[int, list[slice]] = {}
    for r in range(ring):
        if r == ring_rank:
            continue
        for b, n in sorted(halo_needs(r, ring, c, window).items()):
            if owner(b, ring) == ring_rank:
                start = _local_start(b, ring, c) + c - n
                send.setdefault(r, []).append(slice(start, start + n))
    recv: dict[int, int] = {}
    for b, n in halo_needs(ring_rank, ring, c, window).items():
        recv[owner(b, ring)] = recv.get(owner(b, ring), 0) + n
    return send, recv


def _exchange_kv(kv: torch.Tensor, send, recv, group) -> HaloExchange:
    """Post the K/V halo: kv (2, B, L, Hkv, D) -> per peer (2, B, n, Hkv, D) slices."""
    sends = {p: torch.cat([kv[:, :, s] for s in slices], dim=2) for p, slices in send.items()}
    shapes = {p: (*kv.shape[:2], n, *kv.shape[3:]) for p, n in recv.items()}
    return HaloExchange(sends, shapes, kv, group, KV_TAG)


def _bias(blk: WindowBlock, c: int, window: int, ids, q: torch.Tensor):
    """A MASKED block's (B, 1, cq, ck) additive bias in q's dtype and (B, cq) empty rows."""
    if blk.kind != kernels.MASKED:
        return None, None
    ck = blk.k_rows.stop - blk.k_rows.start
    vis = window_visible(blk, c, ck, window, ids, q.device).expand(q.shape[0], -1, -1)
    bias = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill_(~vis, float("-inf"))
    return bias.unsqueeze(1), ~vis.any(dim=-1)  # (B, cq, ck) -> (B, 1, cq, ck): every head


def window_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids,
                   host_ids, window: int, group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window ring forward: q (B, L, Hq, D), k/v (B, L, Hkv, D) in the zig-zag order
    (L = S'/R) -> out (B, L, Hq, D), LSE (B, Hq, L) fp32. `document_ids`: global (B, S') or
    None; `host_ids` the same on the CPU (the block plan is decided from them)."""
    ring, rank = group.size(), group.rank()
    c = q.shape[1] // len(kernels.rank_chunks(rank, ring))
    blocks = window_blocks(rank, ring, c, window, kernels.host_copy(document_ids, host_ids))
    kv = torch.stack((k, v))  # (2, B, L, Hkv, D)
    exchange = _exchange_kv(kv, *_routes(rank, ring, c, window), group)  # in flight over local work
    qt = q.transpose(1, 2)  # (B, L, Hq, D) -> (B, Hq, L, D), a view
    out = torch.zeros(qt.shape, dtype=torch.float32, device=q.device)  # (B, Hq, L, D)
    lse = torch.full(qt.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)  # (B, Hq, L)
    sources, waited = {LOCAL: kv}, False
    for blk in blocks:
        if blk.source != LOCAL and not waited:  # the first block on received keys: wait here
            sources.update(exchange.wait())
            waited = True
        kt, vt = (x.transpose(1, 2) for x in sources[blk.source][:, :, blk.k_rows])  # (B, Hkv, ck, D)
        bias, empty = _bias(blk, c, window, document_ids, q)
        o, s = kernels.block_forward(qt[:, :, blk.q_rows], kt, vt, blk.kind, bias)
        if empty is not None:  # rows seeing no key here: LSE -inf, not the op's 0
            s = s.masked_fill(empty.unsqueeze(1), float("-inf"))
        r = blk.q_rows
        out[:, :, r], lse[:, :, r] = kernels.merge(out[:, :, r], lse[:, :, r], o, s)
    if not waited:  # no block on received keys (documents emptied them): complete the exchange
        exchange.wait()
    return out.to(q.dtype).transpose(1, 2).contiguous(), lse  # -> (B, L, Hq, D)


def window_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, document_ids, host_ids, window: int,
                    group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of `window_forward` from its saved out and LSE: dq like q, dk/dv stacked
    (2, B, L, Hkv, D) fp32. K/V halo exchanged again; received slices' dK/dV sent home."""
    ring, rank = group.size(), group.rank()
    c = q.shape[1] // len(kernels.rank_chunks(rank, ring))
    blocks = window_blocks(rank, ring, c, window, kernels.host_copy(document_ids, host_ids))
    send, recv = _routes(rank, ring, c, window)
    kv = torch.stack((k, v))  # (2, B, L, Hkv, D)
    exchange = _exchange_kv(kv, send, recv, group)
    # (B, L, H, D) -> (B, H, L, D) views
    qt, dot, ot = q.transpose(1, 2), grad_out.to(q.dtype).transpose(1, 2), out.transpose(1, 2)
    dq = torch.zeros(qt.shape, dtype=torch.float32, device=q.device)  # (B, Hq, L, D)
    sources, waited = {LOCAL: kv}, False
    grads = {LOCAL: torch.zeros(kv.shape, dtype=torch.float32, device=q.device)}
    for blk in blocks:
        if blk.source != LOCAL and not waited:
            sources.update(exchange.wait())
            waited = True
            grads.update({p: torch.zeros(t.shape, dtype=torch.float32, device=q.device)
                          for p, t in sources.items() if p != LOCAL})
        kt, vt = (x.transpose(1, 2) for x in sources[blk.source][:, :, blk.k_rows])  # (B, Hkv, ck, D)
        bias, _ = _bias(blk, c, window, document_ids, q)
        r = blk.q_rows
        g = kernels.block_backward(dot[:, :, r], qt[:, :, r], kt, vt, ot[:, :, r], lse[:, :, r],
                                   blk.kind, bias)
        dq[:, :, r] += g[0]
        dkv = grads[blk.source][:, :, blk.k_rows]  # (2, B, ck, Hkv, D) view
        dkv[0] += g[1].transpose(1, 2)
        dkv[1] += g[2].transpose(1, 2)
    if not waited:
        exchange.wait()
    dkv = grads[LOCAL]
    home = HaloExchange({p: grads.get(p, torch.zeros((*kv.shape[:2], n, *kv.shape[3:]),
                                                     dtype=torch.float32, device=q.device))
                         for p, n in recv.items()},
                        {p: (*kv.shape[:2], sum(s.stop - s.start for s in slices), *kv.shape[3:])
                         for p, slices in send.items()}, dkv, group, GRAD_TAG)
    for p, back in home.wait().items():  # my slices' dK/dV from the ranks that read them
        pos = 0
        for s in send[p]:
            dkv[:, :, s] += back[:, :, pos:pos + s.stop - s.start]
            pos += s.stop - s.start
    return dq.transpose(1, 2).to(q.dtype).contiguous(), dkv


@torch.library.custom_op("ulysses_train::ring_window_attention", mutates_args=())
def ring_window_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             document_ids: torch.Tensor | None, host_ids: torch.Tensor | None,
                             window: int, group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`window_forward` as an op (the group by name, as parallel/ring.py's ops)."""
    return window_forward(q, k, v, document_ids, host_ids, window,
                          kernels.group_by_name(group_name))


@ring_window_attention_op.register_fake
def _(q, k, v, document_ids, host_ids, window, group_name):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


@torch.library.custom_op("ulysses_train::ring_window_attention_backward", mutates_args=())
def ring_window_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                      v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                      document_ids: torch.Tensor | None,
                                      host_ids: torch.Tensor | None, window: int,
                                      group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`window_backward` as an op."""
    return window_backward(grad_out, q, k, v, out, lse, document_ids, host_ids, window,
                           kernels.group_by_name(group_name))


@ring_window_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, document_ids, host_ids, window, group_name):
    return torch.empty_like(q), k.new_empty((2, *k.shape), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, document_ids, host_ids, window, group_name = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], document_ids, host_ids)
    ctx.window, ctx.group_name = window, group_name
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, document_ids, host_ids = ctx.saved_tensors
    dq, dkv = ring_window_attention_backward_op(grad_out.contiguous(), q, k, v, out, lse,
                                                document_ids, host_ids, ctx.window,
                                                ctx.group_name)
    return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


ring_window_attention_op.register_autograd(_backward, setup_context=_setup_context)
