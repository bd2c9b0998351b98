"""`parallel.auto=true`: train.py takes the plan's best layout for the job it finds itself in.

World size: the launched one. Device memory: plan.gpu_mem_gib when given, else the GPU's total
memory, or on CPU the host's available memory divided by the ranks on this host. Layout knobs
the user set on the command line are constraints (search.py keeps them fixed).
"""
from __future__ import annotations

import os
from typing import Sequence

from ..config.overrides import hydra_value
from ..config.plan import validate_plan
from ..config.schema import Config
from .advice import explicit_knobs, no_fit_error
from .memory import GIB
from .search import apply, search
from .timing import DEFAULT_TFLOPS, Links


def host_available_gib() -> float:
    """MemAvailable from /proc/meminfo (Linux), in GiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    raise OSError("no MemAvailable in /proc/meminfo")


def device_memory(world_size: int) -> tuple[str, float]:
    """("cuda" | "cpu", GiB per rank) of the machine this rank runs on."""
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        return "cuda", torch.cuda.get_device_properties(local).total_memory / GIB
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return "cpu", host_available_gib() / max(1, local_ranks)


def resolve(cfg: Config, overrides: Sequence[str], world_size: int) -> tuple[Config, str]:
    """`cfg` with the best layout applied and a log line saying what was chosen, or `cfg`
    unchanged and "" without parallel.auto. Raises ConfigError (nothing fits, bad plan.*)."""
    if not cfg.parallel.auto:
        return cfg, ""
    p = cfg.plan
    validate_plan(p, need_gpus=False)
    kind, found = device_memory(world_size)
    mem = p.gpu_mem_gib or found
    per_node = p.gpus_per_node if kind == "cuda" else world_size
    fixed = explicit_knobs(overrides, cfg)
    planned = apply(cfg, {"plan.gpus": world_size, "plan.gpu_mem_gib": mem})
    best, layouts = search(planned, world_size, mem, fixed, kind,
                           Links(per_node, p.intra_node_gbps, p.inter_node_gbps),
                           p.tflops or DEFAULT_TFLOPS)
    if best is None:
        raise no_fit_error(planned, layouts, fixed)
    chosen = " ".join(f"{k}={hydra_value(v)}" for k, v in best.overrides.items())
    line = (f"parallel.auto: {chosen} (predicted peak {best.memory.total / GIB:.3g} GiB of "
            f"{mem:.3g} per rank on {kind}; {sum(x.fits for x in layouts)} of {len(layouts)} "
            "layouts fit)")
    return apply(cfg, best.overrides), line
