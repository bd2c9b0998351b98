"""The parity machinery of the whole-run tests: two strict 8-step curves, the config of a curve
in a layout, and a rank's training run (tests/train/test_trainer_parallel.py explains why the
settings make every input matter; test_trainer_sequence.py, test_hsdp.py and
tests/e2e/test_multinode.py share them)."""
from __future__ import annotations

import os

from support.common import UnevenLabels, metrics_rows, small_config
from ulysses_train.parallel import ParallelDims
from ulysses_train.train.trainer import Trainer

STEPS = 8
# Measured (8-step curves, every layout below, fp32 CPU): correct layouts agree with the one
# process to <= 1.8e-7 relative in the loss and <= 3.1e-7 in grad_norm. Tolerances ~30x that;
# the planted bugs move the curves by >= 1e-3 (see the report of issue 10, part 8).
LOSS_RTOL, NORM_RTOL = 5e-6, 1e-5
STRICT = {"model": {"init_std": 0.2}, "optim": {"eps": 1e-3}, "data": {"seq_len": 64}}
CURVES = {
    "causal": {"train": {"grad_clip": 0.0}},
    "documents": {"model": {"tie_embeddings": True}, "data": {"document_mask": True},
                  "train": {"grad_clip": 1.0}},
    # Issue 20: local and global layers (sliding, sliding, full) with documents; the window (8)
    # is shorter than the ~16-token synthetic documents, so it cuts inside them.
    "sliding": {"model": {"n_layers": 3, "sliding_window": 8,
                          "layer_types": ["sliding_attention", "sliding_attention",
                                          "full_attention"]},
                "data": {"document_mask": True}, "train": {"grad_clip": 0.0}},
}
BOTH = ("causal", "documents")  # what most layouts run; "sliding" only where it is asked for


def curve_config(curve: str, parallel: dict, micro: int, train: dict | None = None, steps=STEPS):
    sections = {name: {**STRICT.get(name, {}), **CURVES[curve].get(name, {})}
                for name in ("model", "optim", "data", "train")}
    sections["train"].update(steps=steps, micro_batch_size=micro, **(train or {}))
    return small_config(parallel=parallel, checkpoint={"every": 0}, **sections)


def train_run(cfg, dims, run_dir, uneven=True, trainer=None):
    """The metrics rows of `cfg` trained in `run_dir` (`trainer`: one already built for them)."""
    trainer = trainer or Trainer(cfg, run_dir, dims)
    if uneven:
        trainer.data = UnevenLabels(trainer.data)
    trainer.fit()
    return metrics_rows(run_dir) if dims.is_main else None


def layout_rank(rank, world, parallel, micro, train, curves, run_dir, seq_len=None,
                 train_fn=None):
    """One rank's results per curve; `seq_len` and `train_fn` (default `train_run`) let
    test_trainer_sequence.py run its lengths and its counting trainer through the same loop."""
    out = {}
    for curve in curves:
        cfg = curve_config(curve, parallel, micro, train)
        if seq_len is not None:
            cfg.data.seq_len = seq_len
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        dims.build_mesh()
        out[curve] = (train_fn or train_run)(cfg, dims, os.path.join(run_dir, curve))
    return out


def train_until(rank, world, parallel, steps, exit_after, run_dir):
    cfg = curve_config("causal", parallel, 2, {"exit_after_steps": exit_after}, steps=steps)
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    train_run(cfg, dims, run_dir, uneven=False)
