"""What the planner advises: the layout knobs a command line fixes, the best layout for a
config, and — when none fits or none is valid — the one `error: <key>: ...` that says why and
what would fit. Shared by `python -m ulysses_train.plan` (cli/plan.py) and `parallel.auto`
(plan/auto.py); prints nothing.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Sequence

from ..config.errors import ConfigError
from ..config.parallel import validate_shard_group
from ..config.plan import validate_plan
from ..config.schema import Config, ParallelConfig
from ..config.validate import validate
from .memory import GIB
from .search import Layout, apply, divisors, search
from .timing import DEFAULT_TFLOPS, Links

KNOBS = ("parallel.tp", "parallel.sp", "parallel.ring", "parallel.dp", "parallel.zero",
         "train.activation_checkpointing", "train.activation_offload", "train.mlp_chunk",
         "train.loss_chunk", "train.micro_batch_size", "parallel.shard_group",
         "parallel.ulysses_chunks")


def explicit_knobs(overrides: Sequence[str], cfg: Config) -> dict:
    """The layout knobs the command line sets, with their typed values: constraints."""
    out = {}
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in KNOBS:
            section, name = key.split(".")
            out[key] = getattr(getattr(cfg, section), name)
    return out


def links_of(cfg: Config) -> Links:
    p = cfg.plan
    return Links(p.gpus_per_node, p.intra_node_gbps, p.inter_node_gbps)


def no_fit_error(cfg: Config, layouts: list, fixed: dict) -> ConfigError:
    """Why nothing fits, and what would: more GPUs, a shorter sequence, offload."""
    valid = [x for x in layouts if x.memory is not None]
    if not valid:
        return invalid_error(cfg, layouts, fixed)
    small = min(valid, key=lambda x: x.memory.total)
    gpus, mem, seq = cfg.plan.gpus, cfg.plan.gpu_mem_gib, cfg.data.seq_len
    hints = []
    for factor in (2, 4, 8, 16, 32, 64):
        if _fits(cfg, fixed, gpus=gpus * factor):
            hints.append(f"plan.gpus={gpus * factor}")
            break
    for factor in (2, 4, 8, 16, 32):
        if seq // factor and _fits(cfg, fixed, seq=seq // factor):
            hints.append(f"data.seq_len={seq // factor}")
            break
    if fixed.get("train.activation_offload") is False and _fits(
            cfg, {**fixed, "train.activation_offload": True}):
        hints.append("train.activation_offload=true")
    what = "; would fit: " + " or ".join(hints) if hints else ""
    return ConfigError("plan.gpu_mem_gib", f"no layout fits {gpus} GPUs of {mem:g} GiB "
                       f"(the smallest needs {small.memory.total / GIB:.2f} GiB){what}")


DEGREES = ("parallel.ring", "parallel.sp", "parallel.tp", "parallel.dp")


def invalid_error(cfg: Config, layouts: list, fixed: dict) -> ConfigError:
    """Why no layout passes train.py's validation, naming the key at fault: a non-positive
    degree; then whether the
    smallest world size the user's fixed parallel degrees need (tp x sp x dp, sp defaulting to
    the ring) divides plan.gpus; then those degrees validated on their own at that world size
    (parallel.shard_group and parallel.ulysses_chunks aside: they depend on dp and sp, which
    the plan chooses); then
    parallel.shard_group, if it alone refuses some layouts (shard_group_error); then the
    commonest error train.py's validation gave a candidate (for parallel.ulysses_chunks, one
    with sp / ring > 1, whose heads it does not split)."""
    gpus = cfg.plan.gpus
    ring = fixed.get("parallel.ring", 1)
    degrees = {"parallel.tp": fixed.get("parallel.tp", 1), "parallel.ring": ring,
               "parallel.sp": fixed.get("parallel.sp", max(ring, 1)),
               "parallel.dp": fixed.get("parallel.dp", 1)}
    if degrees["parallel.dp"] == -1:  # the rest of the world: at least 1
        degrees["parallel.dp"] = 1
    need = degrees["parallel.tp"] * degrees["parallel.sp"] * degrees["parallel.dp"]
    if min(degrees.values()) < 1:  # train.py's own "must be positive" line
        validate(apply(cfg, degrees), 1)
    if gpus % need:
        set_keys = [k for k in DEGREES if k in fixed]
        key = next((k for k in set_keys if gpus % max(1, fixed[k])), set_keys[0])
        tp, sp, dp = (degrees[k] for k in ("parallel.tp", "parallel.sp", "parallel.dp"))
        return ConfigError(key, f"{fixed[key]} needs a multiple of tp x sp x dp = {tp} x {sp} x "
                           f"{dp} = {need} GPUs (the ring divides sp), but there are {gpus}; "
                           f"choose degrees whose product divides {gpus}")
    try:
        validate(apply(cfg, {**degrees, "parallel.shard_group": 0,
                             "parallel.ulysses_chunks": 1}), need)
    except ConfigError as error:
        return error
    group_error = shard_group_error(cfg, layouts)
    if group_error is not None:
        return group_error
    refused = [x for x in layouts if x.error]
    # a G no layout takes: the reason of layouts with a Ulysses exchange to pipeline, not the
    # (commoner) "no all-to-all" of every sp/ring = 1 layout
    piped = [x for x in refused if x.error.key == "parallel.ulysses_chunks"
             and x.get("parallel.sp") > x.overrides.get("parallel.ring", 1)]
    errors = Counter((x.error.key, x.error.message) for x in piped or refused)
    if errors:
        return ConfigError(*errors.most_common(1)[0][0])
    return ConfigError("parallel", f"no layout of {gpus} GPUs passes train.py's validation")


def shard_group_error(cfg: Config, layouts: list) -> ConfigError | None:
    """The `parallel.shard_group` error when it is what refuses the layouts: some layout that
    train.py's validation accepts with the default group is refused with the user's. Names an
    example layout with train.py's own message and the group sizes those layouts would take
    (each checked by the same validation); None when the group is not at fault."""
    group, gpus = cfg.parallel.shard_group, cfg.plan.gpus
    if group in (0, -1):
        return None
    if group < 0:  # invalid whatever the layout: train.py's own line, not "suits no layout"
        try:
            validate_shard_group(cfg.parallel, 1)
        except ConfigError as error:
            return error
    refused = []
    for x in layouts:
        if x.error is None or x.error.key != "parallel.shard_group":
            continue
        try:
            validate(apply(cfg, {**x.overrides, "parallel.shard_group": 0}), gpus)
        except ConfigError:
            continue  # refused for another reason as well: not the group's fault alone
        refused.append(x)
    if not refused:
        return None
    # the example: a sharded layout (zero 2/3) with the largest dp x sp group, where most sizes fit
    x = max(refused, key=lambda x: (x.get("parallel.zero") > 0,
                                    x.get("parallel.dp") * x.get("parallel.sp")))
    groups = {(y.get("parallel.dp"), y.get("parallel.sp"), y.get("parallel.zero"))
              for y in refused if y.get("parallel.zero") > 0}
    sizes = sorted({k for dp, sp, zero in groups
                    for k in _valid_groups(cfg.parallel, dp, sp, zero)})
    shown = ("parallel.tp", "parallel.sp", "parallel.ring", "parallel.dp", "parallel.zero")
    knobs = " ".join(f"{k.split('.')[1]}={x.get(k)}" for k in shown if k in x.overrides)
    hint = f"; sizes these layouts take: {', '.join(map(str, sizes))}" if sizes else ""
    return ConfigError("parallel.shard_group", f"{group} suits no layout of {gpus} GPUs (e.g. "
                       f"{knobs}: {x.error.message}){hint}")


def _valid_groups(p: ParallelConfig, dp: int, sp: int, zero: int) -> list[int]:
    """The shard-group sizes train.py's check (config/parallel.py validate_shard_group) accepts at
    these dp, sp and zero."""
    out = []
    for k in divisors(dp * sp):
        try:
            validate_shard_group(replace(p, sp=sp, zero=zero, shard_group=k), dp)
        except ConfigError:
            continue
        out.append(k)
    return out


def _fits(cfg: Config, fixed: dict, gpus: int | None = None, seq: int | None = None) -> bool:
    trial = apply(cfg, {"data.seq_len": seq or cfg.data.seq_len})
    p = cfg.plan
    best, _ = search(trial, gpus or p.gpus, p.gpu_mem_gib, fixed, "cuda", links_of(cfg),
                     p.tflops or DEFAULT_TFLOPS)
    return best is not None


def plan(cfg: Config, overrides: Sequence[str]) -> tuple[Layout, list]:
    """(best, layouts) for the composed `cfg`; raises ConfigError when none fits."""
    validate_plan(cfg.plan)
    fixed = explicit_knobs(overrides, cfg)
    p = cfg.plan
    best, layouts = search(cfg, p.gpus, p.gpu_mem_gib, fixed, "cuda", links_of(cfg),
                           p.tflops or DEFAULT_TFLOPS)
    if best is None:
        raise no_fit_error(cfg, layouts, fixed)
    return best, layouts
