"""Per-rank peak memory of one training step, broken down, by walking the step's timeline.

Model states follow ZeRO (Rajbhandari et al. 2020, sec. 3): fp32 master weights (4 B/param),
fp32 gradients (4), AdamW's two fp32 moments (8), each divided by n where parallel/sharding.py
shards it: n = dp·sp, or the shard group under hybrid sharding (parallel.shard_group; each of
the dp·sp/n replicas holds the same n shards, so a rank stores 1/n, not 1/(dp·sp)). What FSDP2
gathers or keeps unsharded (a block's parameters in the compute dtype, a block's full gradient
before its reduce-scatter) does not depend on n, and HSDP's cross-replica all-reduce works in
place on the reduce-scattered shard (torch FSDP2 foreach_reduce; one block's shard in flight at
a time), so it adds no term. Activations come from activations.py. Instead of adding every
term's maximum (which overstates: grads grow while activations shrink), the step is walked
phase by phase (end of forward, head backward, each block's backward from the last, optimizer
step) and the peak is the largest phase; the breakdown is that phase's.

Everything is bytes per rank. `device` (cpu | cuda): the planned machine; on cpu "offloaded"
activations stay in the same memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from . import activations as act
from .shapes import Shapes

GIB = 2**30
FP32 = 4


@dataclass
class Breakdown:
    """Bytes per rank at the peak phase (`phase` names it)."""

    params: int = 0  # master weights (and gathered/cast copies alive at this phase)
    grads: int = 0
    optimizer: int = 0
    activations: int = 0  # kept for backward by every block not yet back-propagated
    transient: int = 0  # the largest working set at this phase (logits, recompute, grads)
    comm: int = 0  # collective buffers (Ulysses send buffer, ring blocks in flight, flat grads)
    overhead: int = 0  # allocator/runtime reserve (GPU only, see memory_overhead)
    phase: str = ""

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + self.activations + self.transient
                + self.comm + self.overhead)

    def gib(self) -> dict:
        out = {k: round(v / GIB, 3) for k, v in asdict(self).items() if k != "phase"}
        out["phase"] = self.phase
        return out


def param_bytes(sh: Shapes) -> int:
    """The master weights this rank stores: fp32, divided by the shard group n with ZeRO."""
    return FP32 * sh.params() // sh.n_shard


def gathered_bytes(sh: Shapes, blocks: int) -> int:
    """Extra parameter bytes alive during forward/backward besides the master weights.

    zero 0 under bf16: the step's bf16 copy of every weight that is cast (model/precision.py
    WeightCasts: all but the untied embedding table, which is read in fp32), alive from the
    first forward to the last backward; under train.compile (no cache) autocast's casts of the
    block matrices that the linears keep for backward (all blocks without checkpointing, one
    recomputed block with it). zero 2: FSDP2's
    unsharded parameters in the compute dtype, all of them (no reshard after forward). zero 3:
    the root group's (embedding, head: FSDP2 does not reshard the root after forward) plus
    `blocks` blocks (the one running and the one prefetched).
    """
    pbytes = sh.act_bytes
    if not sh.fsdp:
        if sh.act_bytes == FP32:
            return 0
        if not sh.compile:
            return pbytes * (sh.params() - (0 if sh.tied else sh.V * sh.d // sh.tp))
        kept = sh.L if sh.ac == "none" else 1
        return pbytes * sh.block_matrix_params() * kept
    if sh.zero == 2:
        return pbytes * sh.params()
    return pbytes * (sh.root_params() + blocks * sh.block_params())


def grad_bytes(sh: Shapes, blocks_done: int, head_done: bool) -> int:
    """Gradient bytes once the head (and root) and `blocks_done` blocks are back-propagated:
    fp32, sharded with ZeRO (FSDP2 reduce-scatters each block's as soon as it is complete)."""
    done = (sh.root_params() if head_done else 0) + blocks_done * sh.block_params()
    return FP32 * done // sh.n_shard


def optimizer_bytes(sh: Shapes) -> int:
    return 2 * FP32 * sh.params() // sh.n_shard


def memory_overhead(device: str, total: int) -> int:
    """GPU: the CUDA context and kernels' workspaces are not tensors; the caching allocator's
    fragmentation is what max_memory_reserved - max_memory_allocated shows. We reserve 1 GiB
    plus 5 % (PyTorch's CUDA context is ~0.5-1 GiB; fragmentation of a few %). CPU: 0 (the
    validation compares tensor bytes only)."""
    return 0 if device == "cpu" else GIB + total // 20


def predict(sh: Shapes, device: str = "cuda") -> Breakdown:
    """The peak phase's breakdown (overhead included) for one rank of `sh`."""
    phases = list(_phases(sh, device))
    peak = max(phases, key=lambda b: b.total)
    peak.overhead = memory_overhead(device, peak.total)
    return peak


def _phases(sh: Shapes, device: str):
    L, a, T = sh.L, sh.act_bytes, sh.T
    static = dict(optimizer=optimizer_bytes(sh))
    master = param_bytes(sh)
    # Per layer (sliding-window and full layers may differ: their masks, activations.mask_saved)
    kept = [act.block_kept(sh, device, sh.window(i)) for i in range(L)]
    saved = [act.block_saved(sh, device, sh.window(i)) for i in range(L)]
    between = act.rope_tables(sh) + act.mask_tables(sh, device)
    final_norm = T * act.norm_saved(sh, device) + T * sh.d * a  # its x, stats, and output
    flat = FP32 * sh.params() if (not sh.fsdp and sh.dp * sh.sp > 1) else 0
    # forward: the last block running, every block kept
    yield Breakdown(**static, phase="forward, last block",
                    params=master + gathered_bytes(sh, 2),
                    activations=sum(kept[:-1]) + between,
                    transient=saved[-1] + act.block_forward_transient(sh),
                    comm=act.ulysses_buffer(sh))
    head = sum(kept) + between + final_norm
    yield Breakdown(**static, phase="forward, head + loss",
                    params=master + gathered_bytes(sh, 1), activations=head,
                    transient=max(act.head_working_set(sh, False), act.head_kept(sh)))
    yield Breakdown(**static, phase="backward, head + loss",
                    params=master + gathered_bytes(sh, 1), activations=head,
                    grads=grad_bytes(sh, 0, True) + (FP32 * sh.root_params() if sh.fsdp else 0),
                    transient=act.head_working_set(sh, True) + T * sh.d * a)
    # CPU offload: the "host" copies are in the same memory, and ActivationOffload holds every
    # parked tensor until the next forward (its _handles), so nothing parked shrinks in backward.
    parked_stay = sh.offload and device == "cpu" and act.offloaded(sh)
    for done in range(L):  # each block's backward, the last first (layers may differ)
        left = L - done
        stays = (done * sh.T * sh.d * a + final_norm + act.head_kept(sh)) if parked_stay else 0
        unsharded = FP32 * sh.block_params() if sh.fsdp else 0
        recompute = 0 if sh.ac == "none" else saved[left - 1] - kept[left - 1]
        yield Breakdown(**static, phase=f"backward, block {left - 1}",
                        params=master + gathered_bytes(sh, 2),
                        activations=sum(kept[:left]) + between + stays,
                        grads=grad_bytes(sh, done + 1, True) + unsharded,
                        transient=recompute + act.block_backward_transient(sh, device),
                        comm=act.ulysses_buffer(sh) if sh.U > 1 else 0)
    # after backward: zero 0 with dp·sp > 1 flattens every gradient into one buffer to reduce
    # (parallel/grad_sync.py); then AdamW (fused on CUDA: no temporaries; CPU's per-tensor
    # loop: two temporaries the size of the largest parameter).
    largest = max(sh.V * sh.d // sh.tp, sh.d * sh.F) // sh.n_shard
    yield Breakdown(**static, params=master, phase="gradient reduction + optimizer step",
                    grads=grad_bytes(sh, L, True), comm=flat,
                    transient=0 if device == "cuda" else 2 * FP32 * largest)
