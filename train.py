"""Entry point: `python train.py [overrides]` or `torchrun --nproc_per_node=N train.py [overrides]`
(also the console script `ulysses-train`). Everything happens in ulysses_train/cli/train.py."""
import sys

try:
    from ulysses_train.cli.train import main
except ImportError as import_error:
    if not str(import_error).startswith("ulysses_train needs torch"):
        raise
    print(f"error: {import_error}", file=sys.stderr, flush=True)  # one line, not a traceback
    sys.exit(1)

if __name__ == "__main__":
    main()
