"""UlyssesAttention against single-process attention on the gathered sequence.

Every rank builds the same global q/k/v (seeded), computes the full-sequence reference itself,
feeds its own sequence slice through UlyssesAttention, and reports relative errors of the output
and of the q/k/v gradients on its slice. One 4-rank spawn covers P = 4 (the world), P = 2 (two
pairs: group rank != global rank) and P = 1 (singleton groups); the tests assert on the results.
Head configurations cover kv replication (Hkv < P), Hkv == P and Hkv > P, because a wrong
query-head -> kv-head pairing after sharding only shows up in some of them.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from support.common import fwd_bwd, rel_err
from support.spawn import CollectiveCounter, block_group, run_distributed, sp_gpt_errors
from ulysses_train.config.schema import ModelConfig
from ulysses_train.model.attention import eager_attention, sdpa_attention
from ulysses_train.parallel import comm
from ulysses_train.parallel.ulysses import UlyssesAttention

WORLD, S, D = 4, 16, 8
TOL = 1e-5
KERNELS = {"sdpa": sdpa_attention, "eager": eager_attention}
# (P, Hq, Hkv, batch): Hkv < P replicates kv, Hkv == P, Hkv > P, MHA; one batch-1 case (views).
CASES = [(4, 8, 1, 2), (4, 8, 2, 2), (4, 8, 4, 2), (4, 16, 8, 2), (4, 8, 8, 2), (4, 8, 2, 1),
         (2, 4, 1, 2), (2, 4, 2, 2), (2, 8, 4, 2), (2, 4, 4, 2)]


def _sdpa_any_v(q, k, v, *, causal=True):
    """SDPA allowing v's head dim to differ from q/k's (forces the unfused path)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).contiguous()


def _global_inputs(batch, hq, hkv, dv=D, seed=0):
    """Global q, k, v (B, S, H, D) and an upstream gradient for the output."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, S, hq, D, generator=g), torch.randn(batch, S, hkv, D, generator=g),
            torch.randn(batch, S, hkv, dv, generator=g), torch.randn(batch, S, hq, dv, generator=g))


def _compare(group, fn, batch, hq, hkv, dv=D, **kw) -> dict[str, object]:
    p, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, grad_out = _global_inputs(batch, hq, hkv, dv)
    reference = fwd_bwd(fn, q, k, v, grad_out, **kw)  # the whole sequence in one process
    mine = slice(r * S // p, (r + 1) * S // p)  # this rank's tokens
    with CollectiveCounter() as fwd_bwd_count:
        got = fwd_bwd(UlyssesAttention(fn, group), q[:, mine], k[:, mine], v[:, mine],
                       grad_out[:, mine], **kw)
    errors = {name: rel_err(a, b[:, mine]) for name, a, b in zip(("out", "dq", "dk", "dv"), got, reference)}
    return {"errors": errors, "collectives": fwd_bwd_count.total, "shape": tuple(got[0].shape)}


def _count_forward(group, batch=2, hq=8, hkv=2) -> tuple[int, int]:
    """All-to-alls issued by one forward, then by its backward."""
    q, k, v, grad_out = (t[:, : S // dist.get_world_size(group)].requires_grad_()
                         for t in _global_inputs(batch, hq, hkv))
    attn = UlyssesAttention(sdpa_attention, group)
    with CollectiveCounter() as forward:
        out = attn(q, k, v)
    with CollectiveCounter() as backward:
        (out * grad_out).sum().backward()
    assert forward.total == forward.counts["all_to_all_single"]
    return forward.total, backward.total


def _size_one(group) -> dict[str, bool]:
    """On a size-1 group the wrapper must be exactly the local kernel (outputs and grads)."""
    q, k, v, grad_out = _global_inputs(2, 8, 2)
    with CollectiveCounter() as count:
        got = fwd_bwd(UlyssesAttention(sdpa_attention, group), q, k, v, grad_out)
    want = fwd_bwd(sdpa_attention, q, k, v, grad_out)
    return {"equal": all(torch.equal(a, b) for a, b in zip(got, want)), "collectives": count.total}


def _value_error(call) -> str:
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _bad_heads(group) -> dict[str, object]:
    """Messages of the ValueErrors for head counts Ulysses cannot split (P = 4)."""
    attn = UlyssesAttention(sdpa_attention, group)
    messages: dict[str, object] = {}
    with CollectiveCounter() as count:  # nothing may be sent before the check: ranks stay in step
        for name, (hq, hkv) in {"hq": (6, 2), "kv_vs_p": (12, 3), "gqa": (8, 3)}.items():
            q, k, v, _ = _global_inputs(1, hq, hkv)
            messages[name] = _value_error(lambda q=q, k=k, v=v: attn(q[:, :4], k[:, :4], v[:, :4]))
        messages["rank3"] = _value_error(
            lambda: attn(torch.zeros(4, 8, 8), torch.zeros(4, 2, 8), torch.zeros(4, 2, 8)))
    messages["collectives"] = count.total
    return messages


def _gpt_drop_in(group) -> dict[str, float]:
    """The GPT with `attention_fn=UlyssesAttention(...)` on its slice == the plain GPT (P = 4)."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=128)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, S), generator=g)
    labels = torch.randint(0, 128, (2, S), generator=g)
    positions = torch.arange(S).expand(2, S)  # global positions: rank r passes r*S/P ...
    return sp_gpt_errors(group, cfg, ids, positions, labels)


def _compat_path(group) -> dict[str, dict]:
    """The path for a torch whose base functional ops have no autograd (the public wrapper)."""
    native, comm._NATIVE_AUTOGRAD = comm._NATIVE_AUTOGRAD, False
    try:
        return {batch: _compare(group, sdpa_attention, batch, 8, 1) for batch in (1, 2)}  # kv replicated
    finally:
        comm._NATIVE_AUTOGRAD = native


def _ulysses_job(rank: int, world: int) -> dict:
    results = {}
    for p in (4, 2, 1):
        group = block_group(p)
        if p == 1:
            results["size1"] = _size_one(group)
            continue
        for case in (c for c in CASES if c[0] == p):
            for kernel, fn in KERNELS.items():
                results[(*case, kernel)] = _compare(group, fn, *case[3:], *case[1:3])
        results[(p, "count")] = _count_forward(group)
        results[(p, "unfused")] = _compare(group, _sdpa_any_v, 2, 8, 2, dv=2 * D)
        if p == 4:
            results["noncausal"] = _compare(group, sdpa_attention, 2, 8, 2, causal=False)
            results["bad"] = _bad_heads(group)
            results["gpt"] = _gpt_drop_in(group)
    return results


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_ulysses_job, WORLD, timeout=180)


def _worst(results, key) -> dict[str, float]:
    return {name: max(res[key]["errors"][name] for res in results) for name in results[0][key]["errors"]}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("p,hq,hkv,batch", CASES)
def test_matches_full_attention(results, p, hq, hkv, batch, kernel):
    key = (p, hq, hkv, batch, kernel)
    worst = _worst(results, key)
    assert max(worst.values()) <= TOL, worst
    assert {res[key]["shape"] for res in results} == {(batch, S // p, hq, D)}


def test_kwargs_pass_through_non_causal(results):
    worst = _worst(results, "noncausal")
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("p", [4, 2])
def test_two_all_to_alls_forward_two_backward(results, p):
    # q, k, v share one all-to-all and the output takes one: 2 forward; their adjoints: 2 backward.
    assert {res[(p, "count")] for res in results} == {(2, 2)}


@pytest.mark.parametrize("p", [4, 2])
def test_unfusable_qkv_still_exact(results, p):
    # v with another head dim cannot share q/k's buffer: q, k, v, out = 4 exchanges each way.
    worst = _worst(results, (p, "unfused"))
    assert max(worst.values()) <= TOL, worst
    assert {res[(p, "unfused")]["collectives"] for res in results} == {8}


def test_size_one_group_is_exactly_the_local_kernel(results):
    assert all(res["size1"]["equal"] for res in results)
    assert {res["size1"]["collectives"] for res in results} == {0}


def test_bad_head_counts_raise_clear_value_errors(results):
    bad = results[0]["bad"]
    assert "query heads (6) must be divisible by the sequence-parallel size (4)" in bad["hq"]
    assert "kv heads (3) and sequence-parallel size (4) must divide one another" in bad["kv_vs_p"]
    assert "query heads (8) must be a multiple of kv heads (3)" in bad["gqa"]
    assert "expects q, k, v as (B, S/P, H, D)" in bad["rank3"]
    assert bad["collectives"] == 0


def test_drop_in_attention_fn_for_gpt(results):
    worst = {name: max(res["gpt"][name] for res in results) for name in results[0]["gpt"]}
    assert max(worst.values()) <= TOL, worst


# --- paths that import torch._dynamo (2-6 s per rank): a 2-rank job of their own ---

def _compile_case(group) -> dict[str, object]:
    """torch.compile sees the collectives as graph nodes: one graph, no break, same gradients."""
    attn = UlyssesAttention(sdpa_attention, group)
    p, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, grad_out = (t[:, r * S // p: (r + 1) * S // p] for t in _global_inputs(2, 8, 2))
    explained = torch._dynamo.explain(attn)(q, k, v)
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    eager, got = fwd_bwd(attn, q, k, v, grad_out), fwd_bwd(compiled, q, k, v, grad_out)
    return {"graphs": explained.graph_count, "breaks": explained.graph_break_count,
            "errors": {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, eager)}}


def _dynamo_job(rank: int, world: int) -> dict:
    return {"compile": _compile_case(None),  # group None: the default group
            "compat": _compat_path(dist.group.WORLD)}


@pytest.fixture(scope="module")
def dynamo_results() -> list[dict]:
    return run_distributed(_dynamo_job, 2, timeout=300)


def test_compiles_to_one_graph_with_the_same_gradients(dynamo_results):
    for res in dynamo_results:
        assert (res["compile"]["graphs"], res["compile"]["breaks"]) == (1, 0)
        assert max(res["compile"]["errors"].values()) <= TOL, res["compile"]["errors"]


@pytest.mark.parametrize("batch", [1, 2])
def test_older_torch_collective_path_is_exact(dynamo_results, batch):
    # torch without autograd on the base functional ops: the public autograd wrapper instead.
    worst = {name: max(res["compat"][batch]["errors"][name] for res in dynamo_results)
             for name in dynamo_results[0]["compat"][batch]["errors"]}
    assert max(worst.values()) <= TOL, worst
