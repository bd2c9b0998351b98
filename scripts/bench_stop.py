"""How long a polite stop takes: SIGTERM to one `python train.py` mid-run, then time until the
checkpoint is committed (its `latest` pointer names it) and until the process has exited.

    python scripts/bench_stop.py [--repeats 3]

Prints one JSON line per repeat: seconds from the signal to the committed checkpoint and to
the exit, and the exit code (0 expected). Tiny model, CPU, synthetic data: this measures our
stop path (finish the step, agree, save, exit), not the model.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["model.n_layers=2", "model.d_model=64", "model.n_heads=8", "model.n_kv_heads=2",
        "model.ffn_hidden=128", "data=synthetic", "data.seq_len=128", "train.steps=100000",
        "train.global_batch_size=2", "train.micro_batch_size=1", "logging.every=1",
        "logging.wandb.mode=disabled", "logging.progress=false", "checkpoint.every=0"]


def _rows(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def measure_once(run_dir: str) -> dict:
    """Start a run, wait for its third logged step, SIGTERM it, time the checkpoint and exit."""
    proc = subprocess.Popen([sys.executable, "train.py", *ARGS, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, latest = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "checkpoints",
                                                                          "latest")
    while _rows(metrics) < 3:
        if proc.poll() is not None:
            raise SystemExit(f"train.py exited early with {proc.returncode}")
        time.sleep(0.01)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    saved = None
    while proc.poll() is None:
        if saved is None and os.path.exists(latest):
            saved = time.perf_counter() - t0
        time.sleep(0.002)
    exited = time.perf_counter() - t0
    saved = saved if saved is not None else (exited if os.path.exists(latest) else None)
    return {"to_checkpoint_s": None if saved is None else round(saved, 3),
            "to_exit_s": round(exited, 3), "exit_code": proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure_once(os.path.join(tmp, "run"))), flush=True)


if __name__ == "__main__":
    main()
