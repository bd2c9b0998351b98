"""Close a stage's record after its process ended, however it ended (called by gpu_check.sh).

    python -m gpu_check.finish OUT STAGE EXIT_CODE WALL_SECONDS LOG

A stage writes its own file and status; this covers the ends it cannot write: killed by its
time box (GNU timeout's 124, or 137 after the KILL that follows), a crash before its first write,
a segfault. A file left `running` keeps every result it had and becomes `timeout` or `error`.
Not passed: the last lines of the stage's log are attached. Imports nothing heavy (no torch).
"""
from __future__ import annotations

import json
import os
import sys

from gpu_check.common import write_record

TIMED_OUT = (124, 137)
LOG_LINES = 25


def close(out_dir: str, name: str, code: int, wall_s: float, log_path: str) -> dict:
    path = os.path.join(out_dir, f"{name}.json")
    data = {"stage": name, "status": "running"}
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except ValueError:  # torn or empty (atomic writes make this unlikely): start over
            data["note"] = f"{name}.json was not valid JSON"
    if data.get("status") == "running":
        data["status"] = "timeout" if code in TIMED_OUT else "error"
        data.setdefault("reason", f"time box of the stage ran out ({wall_s:.0f} s)"
                        if code in TIMED_OUT else f"the stage's process exited {code} "
                        "before recording a status")
    elif code not in (0, 1) and data.get("status") in ("passed", "skipped"):
        data.update(status="error", reason=f"exit {code} after recording {data['status']}")
    data.update(exit_code=code, wall_seconds=round(wall_s, 1))
    if data["status"] not in ("passed", "skipped") and os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            data["log_tail"] = f.read().splitlines()[-LOG_LINES:]
    write_record(path, data)
    return data


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit("error: gpu_check.finish: usage: OUT STAGE EXIT_CODE WALL_SECONDS LOG")
    out, name, code, wall, log = sys.argv[1:]
    close(out, name, int(code), float(wall), log)
