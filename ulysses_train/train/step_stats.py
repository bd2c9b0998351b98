"""A training step's numbers without host syncs: counted and kept on the device, read when due.

A step that does not log waits on the device for nothing (docs/architecture.md, "Host syncs"):
- the valid-label count the loss is divided by, and the span counts MFU prices, are summed and
  all-reduced on the device (`global_counts`); the divisor stays a tensor;
- the loss, the gradient norm and the guard's skip flag stay tensors (`StepResult`), read in one
  copy on a step that logs (`logging.every`, the last step, validation / eval steps, a save);
- on the other steps they are copied to the host without waiting and read one step later
  (`LaggedRead`), so a skip is still seen and counted (train/guards.py), and the stop agreement
  travels the same way (train/stop.py).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..config.architecture import layer_windows
from ..evaluate import training as eval_in_training
from ..model.flops import model_flops, span_count
from ..parallel.grad_sync import all_reduce_
from .metrics import span_sq_sum


def global_counts(micro, trainer) -> torch.Tensor:
    """(1 + windows,) int64 on the device: the whole global batch's valid labels, then its span
    count per distinct layer window (sorted; 0 = full), in one all-reduce over dp x sp (the
    `trainer`'s cfg, dims and dp_sp group; `micro`: its micro-batches of the step).

    The span count of a window is what model.flops.attention_flops prices: the squared span
    lengths (documents under data.document_mask, else rows) for full layers, fewer pairs for
    sliding ones (metrics.span_sq_sum). sp peers hold the same rows, so only sp rank 0 adds
    its spans (tp peers are outside dp x sp). Padding (the columns past seq_len) is neither a
    label nor a span: both count real tokens. No host sync (the all-reduce is a collective).
    """
    cfg, dims = trainer.cfg, trainer.dims
    windows = sorted(set(layer_windows(cfg.model)))
    device = micro[0][0].device
    counts = torch.zeros(1 + len(windows), dtype=torch.int64, device=device)
    for _, _, labels, _ in micro:
        counts[0] += (labels != -100).sum()
    if dims.local_rank("sp") == 0:
        seq = cfg.data.seq_len
        for _, _, labels, mask in micro:
            for i, w in enumerate(windows, start=1):
                if mask is None:  # rows of seq_len tokens: a count known on the host
                    counts[i] += labels.shape[0] * span_count(seq, w)
                else:
                    counts[i] += span_sq_sum(mask.document_ids[:, :seq], w)
    return all_reduce_(counts, trainer.dp_sp)


def due(cfg, has_val: bool, step: int, total: int) -> tuple[bool, bool, bool]:
    """(logs, validates, evaluates) at step `step` of `total`: host values, known before any
    read, so a step knows whether it reads its numbers at once."""
    last = step == total
    val_due = has_val and cfg.train.val_every > 0 and (step % cfg.train.val_every == 0 or last)
    eval_due = has_val and eval_in_training.due(cfg.eval, step, last)
    return step % cfg.logging.every == 0 or last or val_due or eval_due, val_due, eval_due


def flops_of(cfg, tokens: int, spans) -> int:
    """model_flops of `tokens` tokens with span counts `spans` (by `global_counts`' windows)."""
    windows = sorted(set(layer_windows(cfg.model)))
    return model_flops(cfg.model, tokens, {w: int(n) for w, n in zip(windows, spans)})


class LaggedRead:
    """A small device tensor copied to the host at one step and read at the next, without the
    host waiting for the device in between.

    `post(t, work)`: on CUDA, the stream waits for `work` (an async collective writing `t`;
    NCCL's wait does not block the host), then `t` goes to pinned host memory asynchronously
    behind an event. `take()` one step later waits on that event only, i.e. on work queued a
    step ago: the device is still busy with the step queued since. On the CPU (gloo) `take`
    waits for the collective and reads the tensor's memory as it is. Reads use numpy (host
    memory): a device tensor handed to numpy raises instead of syncing.
    """

    def __init__(self):
        self._pending = None

    def post(self, tensor: torch.Tensor, work=None) -> None:
        tensor = tensor.detach()
        if tensor.device.type == "cuda":
            if work is not None:
                work.wait()
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event, None)
        else:
            self._pending = (tensor, None, work)

    def take(self) -> np.ndarray | None:
        """What was posted (as a numpy copy), or None if nothing was; posting starts over."""
        if self._pending is None:
            return None
        host, event, work = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        if work is not None:
            work.wait()
        return host.numpy().copy()


class StepResult(Mapping):
    """What `Trainer.train_step` returns: a read-only mapping of loss, grad_norm, lr, n_tokens,
    flops and skipped. The device values (loss, grad_norm, skipped, flops) are read on the first
    access to one of them, in one copy (a host sync); lr and n_tokens are host values."""

    DEVICE_KEYS = ("loss", "grad_norm", "skipped", "flops")

    def __init__(self, cfg, step: int, tokens: int, lr: float, n_tokens: int,
                 loss: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor,
                 spans: torch.Tensor):
        self.cfg, self.step, self.tokens = cfg, step, tokens  # step: completed steps after it
        self.spans = spans  # (windows,) int64 on the device
        self.host = {"lr": lr, "n_tokens": n_tokens}
        # (3 + windows,) float64: one tensor, so reading it is one copy (spans < 2^53: exact)
        self.stats = torch.cat([torch.stack([loss.double(), grad_norm.double(),
                                             skipped.double()]), spans.double()])
        self.observed = False  # the trainer has counted it (guards.py)

    def fill(self, values) -> None:
        """Take the host copy of `stats` (from a read here or a `LaggedRead`)."""
        loss, grad_norm, skipped, *spans = (float(v) for v in values)
        self.host.update(loss=loss, grad_norm=grad_norm, skipped=bool(skipped),
                         flops=flops_of(self.cfg, self.host["n_tokens"], spans))

    def read(self) -> None:
        """Read the device values now (one host sync), unless they are on the host already."""
        if "loss" not in self.host:
            self.fill(self.stats.tolist())

    def __getitem__(self, key: str):
        if key in self.DEVICE_KEYS:
            self.read()
        return self.host[key]

    def __iter__(self):
        return iter(("loss", "grad_norm", "lr", "n_tokens", "flops", "skipped"))

    def __len__(self) -> int:
        return 6
