"""`python -m ulysses_train.plan [hydra overrides] plan.gpus=N plan.gpu_mem_gib=M [plan.*]`.

Composes the overrides exactly as train.py does (cli/compose.py), plans (plan/advice.py)
and prints a table, or with plan.format=json only JSON on stdout: `best` (the layout's knobs,
`peak_gib`, `step_s`, `command`) and `layouts` (each with `fits` and, when not, `why`); a
`parallel.shard_group` the user set appears as `shard_group` in each (search.py keeps it fixed).
Creates no run dir and no process group, and builds no model.
Bad input: one line `error: <key>: ...` on stderr, exit 2.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from ..config.errors import ConfigError
from ..plan.advice import plan
from ..plan.report import command, row, table
from . import compose, job

USAGE = """usage: python -m ulysses_train.plan [overrides] plan.gpus=N plan.gpu_mem_gib=M [plan.*]
       (or ulysses-plan ...)

Plans the layout (tp, sp, ring, dp, zero, activation checkpointing, offload, tiles,
micro-batch) that fits N GPUs of M GiB and trains fastest, for the model and data the
overrides (the same as train.py's) describe. parallel.* and train.* keys given on the command
line are kept fixed. plan.format=json prints {"best": ..., "layouts": [...]}; plan.gpus_per_node,
plan.intra_node_gbps, plan.inter_node_gbps and plan.tflops describe the cluster (docs/planner.md).
--cfg job prints the composed config instead.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """The planner's entry point (console script `ulysses-plan`); `argv` default: sys.argv[1:]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return 0
    printing = compose.overrides_of(argv)  # `--cfg job`: the composed config, as train.py does
    if printing is not None and len(printing) < len(argv):
        return print_config(printing)
    try:
        cfg = compose.compose(argv)
        best, layouts = plan(cfg, argv)
    except ConfigError as error:
        job.fail(error, 0)
    cmd = command(best, argv, cfg.plan.gpus, cfg.plan.gpus_per_node)
    if cfg.plan.format == "json":
        print(json.dumps({"best": {**row(best), "command": cmd},
                          "layouts": [row(x) for x in layouts]}))
        return 0
    print(table(cfg, best, layouts, cmd))
    return 0


def print_config(overrides: Sequence[str]) -> int:
    """`--cfg job`: print the config the overrides compose to (YAML), or its one-line error."""
    from omegaconf import OmegaConf

    try:
        cfg = compose.compose(overrides)
    except ConfigError as error:
        job.fail(error, 0)
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    return 0
