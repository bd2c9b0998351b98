"""Enumerate layouts as plain override dicts, keep the ones train.py accepts, predict each.

Validity is decided only by the project's own `config.validate` with the planned world size, so
a key another branch adds to the validation (a ring degree, a shard group) is respected as soon
as it exists: the plan never proposes what train.py refuses. A dimension whose config key does
not exist yet (`parallel.ring` before the ring branch) is skipped.

`parallel.ulysses_chunks` (G head groups of the Ulysses exchange) is searched per layout over
`config.parallel.valid_ulysses_chunks` of its heads per tp rank and Ulysses degree sp / ring
(1 alone without Ulysses); a G the user set is kept, and refused by `config.validate` where it
does not suit the layout.

`parallel.shard_group` (hybrid sharding) is not searched: the group is chosen by the cluster (one
node's GPUs), not by the model. A value the user set is kept fixed in every candidate (and shown
among its knobs); candidates where it is invalid (it must divide dp x sp, be a multiple of sp,
with zero 2 or 3) are refused by `config.validate` like any other, and the memory and time models
(shapes.py n_shard / replicas) use it for the rest.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from ..config.errors import ConfigError
from ..config.parallel import valid_ulysses_chunks
from ..config.schema import Config, ParallelConfig
from ..config.validate import validate
from .memory import GIB, Breakdown, predict
from .shapes import shapes_of
from .timing import Links, StepTime, mfu, step_time

TILE = 4096  # tokens per tile tried for train.mlp_chunk (ALST's TiledMLP default order)
# A ring layout (parallel.ring > 1) is chosen over the fastest fitting ring=1 layout only when its
# predicted step is more than this fraction shorter. Why a margin: the step-time model counts the
# ring's K/V passes but not its per-block log-sum-exp merge or the extra kernel launches per
# block, and the ring's CUDA path has not yet run on a GPU; a prediction a few % faster is inside
# that unmodelled cost, so the simpler, tested Ulysses-only layout is the safer recommendation.
RING_MARGIN = 0.05
# Likewise a larger parallel.ulysses_chunks is chosen over a smaller one of the same layout only
# when its step is more than this fraction shorter: the model prices the hidden all-to-all time
# but not a group's kernel launches or the lower efficiency of G times smaller kernels, and the
# pipeline has not yet run on a GPU.
GROUP_MARGIN = 0.01


@dataclass
class Layout:
    """One candidate: its overrides, whether it fits, and (when valid) its predictions."""

    overrides: dict
    fits: bool = False
    why: str = ""
    error: ConfigError | None = None  # train.py's validation error, when it refuses the layout
    memory: Breakdown | None = None
    time: StepTime | None = None
    extra: dict = field(default_factory=dict)

    def get(self, key: str):
        return self.overrides[key]


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def apply(cfg: Config, overrides: dict) -> Config:
    """A copy of `cfg` with dotted `overrides` set (e.g. {"parallel.tp": 2}): the config and
    each section named are copied (shallow), the other sections are `cfg`'s own objects (the
    search builds one per layout, thousands: a deep copy was most of its time)."""
    out = copy.copy(cfg)
    for key, value in overrides.items():
        section, name = key.split(".")
        if getattr(out, section) is getattr(cfg, section):
            setattr(out, section, copy.copy(getattr(cfg, section)))
        setattr(getattr(out, section), name, value)
    return out


def dimensions(cfg: Config, gpus: int, gpus_per_node: int, fixed: dict) -> dict:
    """The values tried for each knob; a key in `fixed` (set by the user) keeps its value, and
    a parallel.shard_group the user set (other than the default 0 / -1) joins as a fixed knob."""
    t = cfg.train
    has_ring = hasattr(ParallelConfig(), "ring")
    dims = {
        "parallel.tp": [k for k in divisors(gpus) if k <= gpus_per_node],
        "parallel.sp": divisors(gpus),
        "parallel.zero": [0, 2, 3],
        "train.activation_checkpointing": ["none", "selective", "full"],
        "train.activation_offload": [False, True],
        "train.mlp_chunk": sorted({0, t.mlp_chunk, TILE}),
        "train.loss_chunk": sorted({t.loss_chunk, TILE}),
        "train.micro_batch_size": sorted({1, t.micro_batch_size}),
    }
    if has_ring:
        dims["parallel.ring"] = divisors(gpus)
    for key, value in fixed.items():
        if key in dims or key == "parallel.dp" or (
                key == "parallel.shard_group" and value not in (0, -1)):
            dims[key] = [value]
    return dims


def candidates(dims: dict, gpus: int):
    """Override dicts over the product of `dims`, skipping combinations that are the same run
    (a tile >= the sequence, zero > 0 with nothing to shard, offload without checkpointing)."""
    keys = list(dims)
    for values in itertools.product(*(dims[k] for k in keys)):
        o = dict(zip(keys, values))
        ring = o.get("parallel.ring", 1)
        if min(o["parallel.tp"], o["parallel.sp"], ring) < 1:
            continue  # a non-positive degree the user fixed: cli.invalid_error names it
        if gpus % (o["parallel.tp"] * o["parallel.sp"]) or o["parallel.sp"] % ring:
            continue
        dp = gpus // (o["parallel.tp"] * o["parallel.sp"])
        if o.setdefault("parallel.dp", dp) != dp:
            continue
        if o["parallel.zero"] > 0 and dp * o["parallel.sp"] == 1 and len(dims["parallel.zero"]) > 1:
            continue
        if o["train.activation_offload"] and o["train.activation_checkpointing"] == "none":
            continue
        yield o


def head_group_choices(cfg: Config, o: dict, fixed: dict) -> list[int]:
    """The parallel.ulysses_chunks values tried for layout `o`: the user's, else every G the
    layout's Ulysses ranks can pipeline (`valid_ulysses_chunks` of the heads per tp rank over
    U = sp / ring), else 1 (U = 1, or heads that do not split: validation refuses those)."""
    if "parallel.ulysses_chunks" in fixed:
        return [fixed["parallel.ulysses_chunks"]]
    m, tp = cfg.model, o["parallel.tp"]
    u = o["parallel.sp"] // o.get("parallel.ring", 1)
    if u == 1 or m.n_heads % tp or m.n_kv_heads % tp:
        return [1]
    return valid_ulysses_chunks(m.n_heads // tp, m.n_kv_heads // tp, u) or [1]


def with_head_groups(cfg: Config, layouts, fixed: dict):
    """Each override dict of `layouts` once per G of `head_group_choices`."""
    for o in layouts:
        for g in head_group_choices(cfg, o, fixed):
            yield {**o, "parallel.ulysses_chunks": g}


def evaluate(cfg: Config, o: dict, gpus: int, mem_gib: float, device: str, links: Links,
             tflops: float) -> Layout:
    """Validate the layout as train.py would, then predict its memory and step time."""
    planned = apply(cfg, o)
    layout = Layout(o)
    try:
        validate(planned, gpus)
    except ConfigError as error:
        layout.why, layout.error = str(error), error
        return layout
    sh = shapes_of(planned, gpus, device)
    layout.memory = predict(sh, device)
    layout.time = step_time(planned, sh, gpus, tflops, links, device)
    need = layout.memory.total / GIB
    layout.fits = need <= mem_gib
    if not layout.fits:
        layout.why = f"needs {need:.1f} GiB of {mem_gib:g}"
    tokens = planned.train.global_batch_size * planned.data.seq_len
    layout.extra = {"tokens_per_s": tokens / layout.time.step_s,
                    "mfu": mfu(planned, layout.time.step_s, gpus)}
    return layout


def ring_of(layout: Layout) -> int:
    return layout.overrides.get("parallel.ring", 1)


def choose(layouts: list) -> Layout | None:
    """The best of `layouts` (sorted fastest fitting first): the fastest fitting ring=1 layout,
    unless the fastest fitting layout is a ring whose step is more than RING_MARGIN shorter, or
    no ring=1 layout fits (then the fastest ring); then its fewest head groups within
    GROUP_MARGIN (`fewest_groups`). None when nothing fits."""
    fitting = [x for x in layouts if x.fits]
    if not fitting:
        return None
    plain = next((x for x in fitting if ring_of(x) == 1), None)
    fastest = fitting[0]
    if plain is None or fastest.time.step_s < (1 - RING_MARGIN) * plain.time.step_s:
        return fewest_groups(fastest, fitting)
    return fewest_groups(plain, fitting)


def fewest_groups(best: Layout, fitting: list) -> Layout:
    """The fitting layout equal to `best` but for the smallest parallel.ulysses_chunks whose step
    is within GROUP_MARGIN of `best`'s (`best` itself when none is)."""
    twins = [x for x in group_twins(best, fitting) if x.time.step_s <= best.time.step_s / (1 - GROUP_MARGIN)]
    return min(twins, key=lambda x: (chunks_of(x), x.time.step_s), default=best)


def chunks_of(layout: Layout) -> int:
    return layout.overrides.get("parallel.ulysses_chunks", 1)


def group_twins(layout: Layout, layouts: list) -> list:
    """The layouts of `layouts` equal to `layout` in every override but parallel.ulysses_chunks
    (`layout` itself included when it is among them)."""
    def rest(x: Layout) -> dict:
        return {k: v for k, v in x.overrides.items() if k != "parallel.ulysses_chunks"}
    mine = rest(layout)
    return [x for x in layouts if rest(x) == mine]


def search(cfg: Config, gpus: int, mem_gib: float, fixed: dict, device: str = "cuda",
           links: Links | None = None, tflops: float = 360.0) -> tuple[Layout | None, list]:
    """Every layout, fastest fitting first (then the smallest peak); the best is chosen by
    `choose` (the fastest that fits, preferring ring=1 unless a ring is > RING_MARGIN faster).
    Returns (best or None, layouts)."""
    links = links or Links(8, 7200.0, 400.0)
    dims = dimensions(cfg, gpus, links.gpus_per_node, fixed)
    layouts = [evaluate(cfg, o, gpus, mem_gib, device, links, tflops)
               for o in with_head_groups(cfg, candidates(dims, gpus), fixed)]
    layouts.sort(key=lambda x: (not x.fits, x.memory is None,
                                x.time.step_s if x.time else 0.0,
                                x.memory.total if x.memory else 0))
    return choose(layouts), layouts
