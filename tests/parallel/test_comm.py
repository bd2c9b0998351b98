"""Sequence<->head all-to-all: exact element placement, round trips, gradients, collective count.

Tensors are position-encoded: the value at (b, s, h, d) of the *global* tensor is its flat
index, so an exact `torch.equal` against a slice of the global tensor proves every element
landed where it should (a wrong permutation or a misread strided buffer cannot pass).
One 4-rank spawn checks P = 4 (the world), P = 2 (two pairs, group rank != global rank) and
P = 1 (singleton groups) together; the tests below assert on its results.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from support.spawn import CollectiveCounter, block_group, run_distributed
from ulysses_train.parallel.comm import (
    head_to_seq,
    kv_replication,
    seq_to_head,
    seq_to_head_qkv,
)

B, S, D = 2, 8, 3
WORLD = 4


def _encoded(heads: int, offset: int = 0) -> torch.Tensor:
    """Global (B, S, heads, D) tensor whose values are their flat index (+ offset); exact in fp32."""
    return torch.arange(B * S * heads * D, dtype=torch.float32).add(offset).view(B, S, heads, D)


def _backward(outputs, grads) -> None:
    """Backward with upstream gradients `grads`, as sum(out * grad).backward().

    Same gradients as `torch.autograd.backward(outputs, grads)`, but that call imports sympy on
    first use (~1 s per spawned rank); a scalar loss does not.
    """
    sum((o * g).sum() for o, g in zip(outputs, grads)).backward()


def _all_to_all_count(mode: CollectiveCounter) -> int:
    assert mode.total == mode.counts["all_to_all_single"], mode.counts  # nothing but all-to-alls
    return mode.total


def _single_tensor_case(group, heads: int) -> dict[str, bool]:
    p, r = dist.get_world_size(group), dist.get_rank(group)
    seq, hp = slice(r * S // p, (r + 1) * S // p), slice(r * heads // p, (r + 1) * heads // p)
    full, grad_full = _encoded(heads), _encoded(heads, offset=0.5)
    x = full[:, seq].clone().requires_grad_()  # (B, S/P, H, D), this rank's tokens
    y = seq_to_head(x, group)  # (B, S, H/P, D)
    _backward([y], [grad_full[:, :, hp]])  # the gradient of our heads, over all tokens
    back = head_to_seq(full[:, :, hp].clone(), group)  # (B, S, H/P, D) -> (B, S/P, H, D)
    return {
        "seq_to_head": torch.equal(y, full[:, :, hp]),
        "seq_to_head_backward": torch.equal(x.grad, grad_full[:, seq]),
        "head_to_seq": torch.equal(back, full[:, seq]) and back.is_contiguous(),
        "round_trip": torch.equal(head_to_seq(seq_to_head(full[:, seq], group), group), full[:, seq]),
        "size1_is_input": p > 1 or (seq_to_head(x, group) is x and head_to_seq(x, group) is x),
    }


def _fused_case(group, hq: int, hkv: int) -> dict[str, object]:
    p, r = dist.get_world_size(group), dist.get_rank(group)
    rep = kv_replication(hkv, p)
    seq = slice(r * S // p, (r + 1) * S // p)
    hkv_l = max(hkv // p, 1)
    fq, fk, fv = _encoded(hq), _encoded(hkv, 1e5), _encoded(hkv, 2e5)
    # Expected kv on rank j: the heads of the replicated tensor (repeat_interleave convention).
    fk_rep, fv_rep = fk.repeat_interleave(rep, dim=2), fv.repeat_interleave(rep, dim=2)
    hp, kvp = slice(r * hq // p, (r + 1) * hq // p), slice(r * hkv_l, (r + 1) * hkv_l)
    q, k, v = (t[:, seq].clone().requires_grad_() for t in (fq, fk, fv))
    with CollectiveCounter() as mode:
        qh, kh, vh = seq_to_head_qkv(q, k, v, group)
    fwd = _all_to_all_count(mode)
    gq, gk_rep, gv_rep = _encoded(hq, 0.25), _encoded(hkv * rep, 0.5), _encoded(hkv * rep, 0.75)
    with CollectiveCounter() as mode:
        _backward([qh, kh, vh], [gq[:, :, hp], gk_rep[:, :, kvp], gv_rep[:, :, kvp]])
    bwd = _all_to_all_count(mode)
    # Replicas' gradients are summed back into the kv head they came from (exact GQA gradient).
    gk_sum = gk_rep.view(B, S, hkv, rep, D).sum(3)
    gv_sum = gv_rep.view(B, S, hkv, rep, D).sum(3)
    return {
        "values": (torch.equal(qh, fq[:, :, hp]) and torch.equal(kh, fk_rep[:, :, kvp])
                   and torch.equal(vh, fv_rep[:, :, kvp])),
        "grads": (torch.equal(q.grad, gq[:, seq]) and torch.equal(k.grad, gk_sum[:, seq])
                  and torch.equal(v.grad, gv_sum[:, seq])),
        "collectives": (fwd, bwd),
    }


def _unfused_case(group) -> dict[str, object]:
    """q in float64, k/v in float32: cannot share a buffer, so one exchange per tensor."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    seq, hp = slice(r * S // p, (r + 1) * S // p), slice(r * 4 // p, (r + 1) * 4 // p)
    q, k, v = _encoded(4).double()[:, seq], _encoded(4, 1e5)[:, seq], _encoded(4, 2e5)[:, seq]
    with CollectiveCounter() as mode:
        qh, kh, vh = seq_to_head_qkv(q, k, v, group)
    ok = (torch.equal(qh, _encoded(4).double()[:, :, hp]) and torch.equal(kh, _encoded(4, 1e5)[:, :, hp])
          and torch.equal(vh, _encoded(4, 2e5)[:, :, hp]))
    return {"values": ok, "collectives": _all_to_all_count(mode)}


HEADS = {4: [(4, 4), (8, 2), (8, 1), (8, 8)], 2: [(4, 4), (4, 1), (8, 2), (8, 4)], 1: [(4, 2)]}


def _comm_job(rank: int, world: int) -> dict:
    results = {}
    for p in (4, 2, 1):
        group = block_group(p)
        for heads in (4, 8):
            results[(p, "single", heads)] = _single_tensor_case(group, heads)
        for hq, hkv in HEADS[p]:
            results[(p, "fused", hq, hkv)] = _fused_case(group, hq, hkv)
        results[(p, "unfused")] = _unfused_case(group)
    return results


@pytest.fixture(scope="module")
def comm_results() -> list[dict]:
    return run_distributed(_comm_job, WORLD, timeout=120)


def _all_ranks(results: list[dict], key, field):
    return [res[key][field] for res in results]


@pytest.mark.parametrize("p", [4, 2, 1])
@pytest.mark.parametrize("heads", [4, 8])
@pytest.mark.parametrize("check", ["seq_to_head", "seq_to_head_backward", "head_to_seq",
                                   "round_trip", "size1_is_input"])
def test_single_tensor_placement(comm_results, p, heads, check):
    assert all(_all_ranks(comm_results, (p, "single", heads), check))


@pytest.mark.parametrize("p,hq,hkv", [(p, hq, hkv) for p, cases in HEADS.items() for hq, hkv in cases])
def test_fused_qkv_placement_and_gradients(comm_results, p, hq, hkv):
    key = (p, "fused", hq, hkv)
    assert all(_all_ranks(comm_results, key, "values")), "q/k/v landed on the wrong rank or head"
    assert all(_all_ranks(comm_results, key, "grads")), "gradients did not return (and sum) correctly"
    # One exchange for q, k and v together, one for their gradients; none on a size-1 group.
    expected = (1, 1) if p > 1 else (0, 0)
    assert set(_all_ranks(comm_results, key, "collectives")) == {expected}


@pytest.mark.parametrize("p", [4, 2, 1])
def test_mixed_dtypes_fall_back_to_one_exchange_per_tensor(comm_results, p):
    assert all(_all_ranks(comm_results, (p, "unfused"), "values"))
    assert set(_all_ranks(comm_results, (p, "unfused"), "collectives")) == {3 if p > 1 else 0}


def test_kv_replication_rules():
    assert [kv_replication(h, 4) for h in (1, 2, 4, 8)] == [4, 2, 1, 1]
    with pytest.raises(ValueError, match="3 kv heads cannot be shared over 4"):
        kv_replication(3, 4)


# --- the run_distributed helper itself: a failing or dying rank must fail fast, not hang ---

def _raise_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        raise KeyError("boom from rank 1")
    dist.barrier()  # rank 0 would wait here forever without the failure handling
    return rank


def _die_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        os._exit(7)
    dist.barrier()
    return rank


def test_run_distributed_reraises_rank_exception_with_traceback():
    with pytest.raises(KeyError, match="boom from rank 1") as info:
        run_distributed(_raise_on_rank_1, 2, timeout=30)
    assert "rank 1 traceback" in str(info.value.__cause__)
    assert "_raise_on_rank_1" in str(info.value.__cause__)


def test_run_distributed_fails_fast_when_a_rank_dies():
    with pytest.raises(RuntimeError, match="rank 1 died without reporting"):
        run_distributed(_die_on_rank_1, 2, timeout=30)
