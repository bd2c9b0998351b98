"""Long-context evaluation of a checkpoint: `python scripts/eval.py eval.checkpoint=PATH [overrides]`
or `torchrun --nproc_per_node=N scripts/eval.py eval.checkpoint=PATH parallel.sp=N ...`.

The same config groups and overrides as train.py (configs/), the same one-line errors (exit 2),
the same launch in the training layout. Writes eval.json and eval.png into its run dir, by
default runs/eval-<model>-<data>-<hash of the command line>, so evaluating another checkpoint
or with other settings never overwrites a previous result (README: "Long-context evaluation").
"""
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

try:
    from ulysses_train.cli import compose as cli
except ImportError as import_error:
    if not str(import_error).startswith("ulysses_train needs torch"):
        raise
    print(f"error: {import_error}", file=sys.stderr, flush=True)  # one line, not a traceback
    sys.exit(1)
from ulysses_train.config.errors import ConfigError  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
cli.register()


def default_run_dir(args) -> list:
    """hydra.run.dir=runs/eval-... unless the user chose one; the hash covers every override
    (eval.checkpoint included), so each checkpoint and setting gets its own directory."""
    if any(a.startswith("hydra.run.dir=") for a in args):
        return []
    digest = hashlib.sha1("\0".join(sorted(args)).encode()).hexdigest()[:8]
    return [f"hydra.run.dir=runs/eval-${{model.name}}-${{data.name}}-{digest}"]


@hydra.main(config_path=CONFIGS, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ulysses_train.evaluate.run import run

    # eval.checkpoint (as model.init_from) decides model.*, exactly as the pre-check did
    cli.run_job(cfg, run, RANK, WORLD_SIZE, auto=False)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # --help, --cfg job: Hydra's own business
        from ulysses_train.evaluate.run import checkpoint_as_init_from

        try:
            args += checkpoint_as_init_from(args)  # the evaluated model: architecture, weights
            args += default_run_dir(args)  # (precheck's resume checks then look at the eval dir)
            try:
                cli.precheck(args, WORLD_SIZE)
            except ConfigError as error:  # the user named eval.checkpoint: say that key
                key = "eval.checkpoint" if error.key == "model.init_from" else error.key
                raise type(error)(key, error.message.replace(  # keeps its exit code
                    "model.init_from=", "eval.checkpoint=")) from None
        except ConfigError as error:
            cli.fail(error, RANK)
        sys.argv = sys.argv[:1] + args
    sys.argv += cli.rank_overrides(RANK)
    main()
