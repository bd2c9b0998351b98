"""The plan's readable table: the fastest fitting layouts, one example of each reason the
others fail, the best layout's memory breakdown and step time, and its torchrun line."""
from __future__ import annotations

import shlex
from typing import Sequence

from ..config.architecture import head_dim, layer_windows
from ..config.overrides import hydra_value
from ..config.schema import Config, ModelConfig
from .advice import KNOBS
from .memory import GIB
from .search import GROUP_MARGIN, RING_MARGIN, Layout, chunks_of, group_twins, ring_of

SHOWN = 12


def _knobs(x: Layout) -> str:
    o = x.overrides
    off = "yes" if o["train.activation_offload"] else "no"
    return (f"{o['parallel.tp']:>3} {o['parallel.sp']:>4} {o.get('parallel.ring', 1):>4} "
            f"{o.get('parallel.ulysses_chunks', 1):>3} "
            f"{o['parallel.dp']:>4} {o['parallel.zero']:>4} {o['train.activation_checkpointing']:>9} "
            f"{off:>3} {o['train.mlp_chunk']:>5} {o['train.loss_chunk']:>5} "
            f"{o['train.micro_batch_size']:>3}")


def _line(x: Layout) -> str:
    if x.memory is None:
        return f"{_knobs(x)}  {'-':>7} {'-':>9} {'-':>10} {'-':>5}  {x.why}"
    tps = x.extra["tokens_per_s"]
    verdict = "fits" if x.fits else x.why
    return (f"{_knobs(x)}  {x.memory.total / GIB:7.1f} {x.time.step_s:9.3f} {tps:10,.0f} "
            f"{100 * x.extra['mfu']:4.1f}%  {verdict}")


def ring_note(best: Layout, layouts: list) -> list[str]:
    """Why a faster fitting ring layout was passed over (search.choose), or nothing."""
    fastest = next(x for x in layouts if x.fits)
    if fastest is best or ring_of(fastest) == 1:
        return []
    gain = 1 - fastest.time.step_s / best.time.step_s
    return [f"  passed over: ring={ring_of(fastest)} at {fastest.time.step_s:.3f} s is "
            f"{100 * gain:.1f} % faster, not the > {100 * RING_MARGIN:g} % a ring layout needs "
            "(its per-block LSE merge and kernel launches are not modelled; its CUDA path is "
            "untested)"]


def chunks_note(best: Layout, layouts: list) -> list[str]:
    """Why more head groups of the best layout were passed over (search.fewest_groups), or
    nothing."""
    faster = [x for x in group_twins(best, layouts) if x.fits and x.time.step_s < best.time.step_s
              and chunks_of(x) > chunks_of(best)]
    if not faster:
        return []
    top = min(faster, key=lambda x: x.time.step_s)
    gain = 1 - top.time.step_s / best.time.step_s
    return [f"  passed over: ulysses_chunks={chunks_of(top)} at {top.time.step_s:.3f} s is "
            f"{100 * gain:.1f} % faster, not the > {100 * GROUP_MARGIN:g} % more head groups "
            "need (their kernel launches and smaller kernels are not modelled)"]


def _group(cfg: Config) -> str:
    """The user's parallel.shard_group (kept fixed, search.py), unless it is the default."""
    n = cfg.parallel.shard_group
    return "" if n in (0, -1) else f", ZeRO sharded within groups of {n} (parallel.shard_group)"


def model_line(m: ModelConfig) -> str:
    """The model's shape as the plan prices it: layers (with the local/global mix of a
    sliding-window model), d, query / kv heads and their width `model.head_dim`, e.g.
    'gemma3_4b (34 layers: 29 sliding (W 1024) + 5 full, d 2560, 8 / 4 kv heads of 256)'."""
    windows = layer_windows(m)
    layers = f"{m.n_layers} layers"
    if any(windows):
        counts = {w: windows.count(w) for w in sorted(set(windows), reverse=True)}
        mix = " + ".join(f"{n} sliding (W {w})" if w else f"{n} full" for w, n in counts.items())
        layers += f": {mix}"
    return (f"{m.name} ({layers}, d {m.d_model}, {m.n_heads} / {m.n_kv_heads} kv heads of "
            f"{head_dim(m)})")


def table(cfg: Config, best: Layout, layouts: list, command: str) -> str:
    p, m = cfg.plan, cfg.model
    n_fit = sum(x.fits for x in layouts)
    head = (" tp   sp ring   G   dp zero        ac off   mlp  loss  mb  peakGiB    step_s      tok/s   MFU  "
            "fits / why not")
    out = [f"plan: {model_line(m)}, {cfg.data.seq_len:,} tokens x "
           f"{cfg.train.global_batch_size} rows per step on {p.gpus} GPUs of {p.gpu_mem_gib:g} GiB "
           f"({p.gpus_per_node} per node){_group(cfg)}; {len(layouts)} layouts, {n_fit} fit", "",
           head]
    out += [_line(x) for x in layouts if x.fits][:SHOWN]
    too_big = [x for x in layouts if x.memory is not None and not x.fits]
    out += [_line(x) for x in sorted(too_big, key=lambda x: x.memory.total)[:4]]
    seen = set()
    for x in layouts:  # one example of each reason train.py's validation gives
        if x.memory is None and x.why not in seen and len(seen) < SHOWN:
            seen.add(x.why)
            out.append(_line(x))
    mem = best.memory
    parts = ", ".join(f"{k} {v:.2f}" for k, v in mem.gib().items() if k not in ("phase", "total"))
    out += ["", "best: " + " ".join(f"{k.split('.')[1]}={hydra_value(v)}"
                                    for k, v in best.overrides.items()),
            f"  peak {mem.total / GIB:.2f} GiB per GPU at '{mem.phase}': {parts} (GiB)",
            f"  step {best.time.step_s:.3f} s = compute {best.time.compute_s:.3f} s + exposed "
            f"communication {best.time.exposed_comm_s:.3f} s"]
    for name, (t, how) in best.time.comm.items():
        out.append(f"    {name}: {t:.3f} s {how}")
    out.append(f"  {best.extra['tokens_per_s']:,.0f} tokens/s, MFU {100 * best.extra['mfu']:.1f} %")
    out += ring_note(best, layouts) + chunks_note(best, layouts) + group_note(cfg, best) + ["", command]
    return "\n".join(out)


def group_note(cfg: Config, best: Layout) -> list[str]:
    """When the user's parallel.shard_group is the best layout's whole dp x sp group: one
    group, no replicas, i.e. plain ZeRO (train.py accepts it; the user likely meant hybrid)."""
    n, o = cfg.parallel.shard_group, best.overrides
    if n in (0, -1) or o["parallel.zero"] == 0 or n != o["parallel.dp"] * o["parallel.sp"]:
        return []
    return [f"  note: parallel.shard_group={n} is this layout's whole dp x sp group (dp "
            f"{o['parallel.dp']} x sp {o['parallel.sp']}): one shard group, no replicas, plain "
            "ZeRO; fix parallel.sp / parallel.dp for a layout with replicas"]


def command(layout: Layout, overrides: Sequence[str], gpus: int, per_node: int) -> str:
    """The torchrun line that runs `layout`: the user's overrides (less plan.* and the knobs the
    plan sets) followed by the layout's knobs. Overrides with shell syntax in them (a list's
    brackets, spaces) are quoted, so the line pastes into bash or zsh as it is."""
    keep = [shlex.quote(o) for o in overrides if not o.lstrip("+~").startswith("plan.")
            and o.split("=", 1)[0].lstrip("+~") not in KNOBS]
    knobs = [f"{k}={hydra_value(v)}" for k, v in layout.overrides.items() if k != "parallel.dp"]
    nodes, local = (1, gpus) if gpus <= per_node else (gpus // per_node, per_node)
    launch = (f"torchrun --standalone --nproc_per_node={local}" if nodes == 1 else
              f"torchrun --nnodes={nodes} --nproc_per_node={local} --rdzv_backend=c10d "
              "--rdzv_endpoint=$HEAD_NODE:29500")
    return " ".join([launch, "train.py", *keep, *knobs])


def row(layout: Layout) -> dict:
    """One layout as JSON: its knobs (short names), fits/why, and the predictions."""
    out = {k.split(".")[1]: v for k, v in layout.overrides.items()}
    out.setdefault("ring", 1)
    out.setdefault("ulysses_chunks", 1)
    out["fits"] = layout.fits
    if layout.why:
        out["why"] = layout.why
    if layout.memory is not None:
        out["peak_gib"] = round(layout.memory.total / GIB, 3)
        out["memory_gib"] = layout.memory.gib()
        out["step_s"] = round(layout.time.step_s, 4)
        out["compute_s"] = round(layout.time.compute_s, 4)
        out["comm_s"] = {k: [round(t, 4), how] for k, (t, how) in layout.time.comm.items()}
        out["tokens_per_s"] = round(layout.extra["tokens_per_s"], 1)
        out["mfu"] = round(layout.extra["mfu"], 4)
    return out
