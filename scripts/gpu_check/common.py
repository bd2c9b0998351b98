"""What every stage shares: the mode, the stage's JSON file, curve comparison, a trainer run.

A stage's file `OUT/<stage>.json` is rewritten (atomically) each time a result arrives, with
`status: running` until the stage ends; `finish.py` turns a file the time box left `running`
into `timeout`, so what a stage measured before it was stopped is never lost.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# this checkout's package and its test helpers (tests/support: the parity configs and spawner)
for _path in (os.path.join(ROOT, "tests"), ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

MODES = ("full", "quick", "dry")
STATUSES = ("passed", "failed", "skipped", "error", "timeout", "running")


def mode() -> str:
    """GPU_CHECK_MODE: full (default) | quick (speed at 8k and 32k only) | dry (CPU miniature)."""
    value = os.environ.get("GPU_CHECK_MODE", "full")
    if value not in MODES:
        raise SystemExit(f"error: GPU_CHECK_MODE: {value!r} is not one of {MODES}")
    return value


def dry() -> bool:
    return mode() == "dry"


def device():
    """The device the check measures: cuda, or cpu in the dry run."""
    import torch

    return torch.device("cpu" if dry() else "cuda")


class Stage:
    """The JSON file of one stage: `set(**fields)` writes it at once; `finish` sets the status.

    Fields: stage, mode, status (passed | failed | skipped | error | timeout | running), reason
    (why, when not passed), seconds, and the stage's own results.
    """

    def __init__(self, name: str, out_dir: str):
        self.path = os.path.join(out_dir, f"{name}.json")
        self.t0 = time.monotonic()
        self.data = {"stage": name, "mode": mode(), "status": "running"}
        self.write()

    def set(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def finish(self, status: str, reason: str | None = None) -> None:
        assert status in STATUSES, status
        self.data.update(status=status, seconds=round(time.monotonic() - self.t0, 1))
        if reason:
            self.data["reason"] = reason
        self.write()

    def write(self) -> None:
        write_record(self.path, self.data)


def write_record(path: str, data: dict) -> None:
    """Replace `path` with `data` as JSON atomically (tmp + rename, as ulysses_train.utils.atomic
    does; not imported from there because the package imports torch, which finish.py and
    summary.py, run between stages, do without)."""
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(path + ".tmp", path)


def run_stage(name: str, body) -> int:
    """`body(stage)` with `OUT` from argv[1]; an exception becomes status `error` with its
    traceback's last lines in the file (exit 1), so one broken stage leaves a readable record."""
    if len(sys.argv) != 2:
        sys.stderr.write(f"error: gpu_check.{name}: usage: python -m gpu_check.{name} OUT\n")
        return 2
    stage = Stage(name, sys.argv[1])
    try:
        body(stage)
    except Exception as exc:  # noqa: BLE001 — the record is the point; the shell goes on
        traceback.print_exc()
        stage.set(traceback="".join(traceback.format_exc()).splitlines()[-12:])
        stage.finish("error", f"{type(exc).__name__}: {exc}"[:400])
    if stage.data["status"] == "running":
        stage.finish("error", "the stage returned without a status")
    return 0 if stage.data["status"] in ("passed", "skipped") else 1


def finish_cases(stage, cases: dict, what: str) -> None:
    """Finish `stage` passed, or failed naming the cases whose record is not ok (`what`: how
    a failed case failed, e.g. "not equal to one rank")."""
    bad = [name for name, c in cases.items() if not c["ok"]]
    stage.finish("failed" if bad else "passed", f"{what}: {', '.join(bad)}" if bad else None)


def rel_dev(got: float, want: float) -> float:
    """|got - want| / |want| (inf where want is 0 and got is not)."""
    if got == want:
        return 0.0
    return abs(got - want) / abs(want) if want else float("inf")


def compare_curves(got: list[dict], want: list[dict], tolerances: dict, report=()) -> dict:
    """Per-step relative deviations of `got`'s metrics rows from `want`'s.

    `tolerances` {key: rtol or [rtol per step]}: `ok` when both curves have the same steps and
    every step of every such key is within its tolerance. `report`: keys whose deviations are
    recorded but not judged. Rows: the trainer's metrics.jsonl rows (step, loss, grad_norm)."""
    steps_got, steps_want = [r["step"] for r in got], [r["step"] for r in want]
    out = {"steps": steps_want, "ok": steps_got == steps_want and bool(steps_want)}
    for key in (*tolerances, *report):
        devs = [rel_dev(g[key], w[key]) for g, w in zip(got, want)]
        out[key] = {"max_rel_dev": max(devs, default=None),
                    "rel_dev_by_step": [float(f"{d:.3g}") for d in devs]}
        if key in tolerances:
            tol = tolerances[key]
            tols = list(tol) if isinstance(tol, (list, tuple)) else [tol] * len(devs)
            out[key].update(tolerance=tol, ok=bool(devs) and len(tols) >= len(devs)
                            and all(d <= t for d, t in zip(devs, tols)))
            out["ok"] = out["ok"] and out[key]["ok"]
    return out


def curve_rows(cfg, dims, run_dir: str, uneven: bool = False) -> list[dict] | None:
    """The metrics rows of `cfg` trained for its `train.steps` in `run_dir` on `dims` (rank 0's;
    None elsewhere), without the final checkpoint: these checks compare numbers, and DCP over
    gloo with CUDA tensors is a layout no user runs (the one-GPU stage saves as training does)."""
    from support.curves import train_run
    from ulysses_train.train.trainer import Trainer

    class NoSave(Trainer):
        def save(self) -> str:
            return "(not saved: gpu_check)"

    trainer = NoSave(cfg, run_dir, dims) if dims.distributed else Trainer(cfg, run_dir, dims)
    return train_run(cfg, dims, run_dir, uneven=uneven, trainer=trainer)


def one_rank(device):
    """The one-process layout on `device` (no process group)."""
    from ulysses_train.parallel import ParallelDims

    return ParallelDims(tp=1, sp=1, dp=1, world_size=1, rank=0, device=device)
