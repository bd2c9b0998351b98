"""Benchmark the Ulysses attention layer (forward + backward) against its baselines.

    python scripts/bench_ulysses.py                      # 4 gloo ranks on CPU, default configs
    python scripts/bench_ulysses.py --world 1 --configs 256x8x8x32x1 --repeats 3   # smoke check

Implementations, timed on the same inputs (each rank's sequence slice of one global q/k/v):
- `ulysses`: our `UlyssesAttention(sdpa_attention, group)`;
- `deepspeed`: `deepspeed.sequence.layer.DistributedAttention` with the same local kernel, when
  deepspeed is importable and supports the head counts (it needs kv_heads >= world);
- `local_shard`: every rank runs the local kernel on `(B, S, H/P, D)` with no communication —
  the compute floor of Ulysses, so ulysses - local_shard is the price of the all-to-alls;
- `full_1proc`: rank 0 alone runs full attention on the whole `(B, S, H, D)` (the others wait);
- `ring`: `UlyssesRingAttention` with ring = P (pure ring attention, zig-zag layout);
- `hybrid`: `UlyssesRingAttention` with ring = 2 and Ulysses = P/2 (USP), when P >= 4.
Ring and hybrid rows also report `sent_bytes_fwd` / `sent_bytes_bwd` per rank (counted at the
all-to-all and P2P calls, the own chunk of an all-to-all not counted) next to `model_bytes_fwd`,
the communication model (`comm_model`): per rank, forward, per attention layer,
  Ulysses over U ranks: B * S/P * D * (2*Hq + 2*Hkv*rep) * (U-1)/U elements, rep = max(U/Hkv, 1)
    (q, k, v in, out back: 4*S*d/P for MHA, up to the own chunk's (U-1)/U);
  ring over R ranks: the local K and V block, B * S/R * max(Hkv/U, 1) * D each, sent R-1 times;
  a sliding-window layer (W < S) under a ring sends only its halo instead: K and V of at most
  2 (W - 1) tokens (`ring_window.halo_tokens_sent`, docs/attention.md).
Backward: the same all-to-alls again; the ring sends K/V R-1 times and fp32 dK/dV R times
(the halo: its K/V again and the fp32 dK/dV of what it received, back to the owners).
Repeats are interleaved (every round runs each implementation once, in a rotating order) so
load drifts hit all of them alike; the median over rounds is reported. Every rank is timed
between two barriers; rank 0 prints one JSON line per (configuration, implementation) with all
samples and, for the distributed ones, the fp32 relative error of the output and of the q/k/v
gradients against full attention on the whole sequence (`rel_err_vs_full`, worst of the four).
Needs only torch and this package (deepspeed optional). Ranks are spawned here, with
OMP_NUM_THREADS=1 by default (the 2-core CI machines would otherwise be oversubscribed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ulysses_train.model.attention import sdpa_attention  # noqa: E402
from ulysses_train.parallel import ring, ring_window  # noqa: E402
from ulysses_train.parallel.layout import SequenceLayout  # noqa: E402
from ulysses_train.parallel.ring import UlyssesRingAttention  # noqa: E402
from ulysses_train.parallel.ulysses import UlyssesAttention  # noqa: E402

DEFAULT_CONFIGS = ["1024x16x16x64x1", "512x32x32x64x2", "2048x32x8x64x1", "2048x16x4x64x1", "1024x16x2x64x1"]


def parse_config(text: str) -> dict[str, int]:
    """'SEQxHQxHKVxDxB' -> dict, e.g. '2048x16x4x64x1'."""
    seq, hq, hkv, dim, batch = (int(x) for x in text.split("x"))
    return {"seq_len": seq, "heads": hq, "kv_heads": hkv, "head_dim": dim, "batch": batch}


def global_inputs(cfg: dict[str, int], seed: int = 0) -> list[torch.Tensor]:
    """q, k, v and an output gradient for the whole sequence, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    b, s, d = cfg["batch"], cfg["seq_len"], cfg["head_dim"]
    shapes = [(b, s, cfg["heads"], d), (b, s, cfg["kv_heads"], d), (b, s, cfg["kv_heads"], d),
              (b, s, cfg["heads"], d)]
    return [torch.randn(*shape, generator=g) for shape in shapes]


def make_step(fn, inputs: list[torch.Tensor], **kw):
    """A closure running fn forward + backward on leaf copies of q/k/v; returns out, dq, dk, dv."""
    q, k, v, grad_out = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step() -> list[torch.Tensor]:
        for t in leaves:
            t.grad = None
        out = fn(*leaves, **kw)
        (out * grad_out).sum().backward()  # scalar loss: same gradients as out.backward(grad_out)
        return [out.detach()] + [t.grad for t in leaves]

    return step


def deepspeed_attention(group):
    """DeepSpeed's DistributedAttention over `group` in our (B, S, H, D) layout, or None."""
    # deepspeed logs to stdout (its logger binds the stream at import): keep stdout for JSON.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            import deepspeed
            from deepspeed.sequence.layer import DistributedAttention
        except Exception:  # not installed, or broken on this platform
            return None
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # wraps the existing group
    # scatter heads (dim 2), gather sequence (dim 1); batch_dim_idx=0 means (B, S, H, D).
    layer = DistributedAttention(sdpa_attention, group, scatter_idx=2, gather_idx=1)
    return lambda q, k, v, **kw: layer(q, k, v, 0, **kw)


def head_shard(inputs: list[torch.Tensor], cfg: dict[str, int], rank: int, world: int) -> list[torch.Tensor]:
    """What rank `rank` holds after Ulysses' first all-to-all: all tokens, its heads (kv replicated
    to one head per rank when kv_heads < world, as UlyssesAttention does)."""
    q, k, v, grad_out = inputs
    heads = slice(rank * cfg["heads"] // world, (rank + 1) * cfg["heads"] // world)
    rep = max(world // cfg["kv_heads"], 1)
    kv = slice(rank * cfg["kv_heads"] * rep // world, (rank + 1) * cfg["kv_heads"] * rep // world)
    k, v = (t.repeat_interleave(rep, dim=2)[:, :, kv] for t in (k, v))
    return [t.contiguous() for t in (q[:, :, heads], k, v, grad_out[:, :, heads])]


def hybrid_groups(world: int, r: int):
    """(ulysses_group, ring_group) of this rank for ring degree r (collective: all ranks call)."""
    rank, u = dist.get_rank(), world // r
    mine = [None, None]
    for ranks, slot in [([j * u + i for i in range(u)], 0) for j in range(r)] + \
                       [([j * u + i for j in range(r)], 1) for i in range(u)]:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine[slot] = group
    return tuple(mine)


def ring_rows(cfg, world: int) -> dict[str, int]:
    """impl name -> ring degree for the ring rows this configuration supports."""
    rows = {"ring": world} if world > 1 else {}
    u = world // 2
    if world >= 4 and cfg["heads"] % u == 0 and (cfg["kv_heads"] % u == 0 or u % cfg["kv_heads"] == 0):
        rows["hybrid"] = 2
    return {name: r for name, r in rows.items() if cfg["seq_len"] % (2 * world) == 0}


def model_bytes(cfg, world: int, r: int, element_size: int, window: int = 0, ring_rank: int = 0) -> int:
    """The communication model's forward bytes per rank (module docstring). With a sliding
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
    layer calls forward and its registered autograd formula calls backward (the own chunk is
    not sent); the ring at each `ring.Transfer` (one send per hop); a sliding-window layer's
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


def implementations(cfg, inputs, rank: int, world: int):
    """name -> step closure (None where this rank takes no part), this rank's token positions per
    implementation, and the ring rows' sent bytes."""
    group = dist.group.WORLD
    mine = torch.arange(rank * cfg["seq_len"] // world, (rank + 1) * cfg["seq_len"] // world)
    local = [t[:, mine].contiguous() for t in inputs]  # this rank's tokens: (B, S/P, H, D)
    ulysses = UlyssesAttention(sdpa_attention, group)
    steps = {"ulysses": make_step(ulysses, local, causal=True)}
    positions = {"ulysses": mine, "deepspeed": mine}
    sent = {"ulysses": sent_bytes(steps["ulysses"], ulysses, local) + (model_bytes(cfg, world, 1, 4),)}
    for name, r in ring_rows(cfg, world).items():
        layout = SequenceLayout(cfg["seq_len"], world, r)
        attn = UlyssesRingAttention(*hybrid_groups(world, r), layout)
        positions[name] = layout.rank_positions(rank)
        zig = [t[:, positions[name]].contiguous() for t in inputs]  # the zig-zag tokens
        steps[name] = make_step(attn, zig, causal=True)
        sent[name] = sent_bytes(steps[name], attn, zig) + (model_bytes(cfg, world, r, 4),)
    ds = deepspeed_attention(group) if cfg["kv_heads"] >= world else None
    if ds is not None:
        steps["deepspeed"] = make_step(ds, local, causal=True)
    steps["local_shard"] = make_step(sdpa_attention, head_shard(inputs, cfg, rank, world), causal=True)
    steps["full_1proc"] = make_step(sdpa_attention, inputs, causal=True) if rank == 0 else None
    return steps, positions, sent


def rel_error(step, mine: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Worst of max|x - ref| / max|ref| over out, dq, dk, dv, all ranks (each checks its slice)."""
    worst = max(((got - ref[:, mine]).abs().max() / ref.abs().max()).item()
                for got, ref in zip(step(), reference))
    err = torch.tensor([worst])
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return err.item()


def time_round(steps: dict, order: list[str]) -> dict[str, float]:
    """One interleaved round: each implementation once, timed between barriers (ms)."""
    times = {}
    for name in order:
        dist.barrier()
        start = time.perf_counter()
        if steps[name] is not None:
            steps[name]()
        dist.barrier()  # the slowest rank defines the step time
        times[name] = (time.perf_counter() - start) * 1e3
    return times


def bench_config(cfg: dict[str, int], rank: int, world: int, repeats: int, warmup: int) -> None:
    inputs = global_inputs(cfg)
    steps, positions, sent = implementations(cfg, inputs, rank, world)
    reference = make_step(sdpa_attention, inputs, causal=True)()  # out, dq, dk, dv; every rank, once
    errors = {name: rel_error(steps[name], positions[name], reference)
              for name in ("ulysses", "deepspeed", "ring", "hybrid") if name in steps}
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate: no fixed position bias
        for name, ms in time_round(steps, order).items():
            if i >= warmup:
                samples[name].append(ms)
    if rank != 0:
        return
    for name in names:
        row = {"impl": name, **cfg, "world": world, "median_ms": round(statistics.median(samples[name]), 3),
               "samples_ms": [round(x, 3) for x in samples[name]]}
        if name in errors:
            row["rel_err_vs_full"] = errors[name]
        if name == "ulysses" and "deepspeed" in samples:
            # Same-round ratios cancel load that drifts between rounds (shared CI machines).
            ratios = [a / b for a, b in zip(samples["ulysses"], samples["deepspeed"])]
            row["median_ratio_vs_deepspeed"] = round(statistics.median(ratios), 4)
        if name in sent:
            row["sent_bytes_fwd"], row["sent_bytes_bwd"], row["model_bytes_fwd"] = sent[name]
        if name in sent and name != "ulysses":
            ratios = [a / b for a, b in zip(samples[name], samples["ulysses"])]
            row["median_ratio_vs_ulysses"] = round(statistics.median(ratios), 4)
        print(json.dumps(row), flush=True)
    if "deepspeed" not in steps:
        print(json.dumps({"impl": "deepspeed", **cfg, "world": world, "skipped":
                          "not importable" if cfg["kv_heads"] >= world else "needs kv_heads >= world"}),
              flush=True)


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=600))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        for text in args.configs:
            bench_config(parse_config(text), rank, world, args.repeats, args.warmup)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4, help="ranks to spawn (gloo, CPU)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="SEQxHQxHKVxDxB ...")
    parser.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (>= 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP/intra-op threads per rank")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the spawned ranks
    # The parent hosts the rendezvous store on a free port; the ranks connect to it.
    store = dist.TCPStore("127.0.0.1", 0, args.world, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=600))
    mp.start_processes(worker, args=(args.world, store.port, args), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
