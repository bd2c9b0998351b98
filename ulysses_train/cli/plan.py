"""`python -m ulysses_train.plan [hydra overrides] plan.gpus=N plan.gpu_mem_gib=M [plan.*]`.

Composes the overrides exactly as train.py does (cli/compose.py), plans (plan/advice.py)
and prints a table, or with plan.format=json only JSON on stdout: `best` (the layout's knobs,
`peak_gib`, `step_s`, `command`) and `layouts` (each with `fits` and, when not, `why`); a
`parallel.shard_group` the user set appears as `shard_group` in each (search.py keeps it fixed).
Creates no run dir and no process group; imports no torch beyond what the config module needs.
Bad input: one line `error: <key>: ...` on stderr, exit 2.
"""
from __future__ import annotations

import json
from typing import Sequence

from ..config.errors import ConfigError
from ..plan.advice import plan
from ..plan.report import command, row, table
from . import compose


def main(argv: Sequence[str]) -> int:
    try:
        cfg = compose.compose(argv)
        best, layouts = plan(cfg, argv)
    except ConfigError as error:
        compose.fail(error, 0)
    cmd = command(best, argv, cfg.plan.gpus, cfg.plan.gpus_per_node)
    if cfg.plan.format == "json":
        print(json.dumps({"best": {**row(best), "command": cmd},
                          "layouts": [row(x) for x in layouts]}))
        return 0
    print(table(cfg, best, layouts, cmd))
    return 0
