"""`python scripts/eval.py eval.checkpoint=PATH [overrides]`, `ulysses-eval ...`, or under
torchrun in the training layout: long-context evaluation of a checkpoint (evaluate/run.py).

The same config groups and overrides as training, the same one-line errors (exit 2). Writes
eval.json and eval.png into its run dir, by default runs/eval-<model>-<data>-<hash of the command
line>, so evaluating another checkpoint or with other settings never overwrites a previous
result (docs/evaluation.md).
"""
from __future__ import annotations

import hashlib
import sys

from ..config.errors import ConfigError
from . import compose, job
from .train import hydra_entry, launch


def checkpoint_as_init_from(args: list[str]) -> list[str]:
    """The override that makes `eval.checkpoint=PATH` the model source: `model.init_from=PATH`
    (architecture, weights, tokenizer). Raises ConfigError if both are given and differ."""
    path = next((a.split("=", 1)[1] for a in args if a.startswith("eval.checkpoint=")), "")
    given = next((a.split("=", 1)[1] for a in args if a.startswith("model.init_from=")), None)
    if not path:
        raise ConfigError("eval.checkpoint", "is required: give a run dir, a checkpoints/step_N "
                          "dir or a Hugging Face model dir")
    if given is not None and given != path:
        raise ConfigError("model.init_from", f"{given} differs from eval.checkpoint={path}; "
                          "give only eval.checkpoint (it is the model evaluated)")
    return [] if given is not None else [f"model.init_from={path}"]


def default_run_dir(args: list[str]) -> list[str]:
    """hydra.run.dir=runs/eval-... unless the user chose one; the hash covers every override
    (eval.checkpoint included), so each checkpoint and setting gets its own directory."""
    if any(a.startswith("hydra.run.dir=") for a in args):
        return []
    digest = hashlib.sha1("\0".join(sorted(args)).encode()).hexdigest()[:8]
    return [f"hydra.run.dir=runs/eval-${{model.name}}-${{data.name}}-{digest}"]


def main() -> None:
    """The evaluation entry point (console script `ulysses-eval`)."""
    rank, world = launch()
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # --help, --cfg job: Hydra's own business
        try:
            compose.compose(args)  # unknown keys and bad types first: `eval.chekpoint=` is a typo,
            #                        not a missing eval.checkpoint
            args += checkpoint_as_init_from(args)  # the evaluated model: architecture, weights
            args += default_run_dir(args)  # (precheck's resume checks then look at the eval dir)
            try:
                compose.precheck(args, world)
            except ConfigError as error:  # the user named eval.checkpoint: say that key
                key = "eval.checkpoint" if error.key == "model.init_from" else error.key
                if key == error.key and "model.init_from=" not in error.message:
                    raise  # nothing to re-word (e.g. a file: safe_read.RefusedPickle)
                raise type(error)(key, error.message.replace(  # keeps its exit code
                    "model.init_from=", "eval.checkpoint=")) from None
        except ConfigError as error:
            job.fail(error, rank)

    def run(config, run_dir):
        from ..evaluate.run import run as evaluate

        return evaluate(config, run_dir)

    # eval.checkpoint (as model.init_from) decides model.*, exactly as the pre-check did
    hydra_entry(run, args, job="eval", auto=False)
