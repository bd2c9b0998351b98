"""Blockwise pieces of ring attention: which sub-blocks to compute, the local kernels, the merge.

Layout inside the ring (see parallel/layout.py): the padded row of S' tokens is cut into 2R
chunks of c = S'/(2R); ring rank i holds chunks i and 2R-1-i (in that order, L = 2c local
tokens); with R = 1 it holds the whole row as one chunk. At ring step t it holds the K/V block
of ring rank (i - t) mod R. Every (query chunk, key chunk) pair is a *sub-block*:
- causal by global chunk index: key chunk < query chunk -> "full", equal -> "causal" (the
  diagonal, square and aligned), greater -> skipped (never computed);
- with document ids: a sub-block where no query sees any key is skipped; one where every
  causally allowed pair is in the same document keeps its plain kind; anything else is
  "masked" and runs with an additive float bias (0 / -inf).

Kernels work in SDPA's (B, H, S, D) layout and return the block output and its log-sum-exp
LSE[b, h, s] = log sum_j exp(q_s . k_j * scale) over the block's visible keys (natural log,
fp32). A row that sees no key in a block has LSE = -inf (the CPU flash op reports 0 there,
with a zero output: that row is overwritten with -inf here, else the merge would count a
phantom key of weight exp(0 - LSE)). The merge is the online-softmax rescaling of
FlashAttention (Dao et al., 2022) / Ring Attention (Liu et al., 2023), done in fp32.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed import ProcessGroup
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import _disable_current_modes

FULL, CAUSAL, MASKED = "full", "causal", "masked"


@dataclass
class SubBlock:
    """One (query chunk, key chunk) pair to compute at a ring step.

    q_rows / k_rows: slices of the local query tokens and of the K/V block's tokens.
    kind: FULL (every key visible), CAUSAL (aligned diagonal) or MASKED (use `bias`).
    q_chunk / k_chunk: global chunk indices (what the document bias is built from).
    """

    q_rows: slice
    k_rows: slice
    kind: str
    q_chunk: int
    k_chunk: int


def rank_chunks(ring_rank: int, ring: int) -> list[int]:
    """Global chunk indices a ring rank holds, in local order: [i, 2R-1-i], or [0] when R = 1."""
    return [0] if ring == 1 else [ring_rank, 2 * ring - 1 - ring_rank]


def step_plans(ring_rank: int, ring: int, local_len: int, causal: bool,
               host_ids: torch.Tensor | None) -> list[list[SubBlock]]:
    """The sub-blocks ring rank i computes at each step t = 0 .. R-1 (K/V of rank (i-t) mod R).

    `host_ids`: the GLOBAL padded rows (B, S') in natural position order, ON THE CPU
    (`DocumentMask.host_ids`), or None. Which sub-blocks the documents empty or leave plain is
    decided from them in numpy: no device sync (the kernels' biases use the device ids).
    """
    n_chunks = len(rank_chunks(0, ring))
    c = local_len // n_chunks
    mine = rank_chunks(ring_rank, ring)
    candidates = []  # (step, SubBlock) passing the positional test
    for t in range(ring):
        theirs = rank_chunks((ring_rank - t) % ring, ring)
        for a, qa in enumerate(mine):
            for b, kb in enumerate(theirs):
                if causal and kb > qa:
                    continue  # every key is in the future of every query: never computed
                kind = CAUSAL if causal and kb == qa else FULL
                candidates.append((t, SubBlock(slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c),
                                               kind, qa, kb)))
    if host_ids is not None:
        ids = host_ids.numpy()  # host memory: raises (rather than syncs) if handed device ids
        for _, blk in candidates:
            any_visible, plain = _document_flags(ids, blk, c)
            blk.kind = None if not any_visible else blk.kind if plain else MASKED
    plans: list[list[SubBlock]] = [[] for _ in range(ring)]
    for t, blk in candidates:
        if blk.kind is not None:
            plans[t].append(blk)
    return plans


def host_copy(document_ids: torch.Tensor | None, host_ids: torch.Tensor | None
              ) -> torch.Tensor | None:
    """`host_ids`, or for a caller without one (direct use, tests) the ids copied to the CPU:
    a device sync there, none when the ids are already on the CPU."""
    if host_ids is not None or document_ids is None:
        return host_ids
    return document_ids.cpu()


def visible(document_ids: torch.Tensor, blk: SubBlock, c: int) -> torch.Tensor:
    """(B, c, c) bool: query row sees key column (same document, and causal on the diagonal).

    Document masks are always causal, so a diagonal sub-block keeps its triangle whatever its
    kind (also once it has become MASKED)."""
    qd = document_ids[:, blk.q_chunk * c:(blk.q_chunk + 1) * c]  # (B, c)
    kd = document_ids[:, blk.k_chunk * c:(blk.k_chunk + 1) * c]  # (B, c)
    vis = qd[:, :, None] == kd[:, None, :]  # (B, c, 1) vs (B, 1, c) -> (B, c, c)
    if blk.q_chunk == blk.k_chunk:
        vis &= torch.ones(c, c, dtype=torch.bool, device=vis.device).tril()
    return vis


def _document_flags(ids: np.ndarray, blk: SubBlock, c: int) -> tuple[bool, bool]:
    """(any key visible, every positionally allowed key visible) of one sub-block, from the
    (B, S') host ids (numpy: decided on the host, `step_plans`)."""
    qd = ids[:, blk.q_chunk * c:(blk.q_chunk + 1) * c, None]  # (B, c, 1)
    kd = ids[:, None, blk.k_chunk * c:(blk.k_chunk + 1) * c]  # (B, 1, c)
    vis = qd == kd  # (B, c, c)
    if blk.q_chunk == blk.k_chunk:
        allowed = np.tri(c, dtype=bool)  # the diagonal keeps its lower triangle
        vis &= allowed
        return bool(vis.any()), bool((vis == allowed).all())
    return bool(vis.any()), bool(vis.all())


def document_bias(document_ids: torch.Tensor, blk: SubBlock, c: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MASKED sub-block's additive bias (B, 1, c, c) (0 visible, -inf not) in `dtype`, and
    (B, c) bool rows that see no key in it (their LSE must become -inf)."""
    vis = visible(document_ids, blk, c)
    bias = torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, float("-inf"))
    return bias.unsqueeze(1), ~vis.any(dim=-1)  # (B, c, c) -> (B, 1, c, c): every head


@functools.cache
def _cpu_native_gqa() -> bool:
    """Whether this torch's CPU flash op takes fewer kv heads than query heads (2.13 does)."""
    x = torch.zeros(1, 2, 1, 8)
    # Outside any dispatch mode: the first call may happen under selective checkpointing, whose
    # op cache would count this probe as the first attention call and replay its (1, 2, 1, 8)
    # output for the real one on recompute (the cached answer makes the recompute skip it).
    with _disable_current_modes():
        try:
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(x, x[:, :1], x[:, :1], 0.0, False)
        except RuntimeError:
            return False
    return True


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native: bool):
    """k, v repeated to q's heads (GQA, repeat_interleave convention) unless the op does it."""
    rep = q.shape[1] // k.shape[1]
    if rep == 1 or native:
        return k, v, 1
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), rep


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sub-block: q (B, Hq, cq, D), k/v (B, Hkv, ck, D) -> out (B, Hq, cq, D) in q's dtype
    and LSE (B, Hq, cq) fp32. `bias`: (B, 1, cq, ck) additive, for MASKED only.

    CPU: `aten._scaled_dot_product_flash_attention_for_cpu` (returns the LSE). CUDA: the
    memory-efficient SDPA op with `compute_log_sumexp=True` (takes a bias; UNTESTED: no GPU
    was available where this was written).
    """
    causal = kind == CAUSAL
    if q.device.type == "cuda":
        k, v, _ = _expand_kv(q, k, v, native=False)
        bias = None if bias is None else bias.expand(-1, q.shape[1], -1, -1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal)[:2]
        return out, lse[..., :q.shape[2]].float()  # the op may pad the LSE's last dim
    k, v, _ = _expand_kv(q, k, v, native=_cpu_native_gqa())
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, kind: str, bias: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one sub-block from the GLOBAL output and LSE of its query rows.

    With the final `out` and `lse` the block's probabilities exp(q k^T * scale + bias - LSE)
    are exactly its share of the full softmax, and rowsum(dout * out) is the full softmax's
    correction term, so the per-block gradients add up to the full ones (FlashAttention-2's
    backward, Dao 2023, applied block by block). Shapes as `block_forward`; returns dq
    (B, Hq, cq, D), dk / dv (B, Hkv, ck, D). CUDA path UNTESTED (see block_forward).
    """
    causal = kind == CAUSAL
    hkv = k.shape[1]
    if q.device.type == "cuda":
        k, v, rep = _expand_kv(q, k, v, native=False)
        bias = None if bias is None else bias.expand(-1, q.shape[1], -1, -1)
        empty = torch.empty(0, dtype=torch.int64, device=q.device)  # no dropout: no philox state
        dq, dk, dv = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse.contiguous(), empty, empty, 0.0,
            [True, True, True, False], causal)[:3]
    else:
        k, v, rep = _expand_kv(q, k, v, native=_cpu_native_gqa())
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias)
    if rep > 1:  # sum the gradients of the repeated kv copies: (B, Hkv*rep, ck, D) -> (B, Hkv, ck, D)
        dk, dv = (t.unflatten(1, (hkv, rep)).sum(2) for t in (dk, dv))
    return dq, dk, dv


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax results over disjoint key sets (fp32).

    out (B, H, s, D) fp32 with lse (B, H, s) fp32 (-inf: no key yet), and a block's result.
    new_lse = log(exp(lse) + exp(block_lse)); new_out = (exp(lse - new_lse) * out +
    exp(block_lse - new_lse) * block_out). Rows where both are -inf stay (0, -inf) instead of
    0/0 = NaN: the shift uses max(lse, block_lse) replaced by 0 where it is -inf.
    """
    top = torch.maximum(lse, block_lse)
    top = top.masked_fill(torch.isneginf(top), 0.0)
    w_old, w_new = torch.exp(lse - top), torch.exp(block_lse - top)  # (B, H, s), 0 for -inf
    total = w_old + w_new
    safe = torch.where(total > 0, total, torch.ones_like(total))
    new_out = (out * w_old.unsqueeze(-1) + block_out.float() * w_new.unsqueeze(-1)) / safe.unsqueeze(-1)
    return new_out, top + torch.log(total)  # log(0) = -inf where no key was seen at all


def group_by_name(name: str) -> ProcessGroup:
    """The process group named `name`: the ring ops (ring.py, ring_window.py) take no
    ProcessGroup objects, only names, and this is how torch's own functional collectives turn a
    name back into its group (private, stable since 2.3; one place to change if it moves)."""
    return _resolve_process_group(name)
