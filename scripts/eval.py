"""Long-context evaluation of a checkpoint: `python scripts/eval.py eval.checkpoint=PATH [overrides]`
or `torchrun --nproc_per_node=N scripts/eval.py eval.checkpoint=PATH parallel.sp=N ...` (also the
console script `ulysses-eval`). Everything happens in ulysses_train/cli/eval.py."""
import sys

try:
    from ulysses_train.cli.eval import main
except ImportError as import_error:
    if not str(import_error).startswith("ulysses_train needs torch"):
        raise
    print(f"error: {import_error}", file=sys.stderr, flush=True)  # one line, not a traceback
    sys.exit(1)

if __name__ == "__main__":
    main()
