"""`python -m ulysses_train.export CHECKPOINT OUT_DIR ...`: the entry point is cli/export.py."""
import sys

from .cli.export import main

if __name__ == "__main__":
    sys.exit(main())
