"""Print the memory model's CPU validation table (docs/benchmarks.md): predicted vs measured peak
tensor bytes of the trainer's step in the configurations of tests/plan/test_plan.py.

Usage: python scripts/plan_check.py   (one 4-rank gloo spawn, ~1 min on 2 cores)
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this checkout's package and tests, not whichever ulysses_train is installed
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "plan")]

from test_plan import FOUR_RANKS, SINGLE, _measure, _predicted  # noqa: E402

from support.spawn import run_distributed  # noqa: E402

if __name__ == "__main__":
    merged = {}
    for result in run_distributed(_measure, 4, timeout=600):
        for name, peak in result.items():
            merged[name] = max(merged.get(name, 0), peak)
    print("| configuration | ranks | seq | measured MiB | predicted MiB | error |")
    print("|---|---|---|---|---|---|")
    for name, sections in {**SINGLE, **FOUR_RANKS}.items():
        world = 1 if name in SINGLE else 4
        pred, meas = _predicted(sections, world), merged[name]
        print(f"| {name} | {world} | {sections['data']['seq_len']} | {meas / 2**20:.2f} | "
              f"{pred / 2**20:.2f} | {100 * (pred / meas - 1):+.1f} % |")
