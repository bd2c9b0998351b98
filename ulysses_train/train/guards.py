"""Numerical guards and reproducibility: non-finite steps are skipped, kernels made deterministic.

Non-finite steps. One bad batch (or an overflow) gives a NaN/inf loss or gradient norm, and a
single optimizer step with it poisons the weights and Adam's moments for good. So such a step is
skipped: weights and optimizer state stay bit-for-bit as they were — but the step still counts:
the data position moves past the bad batch (it is not retried forever) and the LR schedule
advances, so the learning rate stays a function of the step, as everywhere else (resume,
`exit_after_steps`). Every rank decides alike without a collective of its own: the loss is
all-reduced and the gradient norm is global before the check.

Without a host round trip: the decision is a device bool (`is_bad`) and the skip happens on the
device (`optim.step_unless`: fused AdamW's `found_inf`, or a masked update on CPU), so the host
never waits for the loss. The host learns of a skip later (`observe`): at once on a step that
logs (it reads the loss anyway), else one step later, when the trainer reads the step's
numbers posted without waiting (`step_stats.LaggedRead`). So a skipped step's warning and row
come one step late on a step that does not log, and `train.max_skipped_steps` in a row stop the
run after the step that follows the last of them (with a checkpoint, `Trainer._end_of_step`);
with `logging.every=1` both happen at the step itself, as before.
Determinism. On CPU a run is bit-reproducible as it is (same config and seed, same losses; the
data are a pure function of (seed, step) and init is seeded per parameter). GPUs need
`train.deterministic=true`: see `set_deterministic`.
"""
from __future__ import annotations

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
        self.last_bad = 0  # the step the last skip observed was

    @staticmethod
    def is_bad(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Device bool scalar: True if this step must be skipped (its loss or gradient norm is
        not finite). No host sync: `optim.step_unless` acts on it on the device."""
        return ~(torch.isfinite(loss) & torch.isfinite(grad_norm))

    def observe(self, step: int, bad: bool) -> None:
        """Count step `step` once its outcome is on the host (steps observed in order). Once
        exhausted it stays so: a step read one step late (train/step_stats.py) may be observed
        good after the limit was reached, and must not undo the stop."""
        self.total += bad
        if self.exhausted:
            return
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if bad:
            self.last_bad = step

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def stop_error(self, step: int, saved: str, lower_lr: str) -> RunStopped:
        """The exit-3 report; `step` is the data position saved (the last skip observed may be
        a step before it, `observe`). `lower_lr` is the command-line fragment that resumes
        this run with a lower learning rate (`hydra.run.dir=<this run> optim.lr=<half>`): the
        run dir must be given, since the default one hashes optim.lr and would start a new
        run."""
        last = self.last_bad or step
        first = last - self.in_a_row + 1
        return RunStopped("train.max_skipped_steps", (
            f"{self.in_a_row} steps in a row ({first}-{last}) had a non-finite loss or gradient "
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
