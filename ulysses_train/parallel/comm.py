"""Autograd-correct all-to-all collectives that reshard between sequence and heads (Ulysses).

Layout conventions (P = size of the sequence-parallel group, r = this rank's index in it):
- *sequence-sharded* `(B, S/P, H, D)`: rank r holds tokens r*S/P ... (r+1)*S/P - 1, all heads;
- *head-sharded* `(B, S, H/P, D)`: rank r holds every token of heads r*H/P ... (r+1)*H/P - 1.

Which collective: torch's functional all-to-all, the op `torch.ops._c10d_functional.
all_to_all_single` followed by `_c10d_functional.wait_tensor` — what the public
`torch.distributed._functional_collectives.all_to_all_single_autograd` issues, and what
torch.compile puts in its graphs. In recent torch (pytorch#168140; 2.13 here) that module
registers an autograd formula for both ops, so
- forward: each rank splits its buffer into P equal chunks along dim 0 and sends chunk j to rank
  j; what it receives is concatenated along dim 0 in source-rank order;
- backward: the inverse all-to-all (same op with input/output splits swapped) applied to the
  incoming gradient — an all-to-all is a permutation of elements across ranks, so its adjoint is
  the inverse permutation;
- torch.compile traces them as graph nodes instead of breaking the graph, and selective
  activation checkpointing can name them (`torch.ops._c10d_functional.all_to_all_single.default`)
  to save rather than re-run them on recomputation.
We call the two ops directly instead of the public wrapper because in eager mode the wrapper
returns an `AsyncCollectiveTensor` (a tensor subclass, waited lazily, through a custom op whose
first call imports torch._dynamo: 1-2 s per process, more than a whole test). A subclass would
also reach the user's attention kernel, and there is nothing to overlap with anyway: the next op
needs the data. On an older torch, whose base ops have no autograd formula (calling them on a
tensor that requires grad would silently drop its gradient), we use the public
`all_to_all_single_autograd` instead: same exchange, same backward, lazily waited.
A hand-written `torch.autograd.Function` around `dist.all_to_all_single` would be opaque to the
compiler (it fills a preallocated output by side effect), which is why we do not use one.

Every function here returns its input unchanged on a size-1 group, so P = 1 is exactly the
single-device computation (no copy, no collective).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # importing it registers the autograd
from torch.distributed import ProcessGroup

# Do the base functional ops differentiate (see the module docstring)? Read once, at import.
_NATIVE_AUTOGRAD = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"_c10d_functional::{op}", "Autograd")
                       for op in ("all_to_all_single", "wait_tensor"))


def group_size(group: ProcessGroup | None) -> int:
    """Number of ranks in `group` (None: the default group)."""
    return dist.get_world_size(group)


def all_to_all(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Equal-split all-to-all over dim 0 of `x`, differentiable.

    Forward: `x` is `(P*n, ...)`; chunk j of n rows goes to rank j, and the output's chunk i is
    what rank i sent us. Backward: the same exchange applied to the gradient, which returns each
    gradient chunk to the rank whose input it belongs to.
    `x` is made contiguous first: the collective reads raw memory, and a strided view would send
    the wrong elements without any error.
    """
    if group is None:
        group = dist.group.WORLD
    p = group.size()
    if x.shape[0] % p != 0:
        raise ValueError(f"all_to_all: dim 0 of size {x.shape[0]} does not split over {p} ranks")
    splits = [x.shape[0] // p] * p  # the op takes explicit (here equal) send and receive sizes
    if not _NATIVE_AUTOGRAD:  # older torch: the autograd variant, an AsyncCollectiveTensor in eager
        return funcol.all_to_all_single_autograd(x.contiguous(), splits, splits, group)
    out = torch.ops._c10d_functional.all_to_all_single(x.contiguous(), splits, splits, group.group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


class _Posted:
    """One posted all-to-all (the functional op, not yet waited): the head-group pipeline
    (parallel/ulysses_pipeline.py) posts one group's exchange before another group's kernel.
    No autograd: the pipeline owns its backward. `wait()` hands the buffer over and drops it."""

    def __init__(self, send: torch.Tensor, group: ProcessGroup):
        splits = [send.shape[0] // group.size()] * group.size()
        self.out = torch.ops._c10d_functional.all_to_all_single(send, splits, splits, group.group_name)

    def wait(self) -> torch.Tensor:
        out, self.out = self.out, None  # the caller owns the buffer from here
        return torch.ops._c10d_functional.wait_tensor(out)


def post(send: torch.Tensor, group: ProcessGroup) -> _Posted:
    """Post an equal-split all-to-all of contiguous `send` `(P*n, ...)` over `group` (the
    exchange of `all_to_all`, asynchronous and without autograd); `.wait()` returns it."""
    return _Posted(send, group)


def seq_to_head(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """`(B, S/P, H, D) -> (B, S, H/P, D)`: gather the sequence, scatter the heads.

    Forward: one all-to-all. Backward: the inverse all-to-all (the `head_to_seq` exchange) of the
    gradient. Requires H % P == 0. Identity on a size-1 group.
    """
    p = group_size(group)
    if p == 1:
        return x
    bsz, s_local, heads, dim = x.shape
    if heads % p != 0:
        raise ValueError(f"seq_to_head: {heads} heads cannot be split over {p} ranks")
    # Destination rank j must receive heads j*H/P ... : make the head-group index the outermost
    # dimension so that chunk j of dim 0 is exactly what rank j needs (one copy, contiguous).
    send = x.reshape(bsz, s_local, p, heads // p, dim)  # (B, S/P, H, D) -> (B, S/P, P, H/P, D)
    send = send.permute(2, 0, 1, 3, 4)  # (B, S/P, P, H/P, D) -> (P, B, S/P, H/P, D)
    recv = all_to_all(send, group)  # (P, B, S/P, H/P, D): dim 0 is now the source rank = token block
    # Token block i came from rank i, so (P, S/P) in that order is the global sequence.
    # (P, B, S/P, H/P, D) -> (B, P, S/P, H/P, D) -> (B, S, H/P, D); a copy only when B > 1.
    return recv.transpose(0, 1).reshape(bsz, p * s_local, heads // p, dim)


def head_to_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """`(B, S, H/P, D) -> (B, S/P, H, D)`: scatter the sequence, gather the heads.

    Forward: one all-to-all. Backward: the inverse all-to-all (the `seq_to_head` exchange) of the
    gradient. Requires S % P == 0. Identity on a size-1 group. The result is contiguous.
    """
    p = group_size(group)
    if p == 1:
        return x
    bsz, seq, h_local, dim = x.shape
    if seq % p != 0:
        raise ValueError(f"head_to_seq: sequence length {seq} cannot be split over {p} ranks")
    # Token block j goes to rank j: put the block index outermost (one contiguous copy).
    send = x.reshape(bsz, p, seq // p, h_local, dim)  # (B, S, H/P, D) -> (B, P, S/P, H/P, D)
    send = send.transpose(0, 1)  # (B, P, S/P, H/P, D) -> (P, B, S/P, H/P, D)
    recv = all_to_all(send, group)  # (P, B, S/P, H/P, D): dim 0 is now the source rank = head group
    recv = recv.permute(1, 2, 0, 3, 4)  # (P, B, S/P, H/P, D) -> (B, S/P, P, H/P, D)
    # Head group i came from rank i, so (P, H/P) in that order is the global head index.
    # -> (B, S/P, H, D). Usually reshape copies; with H/P == 1 it can return a strided view,
    # hence the explicit contiguous (a no-op after a copy): the caller may feed it to a collective.
    return recv.reshape(bsz, seq // p, p * h_local, dim).contiguous()


def kv_replication(n_kv_heads: int, p: int) -> int:
    """How many copies of each kv head the all-to-all must send so every rank gets its own.

    Hkv % P == 0: 1 (each rank receives Hkv/P heads). P % Hkv == 0: P/Hkv (each rank receives
    one copy of the kv head its query heads read). Anything else has no exact split.
    """
    if n_kv_heads % p == 0:
        return 1
    if p % n_kv_heads == 0:
        return p // n_kv_heads
    raise ValueError(f"{n_kv_heads} kv heads cannot be shared over {p} sequence-parallel ranks: "
                     f"need kv_heads % P == 0 or P % kv_heads == 0")


def seq_to_head_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q `(B, S/P, Hq, D)`, k/v `(B, S/P, Hkv, D)` -> q `(B, S, Hq/P, D)`, k/v `(B, S, Hkv', D)`.

    Hkv' = Hkv/P, or 1 when Hkv < P: each kv head is then sent to the P/Hkv ranks whose query
    heads read it (GQA: query head h reads kv head h // (Hq/Hkv), so after sharding, rank j's
    query heads all read kv head j // (P/Hkv); with Hkv % P == 0 rank j's local query head l reads
    local kv head l // (Hq/Hkv), the same convention as before sharding).

    Forward: ONE all-to-all carrying q, k and v side by side when they share dtype and head dim,
    else one per tensor. Backward: the inverse all-to-all of the gradients; the replicated kv
    copies come back to the sending rank and are summed (the `expand` backward), which is exactly
    the GQA gradient of the shared kv head. The returned q, k, v are contiguous when B > 1 and
    strided views of the receive buffer when B == 1 (last dim contiguous, as SDPA/FlashAttention
    require). Identity on a size-1 group.
    """
    p = group_size(group)
    if p == 1:
        return q, k, v
    bsz, s_local, hq, dim = q.shape
    hkv = k.shape[2]
    if hq % p != 0:
        raise ValueError(f"{hq} query heads cannot be split over {p} sequence-parallel ranks")
    rep = kv_replication(hkv, p)
    if q.dtype != k.dtype or q.dtype != v.dtype or k.shape[-1] != dim or v.shape[-1] != dim:
        # Cannot share one buffer: three exchanges, replication materialised by repeat_interleave.
        k, v = (t.repeat_interleave(rep, dim=2) if rep > 1 else t for t in (k, v))
        return seq_to_head(q, group), seq_to_head(k, group), seq_to_head(v, group)
    hq_l, hkv_l = hq // p, max(hkv // p, 1)
    send = _pack_qkv(q, k, v, p, rep)  # (P, B, S/P, Hq/P + 2*Hkv', D)
    recv = all_to_all(send, group)  # (P, B, S/P, W, D): dim 0 = source rank = token block
    # Split before merging the token blocks: forward, each tensor then takes one copy of its own
    # (none when B == 1); backward, the gradients are concatenated straight into the send layout
    # in one pass (merging first would cost a concatenation *and* a transposition).
    parts = recv.split([hq_l, hkv_l, hkv_l], dim=3)  # 3 x (P, B, S/P, heads, D) views
    # (P, B, S/P, heads, D) -> (B, P, S/P, heads, D) -> (B, S, heads, D)
    q_out, k_out, v_out = (t.transpose(0, 1).reshape(bsz, p * s_local, t.shape[3], dim) for t in parts)
    return q_out, k_out, v_out


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: int, rep: int) -> torch.Tensor:
    """The send buffer `(P, B, S/P, Hq/P + 2*Hkv', D)`: chunk j = rank j's q, k and v heads.

    Written in one pass by `cat`. kv is *expanded* over its `rep` replicas (a stride-0 view), so
    replication costs no extra pass and its backward is the sum over replicas.
    """
    bsz, s_local, hq, dim = q.shape
    groups = p // rep  # distinct kv-head groups across ranks; rank j = g * rep + i
    hq_l, hkv_l = hq // p, max(k.shape[2] // p, 1)
    # (B, S/P, Hq, D) -> (B, S/P, groups, rep, Hq/P, D) -> (groups, rep, B, S/P, Hq/P, D)
    q6 = q.reshape(bsz, s_local, groups, rep, hq_l, dim).permute(2, 3, 0, 1, 4, 5)

    def kv6(t: torch.Tensor) -> torch.Tensor:
        # (B, S/P, Hkv, D) -> (B, S/P, groups, 1, Hkv', D) -> (B, S/P, groups, rep, Hkv', D)
        #   -> (groups, rep, B, S/P, Hkv', D)
        t = t.reshape(bsz, s_local, groups, 1, hkv_l, dim)
        return t.expand(bsz, s_local, groups, rep, hkv_l, dim).permute(2, 3, 0, 1, 4, 5)

    send = torch.cat([q6, kv6(k), kv6(v)], dim=4)  # (groups, rep, B, S/P, Hq/P + 2*Hkv', D)
    # (groups, rep) is rank j = g * rep + i, in order: -> (P, B, S/P, W, D), contiguous
    return send.view(p, bsz, s_local, hq_l + 2 * hkv_l, dim)
