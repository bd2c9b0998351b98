"""`python train.py [overrides]`, `ulysses-train [overrides]`, or under torchrun.

Hydra composes `configs/` on top of the dataclass schema; bad overrides and bad input files are
caught before Hydra's own reporting (compose.precheck), so the user sees one `error: <key>: ...`
line and exit code 2 (docs/configuration.md, "Errors"). Flags such as --help, --cfg job or
--multirun are Hydra's own business.
"""
from __future__ import annotations

import os
import sys

from ..config.errors import ConfigError
from . import compose
from . import job as job_exit


def launch() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them (RANK, WORLD_SIZE); (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def hydra_entry(run, args: list[str], *, job: str, auto: bool):
    """Run `run(config, run_dir) -> exit code` under Hydra's main with the command line `args`
    plus the non-zero ranks' overrides. `job`: Hydra's job name (its help header and log file
    `<job>.log`), which Hydra would otherwise take from this module's name."""
    import hydra

    rank, world = launch()
    compose.register()

    @hydra.main(config_path=compose.CONFIG_DIR, config_name="config", version_base="1.3")
    def _main(cfg) -> None:
        job_exit.run_job(cfg, run, rank, world, auto=auto)

    sys.argv = sys.argv[:1] + with_overrides(args, [f"hydra.job.name={job}",
                                                     *compose.rank_overrides(rank)])
    _main()


def with_overrides(args: list[str], ours: list[str]) -> list[str]:
    """`args` with `ours` placed just before the user's first override (at the end when there
    is none): Hydra's parser takes one contiguous run of overrides, before or after its flags
    (`train.steps=3 --cfg job`, `--cfg job train.steps=3`), and a user's own value of one of
    ours, later in the run, still wins."""
    first = next((i for i, a in enumerate(args) if not a.startswith("-") and "=" in a),
                 len(args))
    return args[:first] + ours + args[first:]


def main() -> None:
    """The training entry point (console script `ulysses-train`)."""
    rank, world = launch()
    args = sys.argv[1:]
    printing = compose.overrides_of(args)  # `--cfg job`: keys and types are checked too
    try:
        if not any(a.startswith("-") for a in args):
            compose.precheck(args, world)
        elif printing is not None:
            compose.compose(printing)
    except ConfigError as error:
        job_exit.fail(error, rank)
    warning = job_exit.restart_warning(os.environ)
    if warning and rank == 0:
        print(warning, file=sys.stderr, flush=True)

    def run(config, run_dir):
        from ..train.trainer import run as train

        return train(config, run_dir)

    hydra_entry(run, args, job="train", auto=True)
