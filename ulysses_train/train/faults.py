"""Fault injection for tests (`debug.*`): the one home of every hook that makes a run fail on
purpose. Never set these keys in a real run; each defaults to off (0).

- `debug.nan_at_step` / `debug.nan_steps`: those steps' loss (so every gradient) is NaN, which
  the non-finite guard must skip (train/guards.py);
- `debug.crash_at_step`: the last rank dies (exit 1, no cleanup) right after that step, on
  torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT), so a restart can resume;
- `debug.crash_in_save_at_step`: the process hard-exits inside that step's save, with the files
  written but not committed;
- `debug.pause_in_save_at_step` / `debug.pause_in_save_before` (commit | latest): the save
  sleeps forever at that point, after writing `debug_paused` in the run dir, so a test can
  SIGKILL it exactly there.
The checkpoint manager knows none of this: it calls `save_point(step, point)` at its two points,
which the trainer wires to `Faults.save_point`.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from ..config.schema import DebugConfig
from ..utils.atomic import atomic_write

PAUSE_MARKER = "debug_paused"  # written in the run dir when debug.pause_in_save_* pauses
CRASH_IN_SAVE_EXIT = 17


class Faults:
    """The `debug.*` hooks of one rank of one run."""

    def __init__(self, debug: DebugConfig, run_dir: str, dims, log: Callable[[str], None] = print):
        self.debug, self.run_dir, self.log = debug, run_dir, log
        self.rank, self.world_size, self.is_main = dims.rank, dims.world_size, dims.is_main

    def poison_loss(self, step: int) -> bool:
        """Whether step `step` (1-based, as logged) gets a NaN loss."""
        d = self.debug
        return 0 < d.nan_at_step <= step < d.nan_at_step + d.nan_steps

    def after_step(self, step: int) -> None:
        """debug.crash_at_step: the last rank exits (1) right after `step`, first attempt only."""
        if (self.debug.crash_at_step == step and self.rank == self.world_size - 1
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            print(f"debug: crashing rank {self.rank} after step {step} (debug.crash_at_step)",
                  flush=True)
            os._exit(1)

    def save_point(self, step: int, point: str) -> None:
        """Called by the checkpoint manager before the `commit` (files written, not renamed into
        place) and before `latest` (committed, `latest` not yet moved): die or pause there."""
        d = self.debug
        if point == "commit" and d.crash_in_save_at_step == step:
            os._exit(CRASH_IN_SAVE_EXIT)
        if d.pause_in_save_at_step == step and d.pause_in_save_before == point:
            if self.is_main:
                atomic_write(os.path.join(self.run_dir, PAUSE_MARKER),
                             f"step {step} before {point}\n", durable=True)
            self.log(f"debug: paused in the save of step {step} before the {point}, until killed")
            while True:
                time.sleep(60)
