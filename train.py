"""Entry point: `python train.py [overrides]` or `torchrun --nproc_per_node=N train.py [overrides]`.

Hydra composes `configs/` on top of the dataclass schema; we convert the result to plain
dataclasses and hand them to the trainer. Bad overrides are caught before Hydra's own reporting so
the user sees one `error: <key>: ...` line and exit code 2 (docs/architecture.md §2).
"""
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

try:
    from ulysses_train import cli
except ImportError as import_error:
    if not str(import_error).startswith("ulysses_train needs torch"):
        raise
    print(f"error: {import_error}", file=sys.stderr, flush=True)  # one line, not a traceback
    sys.exit(1)
from ulysses_train.errors import ConfigError

RANK = int(os.environ.get("RANK", "0"))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
cli.register()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ulysses_train.trainer import run

    try:
        # model.init_from decides model.* exactly as the pre-check did (hf/config.py)
        overrides = HydraConfig.get().overrides.task
        config = cli.apply_init_from(OmegaConf.to_object(cfg), cli.explicit_model_keys(overrides))
        config = cli.apply_auto(config, overrides, WORLD_SIZE, log=RANK == 0)  # parallel.auto
        code = run(config, HydraConfig.get().runtime.output_dir)
    except ConfigError as error:  # bad input (exit 2), or a run that stopped itself (exit 3)
        cli.fail(error, RANK)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops politely, with a save)
        if RANK == 0:
            print("aborted: rerun the same command to resume from the newest checkpoint",
                  file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as error:  # a peer rank stalled or died: one line, not a traceback
        from ulysses_train.parallel.mesh import describe_collective_failure

        line = describe_collective_failure(error, RANK, WORLD_SIZE, cfg.parallel.timeout_s)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code)


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
