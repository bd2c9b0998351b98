"""Time checkpoint save / verify / load on rank 0: wraps the methods, then runs train.py as is.

Usage (from the repository root; docs/benchmarks.md has the measured figures):
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 scripts/bench_checkpoint.py \
        <train.py overrides>      # run once to save, and the same command again to verify+load
Prints `BENCH <what> <seconds> s` lines on stderr (rank 0; each call ends in a collective).
"""
import os
import runpy
import sys
import time

sys.path.insert(0, os.getcwd())
import ulysses_train.checkpoint.manager as checkpoint  # noqa: E402
import ulysses_train.checkpoint.manifest as manifest  # noqa: E402
import ulysses_train.checkpoint.resume as resume  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def timed(name, fn):
    def wrap(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if RANK == 0:
                print(f"BENCH {name} {time.perf_counter() - start:.2f} s", file=sys.stderr,
                      flush=True)
    return wrap


checkpoint.CheckpointManager.save = timed("save", checkpoint.CheckpointManager.save)
for name in ("verify", "load"):  # the resume side (checkpoint/resume.py)
    setattr(resume.Resume, name, timed(name, getattr(resume.Resume, name)))
manifest.write_manifest = timed("write_manifest", manifest.write_manifest)  # rank 0's manifest
sys.argv = [os.path.join(os.getcwd(), "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
