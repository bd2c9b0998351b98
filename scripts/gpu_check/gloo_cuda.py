"""Point-to-point transfers of CUDA tensors over gloo, staged through host memory.

Why: the parity stage runs 4 ranks on one GPU, which NCCL refuses (one rank per device), so it
uses gloo. Gloo's collectives (all_reduce, all_to_all, broadcast, all_gather) accept CUDA tensors
and copy through the host themselves, but its send/recv hand the tensor's data pointer to the
TCP transport as if it were host memory (torch's ProcessGroupGloo::send/recv), which a device
pointer is not. The ring (parallel/ring.py Transfer) and the sliding-window halo exchange
(parallel/ring_window.py HaloExchange) use `dist.batch_isend_irecv`; this wraps it so CUDA
tensors travel as host copies: sends are copied to the host before posting, receives land in
host buffers copied to the CUDA tensor when the transfer is waited on. The kernels the check is
about (ring_kernels.py on CUDA) see exactly the tensors they would see under NCCL.

Only the check installs it, in its own rank processes; the package is unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

STAGED = {"ops": 0}  # P2P ops this process moved through host buffers (the parity record shows it)


class _StagedWork:
    """Waits the host transfers, then copies each received host buffer into its CUDA tensor."""

    def __init__(self, works, copies):
        self.works, self.copies = works, copies

    def wait(self, *args, **kwargs):
        for work in self.works:
            work.wait(*args, **kwargs)
        for target, host in self.copies:
            target.copy_(host)
        self.copies = []
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


def host_staged(original, always: bool = False):
    """`batch_isend_irecv` with tensors off the CPU (every tensor when `always`, which is how the
    CPU dry run exercises this code) moved through host buffers."""

    def staged(p2p_op_list):
        ops, copies, keep = [], [], []
        for op in p2p_op_list:
            t = op.tensor
            if t.device.type == "cpu" and not always:
                ops.append(op)
                continue
            if op.op is dist.isend:
                host = t.detach().to("cpu", copy=True)  # synchronous: the values as of now
                keep.append(host)
            else:
                host = torch.empty(t.shape, dtype=t.dtype)
                copies.append((t, host))
            ops.append(dist.P2POp(op.op, host, op.peer, op.group, op.tag))
            STAGED["ops"] += 1
        works = original(ops)
        work = _StagedWork(works, copies)
        work.keep = keep  # the send buffers live until the work does
        return [work]

    return staged


def install(always: bool = False) -> None:
    """Replace `torch.distributed.batch_isend_irecv` in this process (ring.py and ring_window.py
    look it up on the module at each call)."""
    if not getattr(dist.batch_isend_irecv, "_gpu_check_staged", False):
        dist.batch_isend_irecv = host_staged(dist.batch_isend_irecv, always)
        dist.batch_isend_irecv._gpu_check_staged = True
