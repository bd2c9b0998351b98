"""Validation of the `plan.*` keys (config.PlanConfig): one `error: plan.<key>: ...` line each."""
from __future__ import annotations

import math

from .errors import require
from .schema import PlanConfig

FORMATS = ("table", "json")


def validate_plan(p: PlanConfig, need_gpus: bool = True) -> None:
    """Raise ConfigError for the first bad plan.* value. `need_gpus`: the plan CLI needs
    plan.gpus and plan.gpu_mem_gib; parallel.auto takes them from the job when 0."""
    if need_gpus:
        require(p.gpus > 0, "plan.gpus", f"must be a positive number of GPUs, got {p.gpus}; "
                "e.g. plan.gpus=8")
        require(p.gpu_mem_gib > 0 and math.isfinite(p.gpu_mem_gib), "plan.gpu_mem_gib",
                f"must be a positive number of GiB per GPU, got {p.gpu_mem_gib}; e.g. "
                "plan.gpu_mem_gib=80")
    else:
        require(p.gpus >= 0, "plan.gpus", f"must be >= 0 (0 = the world size), got {p.gpus}")
        require(p.gpu_mem_gib >= 0 and math.isfinite(p.gpu_mem_gib), "plan.gpu_mem_gib",
                f"must be >= 0 GiB (0 = what the device reports), got {p.gpu_mem_gib}")
    require(p.gpus_per_node > 0, "plan.gpus_per_node",
            f"must be a positive number, got {p.gpus_per_node}")
    gpus = p.gpus
    require(gpus == 0 or gpus <= p.gpus_per_node or gpus % p.gpus_per_node == 0,
            "plan.gpus", f"{gpus} GPUs are not a multiple of plan.gpus_per_node="
            f"{p.gpus_per_node}; plan whole nodes (or set plan.gpus_per_node)")
    for key in ("intra_node_gbps", "inter_node_gbps"):
        value = getattr(p, key)
        require(value > 0 and math.isfinite(value), f"plan.{key}",
                f"must be a positive bandwidth in Gbit/s per GPU, got {value}")
    require(p.tflops >= 0 and math.isfinite(p.tflops), "plan.tflops",
            f"must be >= 0 (0 = the default sustained rate), got {p.tflops}")
    require(p.format in FORMATS, "plan.format", f"{p.format!r} is not one of table, json")
