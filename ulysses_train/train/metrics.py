"""What a run reports: metrics.jsonl, throughput, memory, MFU, the progress bar and wandb rows
(starting wandb, and the mode it can start in, is train/wandb_run.py's).

Only rank 0 writes (docs/architecture.md §2): other ranks construct a `Reporter` with
`enabled=False`. `metrics.jsonl` holds one JSON object per logged step; on resume the rows after the
resumed step are dropped first so the file reads as one clean curve.

Nothing here may end a run: a metric is an observation, not a reason to lose a multi-day job. An
impossible value (MFU above 1, a non-finite number in a step that was not skipped) is written
as it is and warned about once; a failing write (metrics.jsonl on a full disk, wandb) is warned
about once and the run goes on (`Reporter`).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import torch

from ..data.batch import document_positions
from ..utils.atomic import atomic_write
from .wandb_run import start_wandb

# Dense bf16 peak FLOP/s by device-name fragment (vendor datasheets, no sparsity). First match
# wins, so the more specific names come first.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu_of(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak (both whole-job).

    Never raises: a value above 1 is impossible (the FLOPs formula, the token count or the peak
    is wrong) but is returned as computed; `Reporter.log` warns about it once.
    """
    return flops_per_token * tokens_per_s / peak


def span_sq_sum(document_ids: torch.Tensor, window: int = 0) -> torch.Tensor:
    """The span count (`model.flops.span_count`: 2 * visible pairs - tokens) of `(B, S)` rows
    for a layer whose queries see at most `window` keys (0 = full causal): int64 scalar, on the
    ids' device. Documents are the runs of equal ids of a row (`data.batch.document_positions`;
    none spans two rows); a full layer over a one-document row gives S^2, so for window 0 this
    is the sum of the documents' squared lengths. Attention costs this many x 6 Hq D per layer
    (`model.flops.attention_flops`).

    The token at position k of its document sees min(k + 1, W) keys (causal x document x
    window), and adds 2 min(k + 1, W) - 1 to the count: summed over a document of n tokens that
    is n^2 without a window (the sum of the first n odd numbers) and span_count(n, W) with one,
    without a bincount or a host sync.
    """
    seen = document_positions(document_ids) + 1  # (B, S): keys visible without a window
    if window > 0:
        seen = seen.clamp(max=window)
    return (2 * seen - 1).sum()


def peak_mem_gib(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def peak_mem_by_rank(device: torch.device, dims) -> list[float]:
    """Every rank's `peak_mem_gib`, by rank (ranks differ, e.g. rank 0 logs): an all-gather
    over the world (a collective: every rank calls it at the same step)."""
    mine = torch.tensor([peak_mem_gib(device)], device=device)
    if not dims.distributed:
        return [float(mine)]
    every = [torch.zeros_like(mine) for _ in range(dims.world_size)]
    torch.distributed.all_gather(every, mine)  # (1,) per rank -> world x (1,)
    return [round(float(t), 4) for t in every]


class MetricsFile:
    """Append-only `metrics.jsonl` that can be cut back to a step on resume."""

    def __init__(self, path: str):
        self.path = path

    def truncate_after(self, step: int) -> int:
        """Drop rows with `step` > the given step (atomically); return how many were dropped."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:  # a row torn by a crash mid-write: drop it
                continue
        atomic_write(self.path, "".join(kept))
        return len(lines) - len(kept)

    def append(self, row: dict) -> None:
        # Strict JSON: a skipped step's NaN/inf loss or norm is written as null (the row's
        # `skipped` field says why), so jq and other strict readers can parse every line.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                 for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")


class Reporter:
    """Rank 0's view of progress: rows to metrics.jsonl and wandb, a tqdm bar, log lines.

    No method raises into the training loop: each failure (a write, wandb, the bar) and each
    impossible value is printed as one `warning:` line on stderr, once per kind, and skipped.
    """

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True, wandb_cfg=None, config_dict: dict | None = None):
        self.enabled = enabled
        self.file = MetricsFile(os.path.join(run_dir, "metrics.jsonl"))
        self.bar = None
        self.wandb = None
        self.warned: set[str] = set()
        self._bar_loss = "-"  # the last loss read (`tick`)
        if not enabled:
            return
        # Rows past the step we start from are a killed run's (at 0: a run killed before its
        # first checkpoint): drop them, so the file reads as one curve. Hydra makes the run
        # dir; library callers may not have.
        self._safely("metrics.jsonl", lambda: (os.makedirs(run_dir, exist_ok=True),
                                               self.file.truncate_after(start_step)))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self.wandb = self._safely("wandb", start_wandb, run_dir, wandb_cfg,
                                      config_dict or {})

    def warn_once(self, kind: str, text: str) -> None:
        """Print `warning: <text>` on stderr the first time `kind` comes up, then never again."""
        if not self.enabled or kind in self.warned:
            return
        self.warned.add(kind)
        self.info(f"warning: {text}")

    def _safely(self, kind: str, fn, *args):
        """fn(*args), or None with a once-per-kind warning if it raises (never re-raised:
        a report must not end the run)."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - third-party code: any type can come out
            self.warn_once(kind, f"{kind} failed ({type(exc).__name__}: {exc}); training "
                                 "goes on, this is reported once")
            return None

    def info(self, text: str) -> None:
        """Print a line on stderr, above the bar; never raises."""
        if not self.enabled:
            return
        try:
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
                return
        except Exception:  # noqa: BLE001 - the bar failing: say it without the bar
            pass
        try:
            print(text, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - stderr itself failing: nowhere left to say it
            pass

    def tick(self, loss: float | None, tokens_per_s: float) -> None:
        """Advance the bar one step; `loss` None on a step that does not log (the loss stays on
        the device there, trainer.py), and the bar keeps the last one read."""
        if self.bar is not None:
            if loss is not None:
                self._bar_loss = f"{loss:.4f}"
            self._safely("progress bar", lambda: (
                self.bar.update(1),
                self.bar.set_postfix(loss=self._bar_loss,
                                     tok_s=f"{tokens_per_s:,.0f}", refresh=False)))

    def log(self, row: dict, total: int | None = None) -> None:
        """Append `row` to metrics.jsonl and wandb and, given `total`, print its log line."""
        if not self.enabled:
            return
        self._check(row)
        self._safely("metrics.jsonl", self.file.append, row)
        if self.wandb is not None:
            values = {k: v for k, v in row.items() if v is not None}
            self._safely("wandb.log", lambda: self.wandb.log(values, step=row["step"]))
        if total is not None:
            self._safely("log line", lambda: self.info(format_row(row, total)))

    def _check(self, row: dict) -> None:
        """Warn once about values that cannot be true; they are logged as they are."""
        mfu = row.get("mfu")
        if isinstance(mfu, float) and mfu > 1.0:
            self.warn_once("mfu", f"step {row['step']}: MFU {mfu:.4g} > 1 is impossible: "
                                  "the FLOPs formula (model.flops.model_flops), the token count "
                                  "or the peak FLOP/s (metrics.PEAK_FLOPS, debug.peak_flops) is "
                                  "wrong; logged as computed")
        if row.get("skipped"):  # the non-finite guard has said why already
            return
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                self.warn_once(f"non-finite {key}", f"step {row['step']}: {key} is {value}; "
                                                    "logged as null")

    def close(self) -> None:
        if self.bar is not None:
            self._safely("progress bar", self.bar.close)
        if self.wandb is not None:
            self._safely("wandb.finish", self.wandb.finish)


class Throughput:
    """Tokens/s and model FLOPs per token over the interval since the last `interval()` call
    (each token counted once; FLOPs as `model.flops.model_flops` counts them)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.flops = 0

    def add(self, tokens: int, flops: int = 0) -> None:
        self.tokens += tokens
        self.flops += flops

    def interval(self) -> tuple[float, float]:
        """(tokens/s, FLOPs per token) since the last call; starts the next interval."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        per_token = self.flops / max(self.tokens, 1)
        self.t0, self.tokens, self.flops = now, 0, 0
        return rate, per_token

    def fields(self, device: torch.device, dims, peak: float | None) -> dict:
        """The speed and memory fields of a metrics row for the interval since the last call:
        tokens_per_s, peak_mem_gib (the largest rank's), mfu (None without a known `peak`, the
        FLOP/s of one device) and, on several ranks, peak_mem_gib_per_rank. A collective (the
        peak all-gather): every rank calls it at the same step."""
        (tok_s, flops_per_token), peaks = self.interval(), peak_mem_by_rank(device, dims)
        # tokens/s and FLOPs are the whole job's, so is the peak
        row = {"tokens_per_s": tok_s, "peak_mem_gib": max(peaks),
               "mfu": mfu_of(flops_per_token, tok_s, peak * dims.world_size) if peak else None}
        if dims.distributed:
            row["peak_mem_gib_per_rank"] = peaks
        return row


def format_row(row: dict, total: int) -> str:
    """The log line of one metrics row."""
    text = (f"step {row['step']}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
            f"grad_norm {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s | "
            f"peak {row['peak_mem_gib']:.2f} GiB")
    if "val_loss" in row:
        text += f" | val_loss {row['val_loss']:.4f}"
    if row.get("skipped"):
        text += f" | skipped (non-finite; {row['skipped_steps']} so far)"
    return text
