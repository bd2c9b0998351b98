"""Benchmark the Ulysses attention layer (forward + backward) against its baselines.

    python scripts/bench_ulysses.py                      # 4 gloo ranks on CPU, default configs
    python scripts/bench_ulysses.py --world 1 --configs 256x8x8x32x1 --repeats 3   # smoke check
    python scripts/bench_ulysses.py --chunks 2,4 --skip ring,hybrid,full_1proc   # head groups only

Implementations, timed on the same inputs (each rank's sequence slice of one global q/k/v):
- `ulysses`: our `UlyssesAttention(sdpa_attention, group)`;
- `ulysses_g{G}` for each G of `--chunks` (default 2,4) that the head counts allow
  (`valid_ulysses_chunks`; others get a `skipped` line): `PipelinedUlyssesAttention(sdpa_attention,
  group, G)`, the same exchange over G pipelined head groups (parallel/ulysses_pipeline.py), with
  a `chunks` field. Its bytes sent must equal the `ulysses` row's, forward and backward (each
  head travels once each way): the script raises AssertionError otherwise;
- `deepspeed`: `deepspeed.sequence.layer.DistributedAttention` with the same local kernel, when
  deepspeed is importable and supports the head counts (it needs kv_heads >= world);
- `local_shard`: every rank runs the local kernel on `(B, S, H/P, D)` with no communication —
  the compute floor of Ulysses, so ulysses - local_shard is the price of the all-to-alls;
- `full_1proc`: rank 0 alone runs full attention on the whole `(B, S, H, D)` (the others wait);
- `ring`: `UlyssesRingAttention` with ring = P (pure ring attention, zig-zag layout);
- `hybrid`: `UlyssesRingAttention` with ring = 2 and Ulysses = P/2 (USP), when P >= 4.
Ulysses, head-group, ring and hybrid rows also report `sent_bytes_fwd` / `sent_bytes_bwd` per
rank (counted at the all-to-all and P2P calls, the own chunk of an all-to-all not counted: with
equal splits over P ranks, (P-1)/P of every all-to-all buffer) next to `model_bytes_fwd`,
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
Memory: `peak_bytes` is the peak of one extra, untimed forward + backward of each row under
torch's `MemTracker` (torch.distributed._tools.mem_tracker), per rank, max over ranks (the
`full_1proc` row: rank 0's). Counted: the storages of every tensor an op creates inside the
step (all-to-all send/receive buffers, attention outputs and LSE, tensors saved for backward,
gradients, the loss product `out * grad` and the output gradient it hands the layer), and the
row's own inputs q, k, v and output gradient, registered with `track_external` so every row
counts them alike (for `local_shard` and `full_1proc`: its head-sharded or whole inputs). Not counted: scratch inside
one op (SDPA's internal buffers), gloo's internal copies, autograd metadata, allocator caching
and fragmentation (on a GPU the reserved memory is larger), anything alive before the step.
Head-group rows add `peak_ratio_vs_ulysses`.
Times here are CPU times of gloo ranks sharing the cores: they are not evidence of overlap
(the script prints a note saying so). The overlap the head groups are for shows only on a GPU,
as exposed all-to-all time in a profiler trace; this script does not measure it.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_ulysses_counters
from bench_ulysses_counters import (  # noqa: E402
    max_over_ranks,
    model_bytes,
    peak_bytes,
    peak_snapshot,  # noqa: F401 (tests call it through this module)
    sent_bytes,
)

from ulysses_train.config.parallel import valid_ulysses_chunks  # noqa: E402
from ulysses_train.model.attention import sdpa_attention  # noqa: E402
from ulysses_train.parallel.layout import SequenceLayout  # noqa: E402
from ulysses_train.parallel.ring import UlyssesRingAttention  # noqa: E402
from ulysses_train.parallel.ulysses import UlyssesAttention  # noqa: E402
from ulysses_train.parallel.ulysses_pipeline import PipelinedUlyssesAttention  # noqa: E402

NOT_EVIDENCE = ("note: times are CPU times of gloo ranks sharing this machine's cores; they are not "
                "evidence of all-to-all/compute overlap (that needs a GPU profiler trace)")
SKIPPABLE = ("deepspeed", "ring", "hybrid", "local_shard", "full_1proc")  # --skip; G rows: --chunks
DEFAULT_CONFIGS = ["1024x16x16x64x1", "512x32x32x64x2", "2048x32x8x64x1", "2048x16x4x64x1", "1024x16x2x64x1"]


def parse_config(text: str) -> dict[str, int]:
    """'SEQxHQxHKVxDxB' -> dict, e.g. '2048x16x4x64x1'."""
    seq, hq, hkv, dim, batch = (int(x) for x in text.split("x"))
    return {"seq_len": seq, "heads": hq, "kv_heads": hkv, "head_dim": dim, "batch": batch}


def parse_chunks(text: str) -> list[int]:
    """'2,4' -> [2, 4]; '' -> []. argparse turns the ValueError into a usage error."""
    values = [int(x) for x in text.split(",") if x.strip()]
    if any(g < 1 for g in values):
        raise ValueError(f"head-group counts must be positive: {text!r}")
    return values


def global_inputs(cfg: dict[str, int], seed: int = 0) -> list[torch.Tensor]:
    """q, k, v and an output gradient for the whole sequence, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    b, s, d = cfg["batch"], cfg["seq_len"], cfg["head_dim"]
    shapes = [(b, s, cfg["heads"], d), (b, s, cfg["kv_heads"], d), (b, s, cfg["kv_heads"], d),
              (b, s, cfg["heads"], d)]
    return [torch.randn(*shape, generator=g) for shape in shapes]


def make_step(fn, inputs: list[torch.Tensor], **kw):
    """A closure running fn forward + backward on leaf copies of q/k/v; returns out, dq, dk, dv.
    `step.inputs`: its q, k, v leaves and output gradient (for `peak_bytes`)."""
    q, k, v, grad_out = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad_out = grad_out.clone()  # own storage: a view would make `peak_bytes` count its base

    def step() -> list[torch.Tensor]:
        for t in leaves:
            t.grad = None
        out = fn(*leaves, **kw)
        (out * grad_out).sum().backward()  # scalar loss: same gradients as out.backward(grad_out)
        return [out.detach()] + [t.grad for t in leaves]

    step.inputs = [*leaves, grad_out]
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


def group_chunks(cfg, world: int, chunks) -> tuple[list[int], list[int]]:
    """(G values > 1 of `chunks` the head counts allow at P = world, the others > 1)."""
    valid = valid_ulysses_chunks(cfg["heads"], cfg["kv_heads"], world)
    wanted = [g for g in chunks if g > 1]
    return [g for g in wanted if g in valid], [g for g in wanted if g not in valid]


def ulysses_rows(cfg, local, world: int, chunks) -> tuple[dict, dict]:
    """The `ulysses` row and a `ulysses_g{G}` row per allowed G of `chunks` on this rank's
    tokens `local`: (name -> step, name -> (sent fwd, sent bwd, model fwd) bytes).
    Raises AssertionError when a head-group row sends other bytes than the `ulysses` row."""
    layers = {"ulysses": UlyssesAttention(sdpa_attention, dist.group.WORLD)}
    for g in group_chunks(cfg, world, chunks)[0]:
        layers[f"ulysses_g{g}"] = PipelinedUlyssesAttention(sdpa_attention, dist.group.WORLD, g)
    steps, sent = {}, {}
    for name, layer in layers.items():
        steps[name] = make_step(layer, local, causal=True)
        sent[name] = sent_bytes(steps[name], layer, local) + (model_bytes(cfg, world, 1, 4),)
        if sent[name][:2] != sent["ulysses"][:2]:  # not `assert`: must hold under python -O too
            raise AssertionError(f"{name} sent {sent[name][:2]} bytes (fwd, bwd), the one-exchange "
                                 f"layer {sent['ulysses'][:2]}: head groups must not change them")
    return steps, sent


def implementations(cfg, inputs, rank: int, world: int, chunks=(), skip=()):
    """name -> step closure (None where this rank takes no part), this rank's token positions per
    implementation, and the Ulysses, head-group and ring rows' sent bytes. Rows named in `skip`
    are not built (`ulysses`, the reference of the others, always is)."""
    group = dist.group.WORLD
    mine = torch.arange(rank * cfg["seq_len"] // world, (rank + 1) * cfg["seq_len"] // world)
    local = [t[:, mine].contiguous() for t in inputs]  # this rank's tokens: (B, S/P, H, D)
    steps, sent = ulysses_rows(cfg, local, world, chunks)
    positions = {name: mine for name in [*steps, "deepspeed"]}
    for name, r in ring_rows(cfg, world).items():
        if name in skip:
            continue
        layout = SequenceLayout(cfg["seq_len"], world, r)
        attn = UlyssesRingAttention(*hybrid_groups(world, r), layout)
        positions[name] = layout.rank_positions(rank)
        zig = [t[:, positions[name]].contiguous() for t in inputs]  # the zig-zag tokens
        steps[name] = make_step(attn, zig, causal=True)
        sent[name] = sent_bytes(steps[name], attn, zig) + (model_bytes(cfg, world, r, 4),)
    ds = deepspeed_attention(group) if cfg["kv_heads"] >= world and "deepspeed" not in skip else None
    if ds is not None:
        steps["deepspeed"] = make_step(ds, local, causal=True)
    if "local_shard" not in skip:
        steps["local_shard"] = make_step(sdpa_attention, head_shard(inputs, cfg, rank, world), causal=True)
    if "full_1proc" not in skip:
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


def bench_config(cfg: dict[str, int], rank: int, world: int, repeats: int, warmup: int,
                 chunks=(), skip=()) -> None:
    inputs = global_inputs(cfg)
    steps, positions, sent = implementations(cfg, inputs, rank, world, chunks, skip)
    reference = make_step(sdpa_attention, inputs, causal=True)()  # out, dq, dk, dv; every rank, once
    errors = {name: rel_error(steps[name], positions[name], reference)
              for name in steps if name not in ("local_shard", "full_1proc")}
    peaks = {name: max_over_ranks(peak_bytes(steps[name])) for name in steps}  # same order everywhere
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
        row["peak_bytes"] = peaks[name]
        if name.startswith("ulysses_g"):
            row["chunks"] = int(name.removeprefix("ulysses_g"))
            row["peak_ratio_vs_ulysses"] = round(peaks[name] / peaks["ulysses"], 4)
        print(json.dumps(row), flush=True)
    for g in group_chunks(cfg, world, chunks)[1]:
        print(json.dumps({"impl": f"ulysses_g{g}", **cfg, "world": world, "chunks": g, "skipped":
                          f"G must be one of {valid_ulysses_chunks(cfg['heads'], cfg['kv_heads'], world)}"}),
              flush=True)
    if "deepspeed" not in steps and "deepspeed" not in skip:
        print(json.dumps({"impl": "deepspeed", **cfg, "world": world, "skipped":
                          "not importable" if cfg["kv_heads"] >= world else "needs kv_heads >= world"}),
              flush=True)


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=600))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        for text in args.configs:
            bench_config(parse_config(text), rank, world, args.repeats, args.warmup, args.chunks,
                         args.skip)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4, help="ranks to spawn (gloo, CPU)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="SEQxHQxHKVxDxB ...")
    parser.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds; the median is reported (5+ for a stable figure)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP/intra-op threads per rank")
    parser.add_argument("--chunks", type=parse_chunks, default=[2, 4],
                        help="head-group counts G for the ulysses_g{G} rows, e.g. 2,4 ('' for none)")
    parser.add_argument("--skip", type=lambda text: set(text.split(",")), default=set(),
                        help="rows not to run, e.g. ring,hybrid,full_1proc (ulysses always runs)")
    args = parser.parse_args()
    if args.skip - set(SKIPPABLE):
        parser.error(f"--skip: unknown rows {sorted(args.skip - set(SKIPPABLE))}; choose from {SKIPPABLE}")
    print(NOT_EVIDENCE, file=sys.stderr, flush=True)  # stdout stays one JSON object per line
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the spawned ranks
    # The parent hosts the rendezvous store on a free port; the ranks connect to it.
    store = dist.TCPStore("127.0.0.1", 0, args.world, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=600))
    mp.start_processes(worker, args=(args.world, store.port, args), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
