"""ParallelDims: the one object that knows the layout of the job.

Built from `parallel.*` and the world size, validated before any process-group work, and passed
explicitly to whoever needs it — there are no module globals. After the process group exists,
`build_mesh()` creates the DeviceMesh `("dp", "sp", "tp")` and the flattened `dp_sp` view.

Rank layout: rank = (dp_i * sp + sp_i) * tp + tp_i, so tensor-parallel peers are adjacent (the
chattiest collectives stay inside a node) and a sequence-parallel group is a block of
consecutive ranks. `dp_sp` is the group over which sp ranks count as data parallel: they hold
the same weights but different tokens, so gradients, the token count and the loss are summed
over it (DESIGN §1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from ..config import ParallelConfig, validate_parallel

PG_TIMEOUT = timedelta(minutes=10)  # a dead rank fails the job instead of hanging it forever


@dataclass
class ParallelDims:
    tp: int
    sp: int
    dp: int
    world_size: int
    rank: int
    device: torch.device
    backend: str = "gloo"
    mesh: object = field(default=None, repr=False)  # DeviceMesh once build_mesh() ran
    # Named 1-D views of the mesh: "dp", "sp", "tp" and the flattened "dp_sp". Kept here because
    # torch wants flattened meshes held by the caller, not re-sliced from the root.
    meshes: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.tp * self.sp * self.dp != self.world_size:
            raise ValueError(f"tp*sp*dp = {self.tp}*{self.sp}*{self.dp} != world {self.world_size}")

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, rank: int) -> "ParallelDims":
        validate_parallel(cfg, world_size)
        dp = cfg.dp if cfg.dp > 0 else world_size // (cfg.tp * cfg.sp)
        device = pick_device(rank)
        backend = cfg.backend if cfg.backend != "auto" else (
            "nccl" if device.type == "cuda" else "gloo")
        return cls(tp=cfg.tp, sp=cfg.sp, dp=dp, world_size=world_size, rank=rank,
                   device=device, backend=backend)

    @classmethod
    def from_env(cls, cfg: ParallelConfig) -> "ParallelDims":
        """Read torchrun's WORLD_SIZE/RANK (1/0 when run as a plain `python train.py`)."""
        return cls.from_config(cfg, int(os.environ.get("WORLD_SIZE", "1")),
                               int(os.environ.get("RANK", "0")))

    @property
    def is_main(self) -> bool:
        """Rank 0 owns shared files: metrics, wandb, checkpoint commits."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- process group and mesh ---------------------------------------------------------
    def init_process_group(self) -> None:
        """Join the job's process group (no-op alone, or when a caller already made one)."""
        import torch.distributed as dist

        if not self.distributed or dist.is_initialized():
            return
        kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                timeout=PG_TIMEOUT, **kwargs)

    def build_mesh(self) -> None:
        """Create the ("dp", "sp", "tp") DeviceMesh and its flattened "dp_sp" dimension."""
        if not self.distributed or self.mesh is not None:
            return
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.dp, self.sp, self.tp),
                                mesh_dim_names=("dp", "sp", "tp"))
        self.meshes = {name: mesh[name] for name in ("dp", "sp", "tp")}
        self.meshes["dp_sp"] = mesh["dp", "sp"]._flatten("dp_sp")  # (dp, sp) -> (dp*sp,)
        self.mesh = mesh

    def group(self, name: str):
        """The process group of mesh dimension `name` ("dp", "sp", "tp", "dp_sp"); None alone."""
        return None if self.mesh is None else self.meshes[name].get_group()

    def local_rank(self, name: str) -> int:
        """This rank's coordinate along mesh dimension `name` (0 alone)."""
        return 0 if self.mesh is None else self.meshes[name].get_local_rank()

    @property
    def dp_sp(self) -> int:
        return self.dp * self.sp


def pick_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        return torch.device("cuda", local)
    return torch.device("cpu")
