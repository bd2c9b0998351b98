"""What a run reports: metrics.jsonl, throughput, memory, MFU, the progress bar and wandb.

Only rank 0 writes (DESIGN §2): other ranks construct a `Reporter` with `enabled=False`.
`metrics.jsonl` holds one JSON object per logged step; on resume the rows after the resumed step
are dropped first so the file reads as one clean curve.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
import time

import torch

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

    Above 1 is impossible, so it means the FLOPs formula, the token count or the peak table is
    wrong: raised as an error rather than logged as a number nobody should believe.
    """
    mfu = flops_per_token * tokens_per_s / peak
    if mfu > 1.0:
        raise ValueError(f"MFU {mfu:.1%} > 100% ({flops_per_token:.3g} FLOPs/token x "
                         f"{tokens_per_s:.1f} tokens/s over a {peak:.3g} FLOP/s peak): the FLOPs "
                         "formula or the peak table is wrong")
    return mfu


def peak_mem_gib(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        return len(lines) - len(kept)

    def append(self, row: dict) -> None:
        # Strict JSON: a skipped step's NaN/inf loss or norm is written as null (the row's
        # `skipped` field says why), so jq and other strict readers can parse every line.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                 for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")


class Reporter:
    """Rank 0's view of progress: rows to metrics.jsonl and wandb, a tqdm bar, log lines."""

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True, wandb_cfg=None, config_dict: dict | None = None):
        self.enabled = enabled
        self.file = MetricsFile(os.path.join(run_dir, "metrics.jsonl"))
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)  # Hydra makes it; library callers may not have
        # Rows past the step we start from are a killed run's (at 0: a run killed before its
        # first checkpoint): drop them, so the file reads as one curve.
        self.file.truncate_after(start_step)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self.wandb = _start_wandb(run_dir, wandb_cfg, config_dict or {})

    def info(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def tick(self, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.append(row)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if v is not None}, step=row["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: str, wandb_cfg, config_dict: dict):
    import wandb  # heavy; only imported when a run asks for it

    # A stable id per run dir makes a resumed run continue the same wandb run.
    run_id = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]
    return wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or None,
                      mode=wandb_cfg.mode, dir=run_dir, id=run_id, resume="allow",
                      config=config_dict)


class Throughput:
    """Tokens/s over the interval since the last `rate()` call (each token counted once)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate


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
