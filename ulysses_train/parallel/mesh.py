"""ParallelDims: the one object that knows the layout of the job.

Built from `parallel.*` and the world size, validated before any process-group work, and passed
explicitly to whoever needs it — there are no module globals. After the process group exists,
`build_mesh()` creates the DeviceMesh and its named views.

Rank layout, outermost first: rank = ((dp_i * ring + ring_i) * U + ulysses_i) * tp + tp_i, with
U = sp / ring. Tensor-parallel peers are adjacent and Ulysses peers next (their all-to-alls and
TP's collectives are the chattiest: they stay inside a node); the ring, whose point-to-point
K/V transfers overlap compute, may cross nodes. A sequence-parallel group (ring x Ulysses) is
a block of consecutive ranks (per tp coordinate) and its group rank is ring_i * U + ulysses_i,
the rank `SequenceLayout.rank_positions` takes. With ring = 1 every group is exactly the
`("dp", "sp", "tp")` one of Ulysses alone.

Named views (`meshes`, `group(name)`): "dp", "ring", "ulysses", "tp"; "sp" = ring x ulysses
flattened (the whole sequence group); "dp_sp" = dp x sp flattened, the group over which sp ranks
count as data parallel: they hold the same weights but different tokens, so gradients, the
token count and the loss are summed over it (docs/architecture.md §1).

Hybrid sharding (`parallel.shard_group`) splits dp into (dp_replicate, dp_shard),
replicate-major, so a shard group — dp_shard x sp ranks — is a block of consecutive ranks (one
node's, when it has that many GPUs) and holds whole sp groups; its 2-D view "hsdp" is
(replicate, shard). FSDP2 wants its 2-D mesh and the tp mesh cut from one root mesh, so the
root is 5-D ("dp_replicate", "dp_shard", "ring", "ulysses", "tp") and "dp" is the flattened
pair; with the default shard_group (all of dp x sp) dp_replicate is 1.
"""
from __future__ import annotations

import os
import re
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from ..config.errors import ConfigError
from ..config.parallel import shard_group_size, validate_parallel
from ..config.schema import ParallelConfig
from .layout import SequenceLayout

RENDEZVOUS_TIMEOUT = timedelta(minutes=30)  # torch's own default for first contact


@dataclass
class ParallelDims:
    tp: int
    sp: int
    dp: int
    world_size: int
    rank: int
    device: torch.device
    backend: str = "gloo"
    ring: int = 1  # ring degree inside sp; sp / ring Ulysses ranks per ring rank
    # How long any collective waits for a peer before it fails (parallel.timeout_s): a rank that
    # dies or stalls then ends the others instead of leaving them hanging.
    timeout: timedelta = timedelta(minutes=10)
    # Ranks of dp x sp that ZeRO shards over (parallel.shard_group); 0 = all of them. Between 0
    # and dp_sp, FSDP2 shards within such groups and replicates across them (HSDP).
    shard_group: int = 0
    mesh: object = field(default=None, repr=False)  # DeviceMesh once build_mesh() ran
    # Named 1-D views of the mesh: "dp", "ring", "ulysses", "tp" and the flattened "sp" and
    # "dp_sp". Kept here because torch wants flattened meshes held by the caller, not re-sliced
    # from the root.
    meshes: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.tp * self.sp * self.dp != self.world_size:
            raise ValueError(f"tp*sp*dp = {self.tp}*{self.sp}*{self.dp} != world {self.world_size}")
        if self.ring < 1 or self.sp % self.ring:
            raise ValueError(f"ring {self.ring} does not divide sp {self.sp}")
        self.shard_group = shard_group_size(self.shard_group, self.dp_sp)
        if self.dp_sp % self.shard_group or self.shard_group % self.sp:
            raise ValueError(f"shard_group {self.shard_group} is not whole sp groups of dp_sp "
                             f"{self.dp_sp}")

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, rank: int) -> "ParallelDims":
        validate_parallel(cfg, world_size)
        dp = cfg.dp if cfg.dp > 0 else world_size // (cfg.tp * cfg.sp)
        device = pick_device(rank)
        if cfg.backend == "nccl" and device.type != "cuda":  # NCCL has no CPU transport
            raise ConfigError("parallel.backend", "nccl needs CUDA GPUs and this machine has "
                              "none; use parallel.backend=auto (gloo on CPU) or gloo")
        backend = cfg.backend if cfg.backend != "auto" else (
            "nccl" if device.type == "cuda" else "gloo")
        return cls(tp=cfg.tp, sp=cfg.sp, dp=dp, world_size=world_size, rank=rank,
                   device=device, backend=backend, ring=cfg.ring,
                   timeout=timedelta(seconds=cfg.timeout_s), shard_group=cfg.shard_group)

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
        """Select this rank's GPU, then join the job's process group with `self.timeout`.

        No-op for the group alone, or when a caller already made one (the device is still
        selected). The device comes first: NCCL binds its communicator to the current device,
        and DeviceMesh, FSDP2 and DCP's object collectives allocate on it; left unset, every
        rank of a node would use cuda:0 (older torch does not set it for you).
        """
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not self.distributed or dist.is_initialized():
            return
        kwargs = {}
        if self.backend == "nccl":
            enable_nccl_async_error_handling(os.environ)
            kwargs["device_id"] = self.device  # eager NCCL init, so mesh groups split from it
        # First contact waits longer than a collective may: ranks (nodes) start minutes apart
        # for reasons that are no fault (imports, data cache, a busy node), which a short
        # parallel.timeout_s must not turn into a failed start. The store the group uses from
        # then on gets self.timeout, as init_process_group would set it.
        first_contact = max(self.timeout, RENDEZVOUS_TIMEOUT)
        store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size,
                                           timeout=first_contact))
        store.set_timeout(self.timeout)
        store = dist.PrefixStore("default_pg", store)  # the key space torch's own path uses
        dist.init_process_group(self.backend, store=store, rank=self.rank,
                                world_size=self.world_size, timeout=self.timeout, **kwargs)

    @property
    def ulysses(self) -> int:
        """U = sp / ring: ranks per Ulysses all-to-all."""
        return self.sp // self.ring

    def sequence_layout(self, seq_len: int) -> SequenceLayout:
        """Which global positions of a `seq_len` row each sp rank holds (parallel/layout.py)."""
        return SequenceLayout(seq_len, self.sp, self.ring)

    def build_mesh(self) -> None:
        """Create the root DeviceMesh and its named views "dp", "ring", "ulysses", "tp",
        "sp", "dp_sp" (and "hsdp")."""
        if not self.distributed or self.mesh is not None:
            return
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(
            self.device.type,
            (self.replicas, self.dp // self.replicas, self.ring, self.ulysses, self.tp),
            mesh_dim_names=("dp_replicate", "dp_shard", "ring", "ulysses", "tp"))
        self.meshes = {name: mesh[name] for name in ("ring", "ulysses", "tp")}
        self.meshes["dp"] = mesh["dp_replicate", "dp_shard"]._flatten("dp")  # (R, D/R) -> (D,)
        self.meshes["sp"] = mesh["ring", "ulysses"]._flatten("sp")  # (ring, U) -> (sp,)
        # (R, D/R, ring, U) -> (D*sp,)
        self.meshes["dp_sp"] = mesh["dp_replicate", "dp_shard", "ring", "ulysses"]._flatten("dp_sp")
        if self.hsdp:  # FSDP2's HSDP mesh: (R, D/R, ring, U) -> (replicate R, shard D/R*sp)
            mesh["dp_shard", "ring", "ulysses"]._flatten("dp_shard_sp")
            # Slicing a flattened dim together with a root dim is how torch 2.8..2.13 make this
            # view (torchtitan's HSDP mesh too); torch >= 2.11 warns that it will be deprecated
            # in favour of DeviceMesh._unflatten, which torch 2.8 lacks.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Slicing a flattened dim", UserWarning)
                self.meshes["hsdp"] = mesh["dp_replicate", "dp_shard_sp"]
        self.mesh = mesh
        # DeviceMesh makes its groups with torch's default timeout (30 min gloo, 10 min NCCL),
        # not the world group's, and torch 2.8's init_device_mesh takes no timeout or options.
        from torch.distributed.distributed_c10d import _set_pg_timeout

        for view in self.meshes.values():
            for dim in range(view.ndim):
                _set_pg_timeout(self.timeout, view.get_group(dim))

    def group(self, name: str):
        """The process group of mesh dimension `name` ("dp", "ring", "ulysses", "tp", "sp",
        "dp_sp"); None alone."""
        return None if self.mesh is None else self.meshes[name].get_group()

    def local_rank(self, name: str) -> int:
        """This rank's coordinate along mesh dimension `name` (0 alone)."""
        return 0 if self.mesh is None else self.meshes[name].get_local_rank()

    @property
    def dp_sp(self) -> int:
        return self.dp * self.sp

    @property
    def replicas(self) -> int:
        """How many copies of the ZeRO shards exist: dp_sp / shard_group (1 = plain ZeRO)."""
        return self.dp_sp // self.shard_group

    @property
    def hsdp(self) -> bool:
        """Hybrid sharding: shard within groups of `shard_group` ranks, replicate across them."""
        return self.replicas > 1

    def describe(self, zero: int, ulysses_chunks: int = 1) -> str:
        """The layout as the log shows it, e.g. `dp=2 sp=4 ring=2 ulysses_chunks=2 tp=1 zero=3
        shard_group=4 (8 ranks, nccl)`: ring, ulysses_chunks and shard_group only when in use."""
        ring = f" ring={self.ring}" if self.ring > 1 else ""
        chunks = f" ulysses_chunks={ulysses_chunks}" if ulysses_chunks > 1 else ""
        group = f" shard_group={self.shard_group}" if self.hsdp else ""
        return (f"dp={self.dp} sp={self.sp}{ring}{chunks} tp={self.tp} zero={zero}{group} "
                f"({self.world_size} ranks, {self.backend})")


def pick_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        return torch.device("cuda", local)
    return torch.device("cpu")


def enable_nccl_async_error_handling(env) -> None:
    """Make NCCL's watchdog end this process when a collective fails or times out.

    Without it a rank whose peer died waits in a NCCL kernel forever. Mode 3 (tear down without
    aborting the communicators, whose abort can itself hang) has been torch's default since 2.2
    (pytorch#110723); we set it only when the user chose nothing, so an explicit choice (either
    spelling, the old NCCL_ASYNC_ERROR_HANDLING too) wins.
    """
    if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env and "NCCL_ASYNC_ERROR_HANDLING" not in env:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"


def new_group(**kwargs):
    """`dist.new_group` with the world group's timeout (torch would give it its 30 min default).

    Every rank must call it at the same point (it is a collective).
    """
    import torch.distributed as dist

    return dist.new_group(timeout=group_timeout(), **kwargs)


def group_timeout(group=None) -> timedelta:
    """The timeout `group` (default: the world group) was made with: `parallel.timeout_s`."""
    import torch.distributed as dist

    group = dist.group.WORLD if group is None else group
    device = next(iter(group._device_types))  # the group's first backend carries its options
    return group._get_backend(device).options._timeout


# What torch's backends say when a peer is gone: gloo's tcp transport ("Connection reset by
# peer", "Connection closed by peer", "Read error ..."), NCCL's watchdog and remote errors.
_LOST = (re.compile(r"Connection (?:reset|closed|refused)(?: by peer)?|Broken pipe", re.IGNORECASE),
         re.compile(r"Read error|Write error|ncclRemoteError|communicator was aborted",
                    re.IGNORECASE))  # the first names the cause best; the second is a fallback
_TIMED_OUT = re.compile(r"timed out|timing out|operation timeout", re.IGNORECASE)
_NOT_A_NAME = {"wrapper", "inner", "wait", "__call__", "_fn"}


def describe_collective_failure(exc: BaseException, rank: int, world_size: int,
                                timeout_s: float) -> str | None:
    """One `error:` line for an exception that means a peer rank stalled or died, else None.

    A collective that waited `timeout_s` (parallel.timeout_s) for a peer raises a timeout; one
    whose peer exited raises a connection error at once. Both reach us as RuntimeError or
    torch.distributed.DistError (possibly wrapped, e.g. by DCP), so the whole cause chain is
    read. The collective is named from the traceback: the innermost torch.distributed function,
    else the innermost function of ours. The peer is named when it can only be one rank (a
    world of two); torch's message gives only its network address.
    """
    import torch.distributed as dist

    from ..config.errors import exception_chain

    chain = list(exception_chain(exc))
    failed = [e for e in chain if isinstance(e, (RuntimeError, dist.DistError))]
    text = " ".join(str(e) for e in failed)
    lost = _LOST[0].search(text) or _LOST[1].search(text)
    timed_out = _TIMED_OUT.search(text)
    if not (failed and (lost or timed_out)):
        return None
    name = _collective_name(chain)
    peer = f"rank {1 - rank}" if world_size == 2 else "a peer rank"
    if lost:
        return (f"error: collective {name} on rank {rank} lost its connection to {peer} "
                f"({lost.group(0).lower()}): that rank died; its own log says why")
    return (f"error: parallel.timeout_s: collective {name} on rank {rank} waited {timeout_s:g} s "
            f"for {peer}, which stalled or died; check its log (raise parallel.timeout_s if "
            "it was only slow)")


def _collective_name(chain: list[BaseException]) -> str:
    """The innermost torch.distributed function in the tracebacks of `chain` and the innermost
    function of ours that called it, e.g. "wait_tensor in all_to_all".

    A collective with no Python frame of torch.distributed under autograd's engine is DDP's
    gradient all-reduce: its Reducer waits on our comm hook's future in C++, so the traceback
    ends in torch/autograd. It is named as such, not as our caller (e.g. train_step). DDP's own
    Python (torch/nn/parallel) counts as torch.distributed."""
    theirs = ours = None
    in_backward = False
    for exc in chain:
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            path = frame.filename.replace(os.sep, "/")
            in_backward = in_backward or "torch/autograd/" in path
            if frame.name in _NOT_A_NAME:
                continue
            if theirs is None and ("torch/distributed/" in path or "torch/nn/parallel/" in path):
                theirs = frame.name
            if ours is None and "/ulysses_train/" in path:
                ours = frame.name
    if theirs is None and in_backward:
        theirs = "all_reduce (DDP gradients, during backward)"
    if theirs and ours:
        return f"{theirs} in {ours}"
    return theirs or ours or "(unknown)"
