"""Entry point: `python train.py [overrides]` or `torchrun --nproc_per_node=N train.py [overrides]`.

Hydra composes `configs/` on top of the dataclass schema; we convert the result to plain
dataclasses and hand them to the trainer. Bad overrides are caught before Hydra's own reporting so
the user sees one `error: <key>: ...` line and exit code 2 (docs/architecture.md §2).
"""
import os
import sys

import hydra
from omegaconf import DictConfig

try:
    from ulysses_train.cli import compose as cli
except ImportError as import_error:
    if not str(import_error).startswith("ulysses_train needs torch"):
        raise
    print(f"error: {import_error}", file=sys.stderr, flush=True)  # one line, not a traceback
    sys.exit(1)
from ulysses_train.config.errors import ConfigError

RANK = int(os.environ.get("RANK", "0"))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
cli.register()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ulysses_train.train.trainer import run

    cli.run_job(cfg, run, RANK, WORLD_SIZE)


if __name__ == "__main__":
    args = sys.argv[1:]
    # Flags such as --help, --cfg job or --multirun are Hydra's own business.
    if not any(a.startswith("-") for a in args):
        try:
            cli.precheck(args, WORLD_SIZE)
        except ConfigError as error:
            cli.fail(error, RANK)
    warning = cli.restart_warning(os.environ)
    if warning and RANK == 0:
        print(warning, file=sys.stderr, flush=True)
    sys.argv += cli.rank_overrides(RANK)
    main()
