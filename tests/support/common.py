"""Shared test helpers: small configs and a way to run train.py as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from ulysses_train.config.schema import Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Small enough to train a step in milliseconds on CPU, big enough to exercise GQA and accumulation.
SMALL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden=128", "model.vocab_size=256", "data=synthetic", "data.seq_len=32",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.precision=fp32",
         "optim.warmup_steps=2", "logging.every=1", "logging.wandb.mode=disabled",
         "logging.progress=false", "train.val_every=0"]


def small_config(**sections) -> Config:
    """The SMALL config as dataclasses; `sections` override fields, e.g. train={"steps": 6}."""
    cfg = Config()
    cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads = 2, 64, 4
    cfg.model.n_kv_heads, cfg.model.ffn_hidden, cfg.model.vocab_size = 2, 128, 256
    cfg.data.name, cfg.data.seq_len = "synthetic", 32
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 4, 2
    cfg.train.precision, cfg.train.val_every = "fp32", 0
    cfg.optim.warmup_steps = 2
    cfg.logging.every, cfg.logging.progress, cfg.logging.wandb.mode = 1, False, "disabled"
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def run_train(args, cwd=ROOT, timeout=300, env=None) -> subprocess.CompletedProcess:
    """Run `python train.py args` in a fresh process, as a user would."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1")
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    full_env.update(env or {})  # e.g. WORLD_SIZE: what the pre-check validates the layout for
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def cpu_dims():
    """The single-process layout on CPU, as `run` builds it for `python train.py`."""
    from ulysses_train.parallel import ParallelDims

    return ParallelDims(tp=1, sp=1, dp=1, world_size=1, rank=0, device=torch.device("cpu"))


class UnevenLabels:
    """Wraps a data source so valid-label counts differ a lot between rows, ranks and micro-batches.

    Labels are ignored (-100) where the input token is divisible by 4, and beyond the first
    quarter of every row whose first token is even. Both rules read only the row's own content,
    so every layout masks the same global positions. With such data a mean of per-rank or
    per-micro-batch means differs from the token-weighted loss, so parity tests can fail.
    """

    def __init__(self, source):
        self.source = source

    def __getattr__(self, name):
        return getattr(self.source, name)

    def global_batch(self, step, split="train", rows=None):
        batch = self.source.global_batch(step, split, rows)
        ids, seq = batch.input_ids, batch.input_ids.shape[1]
        tail = (ids[:, :1] % 2 == 0) & (batch.position_ids >= seq // 4)
        batch.labels = batch.labels.masked_fill((ids % 4 == 0) | tail, -100)
        return batch


def run_torchrun(nproc: int, args, timeout=300, launcher_args=(),
                 env=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc [launcher_args] train.py args`, one thread
    per rank; `env` is added to the launcher's environment."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    env = {**full_env, **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *launcher_args, os.path.join(ROOT, "train.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def metrics_rows(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fwd_bwd(fn, q, k, v, grad_out, **kw):
    """An attention call's output and (dq, dk, dv) for the upstream gradient `grad_out`."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    (out * grad_out).sum().backward()  # d/d out of sum(out * g) is g
    return out.detach(), q.grad, k.grad, v.grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to b's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


def flip_byte(path) -> None:
    """Corrupt a file in place: same size, one byte different (only a content hash can tell)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def files_under(root) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes): what 'nothing on disk was touched'
    compares before and after."""
    out = {}
    for where, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(where, n), "rb") as f:
                out[os.path.relpath(os.path.join(where, n), root)] = f.read()
    return out
