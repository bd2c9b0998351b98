"""PipelinedUlyssesAttention (G head groups) against the one-exchange layer (G = 1).

One 4-rank spawn runs every case on each rank's slice: the output and the q/k/v gradients at
G in {2, 4, 8} must equal UlyssesAttention's (the same layer at G = 1) to 1e-6 relative, with
kv replication (Hkv < P: kv travels once with group 0), split kv (each group its own kv heads),
MHA, document masks over a padded row, sliding windows, a non-causal call, the eager kernel
(the recompute path), and the Ulysses x ring layer (sp=4, ring=2) with and without a mask.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from support.common import fwd_bwd, rel_err
from support.ring import doc_ids, hybrid_groups
from support.spawn import CollectiveCounter, run_distributed
from ulysses_train.model.attention import eager_attention, sdpa_attention
from ulysses_train.model.masking import DocumentMask
from ulysses_train.parallel.layout import SequenceLayout
from ulysses_train.parallel.ring import UlyssesRingAttention
from ulysses_train.parallel.ulysses import UlyssesAttention
from ulysses_train.parallel.ulysses_pipeline import PipelinedUlyssesAttention

WORLD, S, D = 4, 32, 8
TOL = 1e-6
# name: (Hq, Hkv, batch, G values, kernel, call kwargs builder)
CASES = {
    "replicated_kv": (32, 2, 2, (2, 4, 8)),  # Hkv < P: one kv head per rank, resident
    "kv_per_rank_2": (32, 8, 1, (2, 4, 8)),  # G=2 splits kv; 4, 8 keep both heads resident
    "mha": (16, 16, 2, (2, 4)),
}


def _inputs(batch, hq, hkv, seq=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, h, D, generator=g) for h in (hq, hkv, hkv, hq)]


def _errors(got, want) -> dict[str, float]:
    return {n: rel_err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}


def _vs_one_group(group, hq, hkv, batch, chunks, kernel=sdpa_attention, seq=S, **kw):
    """Max relative errors of G head groups vs G = 1 on this rank's slice."""
    p, r = group.size(), group.rank()
    q, k, v, grad = _inputs(batch, hq, hkv, seq)
    mine = slice(r * seq // p, (r + 1) * seq // p)
    args = [t[:, mine] for t in (q, k, v, grad)]
    want = fwd_bwd(UlyssesAttention(kernel, group), *args, **kw)
    out = {}
    for g in chunks:
        out[g] = _errors(fwd_bwd(PipelinedUlyssesAttention(kernel, group, g), *args, **kw), want)
    return out


def _masked(group, window=0):
    """A document mask over a row whose last 6 tokens are padding (id -1), optionally windowed."""
    ids = doc_ids(2, S - 6, S)  # (B, S): random documents, then padding
    return _vs_one_group(group, 16, 4, 2, (2, 4), mask=DocumentMask(ids), window=window)


def _ring(sp_groups, sp_rank, masked, window=0):
    """UlyssesRingAttention(chunks=G) vs chunks=1 at sp=4, ring=2 (Ulysses 2 x ring 2)."""
    layout = SequenceLayout(S - 4, 4, 2)  # 28 tokens padded to 32
    q, k, v, grad = _inputs(2, 16, 4, layout.padded_len)
    kw = {"window": window} if window else {}
    if masked:
        kw["mask"] = DocumentMask(doc_ids(2, layout.seq_len, layout.padded_len))
    pos = layout.rank_positions(sp_rank)
    args = [t[:, pos] for t in (q, k, v, grad)]
    want = fwd_bwd(UlyssesRingAttention(*sp_groups, layout), *args, **kw)
    return {g: _errors(fwd_bwd(UlyssesRingAttention(*sp_groups, layout, chunks=g), *args, **kw), want)
            for g in (2, 4)}


def _bad_chunks(group) -> dict[str, object]:
    q, k, v, _ = _inputs(1, 16, 4, S)
    mine = slice(0, S // 4)
    messages = {}
    with CollectiveCounter() as count:
        for g in (3, 0):
            try:
                PipelinedUlyssesAttention(sdpa_attention, group, g)(q[:, mine], k[:, mine], v[:, mine])
                messages[g] = "no error"
            except ValueError as exc:
                messages[g] = str(exc)
    messages["collectives"] = count.total
    return messages


def _count(group) -> dict[str, int]:
    """All-to-alls of one forward and one backward at G = 4, and the bytes they carry."""
    q, k, v, grad = (t[:, :S // 4].requires_grad_() for t in _inputs(2, 16, 4, S))
    counts = {}
    for g in (1, 4):
        attn = PipelinedUlyssesAttention(sdpa_attention, group, g) if g > 1 else UlyssesAttention(sdpa_attention, group)
        with CollectiveCounter() as fwd:
            out = attn(q, k, v)
        with CollectiveCounter() as bwd:
            out.backward(grad[:, :S // 4])
        counts[g] = (fwd.counts["all_to_all_single"], bwd.counts["all_to_all_single"])
    return counts


def _job(rank, world):
    world_group = dist.group.WORLD
    results = {name: _vs_one_group(world_group, hq, hkv, b, gs) for name, (hq, hkv, b, gs) in CASES.items()}
    results["eager"] = _vs_one_group(world_group, 16, 4, 2, (2, 4), kernel=eager_attention)
    results["noncausal"] = _vs_one_group(world_group, 16, 4, 2, (4,), causal=False)
    results["masked"] = _masked(world_group)
    results["window"] = _vs_one_group(world_group, 16, 4, 2, (2, 4), window=5)
    results["masked_window"] = _masked(world_group, window=5)
    results["bad"] = _bad_chunks(world_group)
    results["count"] = _count(world_group)
    groups, sp_rank, _ = hybrid_groups(4, 2)
    results["ring"] = _ring(groups, sp_rank, masked=False)
    results["ring_masked"] = _ring(groups, sp_rank, masked=True)
    results["ring_window"] = _ring(groups, sp_rank, masked=True, window=5)
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, WORLD, timeout=120)


NAMES = [*CASES, "eager", "noncausal", "masked", "window", "masked_window", "ring", "ring_masked",
         "ring_window"]


@pytest.mark.parametrize("name", NAMES)
def test_head_groups_equal_one_exchange(results, name):
    worst = {}
    for per_rank in results:
        for g, errors in per_rank[name].items():
            for key, err in errors.items():
                worst[(g, key)] = max(worst.get((g, key), 0.0), err)
    print(f"{name}: worst relative error {max(worst.values()):.2e}")
    assert all(err <= TOL for err in worst.values()), worst


def test_bad_group_counts_raise_before_any_exchange(results):
    bad = results[0]["bad"]
    assert "valid: [1, 2, 4]" in bad[3] and "whole kv heads" in bad[3]
    assert "valid" in bad[0]
    assert bad["collectives"] == 0


def test_collective_counts_and_g1_layout(results):
    # G = 1 is one exchange each way (q, k, v packed); G = 4 is 4 + 4 each way.
    assert results[0]["count"][1] == (2, 2)
    assert results[0]["count"][4] == (8, 8)
