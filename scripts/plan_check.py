"""Print the memory model's CPU validation table (docs/benchmarks.md): predicted vs measured peak
tensor bytes of the trainer's step in the configurations of tests/plan/test_plan.py.

Usage: python scripts/plan_check.py   (one 4-rank gloo spawn, ~1 min on 2 cores)
       python scripts/plan_check.py 'NAME' ...   (only these one-process rows, no spawn)
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this checkout's package and tests, not whichever ulysses_train is installed
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "plan")]

from test_plan import FOUR_RANKS, SINGLE, _measure, _predicted, measure_single  # noqa: E402

from support.spawn import run_distributed  # noqa: E402


def _row(name: str, measured: int) -> str:
    sections = SINGLE.get(name) or FOUR_RANKS[name]
    world = 1 if name in SINGLE else 4
    pred = _predicted(sections, world)
    return (f"| {name} | {world} | {sections['data']['seq_len']} | {measured / 2**20:.2f} | "
            f"{pred / 2**20:.2f} | {100 * (pred / measured - 1):+.1f} % |")


if __name__ == "__main__":
    names = sys.argv[1:]
    unknown = [n for n in names if n not in SINGLE]
    if unknown:
        sys.exit(f"error: {unknown[0]}: not a one-process row; choose from {list(SINGLE)}")
    if names:
        merged = {name: measure_single(name) for name in names}
    else:
        merged = {}
        for result in run_distributed(_measure, 4, timeout=600):
            for name, peak in result.items():
                merged[name] = max(merged.get(name, 0), peak)
    print("| configuration | ranks | seq | measured MiB | predicted MiB | error |")
    print("|---|---|---|---|---|---|")
    for name in merged if names else {**SINGLE, **FOUR_RANKS}:
        print(_row(name, merged[name]))
