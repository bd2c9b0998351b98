"""ParallelDims: the one object that knows the layout of the job.

It is built from `parallel.*` and the world size, validated before any process-group work, and
passed explicitly to whoever needs it — there are no module globals. This version covers the
single-process layout; the `("dp", "sp", "tp")` DeviceMesh and its flattened `dp_sp` view arrive
with sequence parallelism.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import ParallelConfig, validate_parallel


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    sp: int
    dp: int
    world_size: int
    rank: int
    device: torch.device

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, rank: int) -> "ParallelDims":
        validate_parallel(cfg, world_size)
        dp = cfg.dp if cfg.dp > 0 else world_size // (cfg.tp * cfg.sp)
        return cls(tp=cfg.tp, sp=cfg.sp, dp=dp, world_size=world_size, rank=rank,
                   device=pick_device(rank))

    @classmethod
    def from_env(cls, cfg: ParallelConfig) -> "ParallelDims":
        """Read torchrun's WORLD_SIZE/RANK (1/0 when run as a plain `python train.py`)."""
        return cls.from_config(cfg, int(os.environ.get("WORLD_SIZE", "1")),
                               int(os.environ.get("RANK", "0")))

    @property
    def is_main(self) -> bool:
        """Rank 0 owns shared files: metrics, wandb, caches' first build."""
        return self.rank == 0


def pick_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        return torch.device("cuda", local)
    return torch.device("cpu")
