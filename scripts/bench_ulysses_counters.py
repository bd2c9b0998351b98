"""What scripts/bench_ulysses.py counts besides time: bytes sent per rank, peak tensor memory.

- Bytes (`count_sent`, `sent_bytes`): counted where they leave the rank. Every all-to-all goes
  through `torch.ops._c10d_functional.all_to_all_single` — the one-exchange layer's
  (parallel/comm.py, forward, and backward through the op's registered autograd formula) and the
  head-group layer's (`ulysses_pipeline.post`, forward and its own backward) alike — and counts
  (P-1)/P of its buffer (equal splits: the own chunk is not sent). Ring hops count at each
  `ring.Transfer`, a sliding-window layer's halo at each `ring_window.HaloExchange`.
  `model_bytes` is the communication model they are checked against (bench_ulysses docstring).
- Memory (`peak_bytes`): torch's `MemTracker` around one forward + backward; what it does and
  does not count is in bench_ulysses' docstring.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ulysses_train.parallel import ring, ring_window


def peak_snapshot(step) -> dict[str, int]:
    """MemTracker's peak of one `step()` on this rank, bytes per category summed over devices:
    'Total', 'Other' (the step's inputs, registered with `track_external`), 'Activation'
    (created in forward), 'Temp' (created in backward). Empty for None (this rank takes no part).
    Runs the step once more (collectives inside: all ranks call it); what is and is not
    counted: bench_ulysses' docstring."""
    if step is None:
        return {}
    from torch.distributed._tools.mem_tracker import MemTracker  # imports torch._dynamo: ~1 s

    tracker = MemTracker()
    tracker.track_external(*step.inputs)
    with tracker:
        step()
    total: dict[str, int] = {}
    for snap in tracker.get_tracker_snapshot("peak").values():
        for kind, nbytes in snap.items():  # keys: "Total" and _MemRefType members (str enums)
            name = str(getattr(kind, "value", kind))
            total[name] = total.get(name, 0) + nbytes
    return total


def peak_bytes(step) -> int:
    """Peak tracked bytes of one `step()` on this rank, its inputs included (`peak_snapshot`)."""
    return peak_snapshot(step).get("Total", 0)


def model_bytes(cfg, world: int, r: int, element_size: int, window: int = 0, ring_rank: int = 0) -> int:
    """The communication model's forward bytes per rank (bench_ulysses' docstring). With a sliding
    `window` W < S under a ring, the ring part is ring rank `ring_rank`'s halo instead:
    K and V of `ring_window.halo_tokens_sent` tokens each (docs/attention.md)."""
    b, s, hq, hkv, d = cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    u = world // r
    ulysses = b * s // world * d * (2 * hq + 2 * hkv * max(u // hkv, 1)) * (u - 1) // u
    tokens = s // r * (r - 1)  # the full ring: R - 1 hops of the local block
    if window and window < s and r > 1:
        tokens = ring_window.halo_tokens_sent(ring_rank, r, s // (2 * r), window)
    ring_part = 2 * b * tokens * max(hkv // u, 1) * d
    return (ulysses + ring_part) * element_size


@contextlib.contextmanager
def count_sent(totals: list[int]):
    """Adds to totals[0] the bytes this rank sends through all-to-alls and ring P2P hops.

    The all-to-all is counted at `torch.ops._c10d_functional.all_to_all_single`, which our comm
    layer calls forward and its registered autograd formula calls backward, and the head-group
    layer's `ulysses_pipeline.post` calls in its forward and backward (the own chunk is not
    sent: (P-1)/P of the buffer); the ring at each `ring.Transfer` (one send per hop); a sliding-window layer's
    halo at each `ring_window.HaloExchange` (every slice it sends to every peer)."""
    ops, transfer, halo = torch.ops._c10d_functional, ring.Transfer, ring_window.HaloExchange
    a2a = ops.all_to_all_single

    def counted_a2a(x, out_splits, in_splits, group_name):
        p = len(in_splits)
        totals[0] += x.numel() * x.element_size() * (p - 1) // p
        return a2a(x, out_splits, in_splits, group_name)

    class Counted(transfer):
        def __init__(self, send, group, tag):
            totals[0] += send.numel() * send.element_size()
            super().__init__(send, group, tag)

    class CountedHalo(halo):
        def __init__(self, sends, recv_shapes, like, group, tag):
            totals[0] += sum(t.numel() * t.element_size() for t in sends.values())
            super().__init__(sends, recv_shapes, like, group, tag)

    ops.all_to_all_single, ring.Transfer, ring_window.HaloExchange = counted_a2a, Counted, CountedHalo
    try:
        yield
    finally:
        ops.all_to_all_single, ring.Transfer, ring_window.HaloExchange = a2a, transfer, halo


def sent_bytes(step, fn, local, **kw) -> tuple[int, int]:
    """Bytes this rank sends in one forward, and in the backward of a whole step (`kw`: what
    `step` passes the layer besides causal=True, e.g. window=W)."""
    fwd, total = [0], [0]
    with count_sent(fwd), torch.no_grad():
        fn(*local[:3], causal=True, **kw)
    with count_sent(total):
        step()
    return fwd[0], total[0] - fwd[0]


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value` (collective: all ranks call)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


