"""`python -m ulysses_train.plan [overrides] plan.gpus=N plan.gpu_mem_gib=M`: see plan/cli.py."""
import sys

from ..cli.plan import main

sys.exit(main(sys.argv[1:]))
