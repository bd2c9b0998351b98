"""Measure a training step's peak tensor memory on this rank, to check the memory model.

The step is the trainer's own (`Trainer.train_step`): the same parallelize (DDP, FSDP2 or the
plain reduction), the same batch sharding (parallel/batching.py), the same division by the
global token count, clipping and AdamW — so `parallel.auto` checks the program training runs.
The data are synthetic tokens (memory does not depend on their values) in a throwaway run dir.
One step runs first so that AdamW's moments exist (steady state, what the model predicts); the
second is measured with torch's `MemTracker` (torch.distributed._tools.mem_tracker), which counts
the bytes of every live tensor storage — parameters, gradients, optimizer state, activations,
temporaries — not RSS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile

from ..config.schema import Config
from ..train.trainer import Trainer


def measurable(cfg: Config) -> Config:
    """`cfg` as the measurement runs it: synthetic tokens, no checkpoint, log, eval or wandb."""
    r = dataclasses.replace
    return r(cfg, data=r(cfg.data, name="synthetic"),
             checkpoint=r(cfg.checkpoint, resume="never", every=0),
             train=r(cfg.train, val_every=0), eval=r(cfg.eval, every=0),
             logging=r(cfg.logging, progress=False,
                       wandb=r(cfg.logging.wandb, mode="disabled")))


class _NoHook:
    def remove(self) -> None:
        pass


@contextlib.contextmanager
def _module_tracker_tolerates_no_grad():
    """MemTracker's module tracker hooks every module input that requires grad; inside the tiled
    MLP's autograd.Function forward (no_grad) a chunk view requires grad but has no grad_fn,
    which its hook registration refuses. Such inputs get no hook (they have no backward)."""
    import torch.distributed._tools.mod_tracker as mod_tracker

    real = mod_tracker.register_multi_grad_hook

    def tolerant(tensors, fn, **kwargs):
        try:
            return real(tensors, fn, **kwargs)
        except AssertionError:  # "Expected gradient function to be set": no backward to track
            return _NoHook()

    mod_tracker.register_multi_grad_hook = tolerant
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = real


def measured_peak(cfg: Config, dims) -> int:
    """Peak live tensor bytes of this rank during the second of two training steps of the
    trainer built for `cfg` in layout `dims` (mesh built). Collective when distributed."""
    from torch.distributed._tools.mem_tracker import MemTracker

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(measurable(cfg), run_dir, dims)
        trainer.train_step()
        tracker = MemTracker()
        tracker.track_external(trainer.model, trainer.optimizer)
        with _module_tracker_tolerates_no_grad(), tracker:
            trainer.train_step()
        trainer.ckpt.close()
    snapshot = tracker.get_tracker_snapshot("peak")
    return max(v["Total"] for v in snapshot.values())
