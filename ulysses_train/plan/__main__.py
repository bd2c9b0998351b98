"""`python -m ulysses_train.plan [overrides] plan.gpus=N plan.gpu_mem_gib=M`: see cli/plan.py."""
import sys

from ..cli.plan import main

sys.exit(main())
