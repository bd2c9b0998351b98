"""`python -m ulysses_train.export CHECKPOINT OUT_DIR [--dtype bf16|fp32]` (also `ulysses-export`):
the command-line entry point lives in cli/export.py; the conversion itself in hf/export.py."""
import sys

from .hf.export import main

if __name__ == "__main__":
    sys.exit(main())
