"""Resume continues the data where it stopped.

docs/checkpoints.md claim: "a stopped run resumes bit-exact". The bug this catches: a resume that restores
weights, optimizer and step count but restarts the data stream at step 0 (or anywhere but the
saved step) — the loss stays plausible, so only the batches themselves show it. A forward
pre-hook records the input ids the model receives at every step of an uninterrupted run and of
a run stopped after step 3 and resumed; steps 4..N must get the same batches and losses.
"""
from __future__ import annotations

import torch

from support.common import cpu_dims, metrics_rows, small_config
from ulysses_train.train.trainer import Trainer

STEPS, STOP = 6, 3
MICRO_PER_STEP = 2  # global batch 4 / micro-batch 2


def _fit_recording(run_dir, **train) -> tuple[int, list[torch.Tensor]]:
    """(step the trainer started at, input ids of each step it trained, as (G, S))."""
    cfg = small_config(train={"steps": STEPS, **train}, checkpoint={"every": 0})
    trainer = Trainer(cfg, str(run_dir), cpu_dims())
    start, calls = trainer.step, []
    trainer.model.register_forward_pre_hook(lambda m, args: calls.append(args[0].clone()))
    trainer.fit()
    steps = [torch.cat(calls[i:i + MICRO_PER_STEP]) for i in range(0, len(calls), MICRO_PER_STEP)]
    return start, steps


def test_resume_continues_the_data_position(tmp_path):
    _, straight = _fit_recording(tmp_path / "straight")
    start, first = _fit_recording(tmp_path / "stopped", exit_after_steps=STOP)
    assert start == 0 and len(first) == STOP
    start, resumed = _fit_recording(tmp_path / "stopped")
    assert start == STOP and len(resumed) == STEPS - STOP
    for step, (got, want) in enumerate(zip(first + resumed, straight), start=1):
        assert torch.equal(got, want), f"step {step} trained on another batch"
    # The check can fail: a data stream restarted at 0 would give step 4 the batch of step 1.
    assert not torch.equal(straight[STOP], straight[0])
    losses = [[r["loss"] for r in metrics_rows(tmp_path / name)] for name in ("straight", "stopped")]
    assert losses[0] == losses[1]  # bit-exact
