"""Numerical guards and reproducibility: non-finite steps are skipped, kernels made deterministic.

Non-finite steps. One bad batch (or an overflow) gives a NaN/inf loss or gradient norm, and a
single optimizer step with it poisons the weights and Adam's moments for good. So such a step is
skipped: no `optimizer.step()` — weights and optimizer state stay bit-for-bit as they were — but
the step still counts: the data position moves past the bad batch (it is not retried forever)
and the LR schedule advances, so the learning rate stays a function of the step, as everywhere
else (resume, `exit_after_steps`). Every rank decides alike without a collective of its own:
the loss is all-reduced and the gradient norm is global before the check. After
`train.max_skipped_steps` skips in a row the run stops itself, with a checkpoint (see
`Trainer._end_of_step`). Cost: none beyond reading the loss and norm on the host before the
optimizer step instead of after it (the loop read both every step already).

Determinism. On CPU a run is bit-reproducible as it is (same config and seed, same losses; the
data are a pure function of (seed, step) and init is seeded per parameter). GPUs need
`train.deterministic=true`: see `set_deterministic`.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from ..config.errors import RunStopped

# A skipped first step advances the schedule before any `optimizer.step()`, on purpose (see
# above); torch would warn that this skips a value of the schedule — it does not here (the LR
# is a function of the step), and the warning only alarms. A filter, not catch_warnings
# (not thread-safe, and async saves run in a thread).
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before "
                        r"`optimizer\.step\(\)`")


class NonFiniteGuard:
    """Counts skipped steps: in total (saved in checkpoints) and in a row (not saved)."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0

    def check(self, loss: float, grad_norm: float) -> bool:
        """True if this step must be skipped (its loss or gradient norm is not finite)."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        self.total += bad
        self.in_a_row = self.in_a_row + 1 if bad else 0
        return bad

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def stop_error(self, step: int, saved: str, lower_lr: str) -> RunStopped:
        """The exit-3 report. `lower_lr` is the command-line fragment that resumes this run
        with a lower learning rate (`hydra.run.dir=<this run> optim.lr=<half>`): the run dir
        must be given, since the default one hashes optim.lr and would start a new run."""
        first = step - self.in_a_row + 1
        return RunStopped("train.max_skipped_steps", (
            f"{self.in_a_row} steps in a row ({first}-{step}) had a non-finite loss or gradient "
            f"norm, so training stopped; the last good weights are saved in {saved} (at step "
            f"{step}, past the bad batches). To resume with a lower learning rate, rerun the "
            f"same command adding {lower_lr} (the config's optimizer settings win on resume); "
            "or check the data, or rerun the same command with a higher "
            "train.max_skipped_steps"))


def set_deterministic(enabled: bool) -> None:
    """Make GPU kernels bit-reproducible run to run (`train.deterministic=true`).

    - `torch.use_deterministic_algorithms(True)`: ops without a deterministic kernel raise
      instead of silently varying; SDPA's FlashAttention and memory-efficient backwards switch
      to their deterministic paths and cuDNN attention is not used (PyTorch's randomness notes).
    - `CUBLAS_WORKSPACE_CONFIG=:4096:8`, which cuBLAS reads when its first handle is made: so
      this must run before the first matmul on the GPU (`trainer.run` calls it before anything
      touches CUDA). It fixes cuBLAS's workspace per stream so split-K reductions repeat.
    - cuDNN: deterministic kernels only, no autotuning (`benchmark` picks by timing).
    Not covered: FlexAttention's compiled kernels (used with `data.document_mask` on GPU) are not
    verified deterministic, and NCCL reductions repeat only on the same topology and world size.
    Cost (not yet measured here, no GPU run): the deterministic attention backwards and the
    scatter/index kernels are slower, typically a few percent of step time.
    Calling with False changes nothing, so a library caller's own settings stay as they are.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
