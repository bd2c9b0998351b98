"""Ring and hybrid Ulysses x ring attention against single-process full attention.

Every rank builds the same global q/k/v (natural position order, seeded), computes the
whole-row reference itself (SDPA, causal or with the dense document mask), feeds the tokens at
`layout.rank_positions(sp_rank)` through UlyssesRingAttention and reports relative errors of
the output and of the q/k/v gradients on those positions. One 8-rank spawn covers sp=8 ring=4
(past the 4 query heads), sp=8 ring=2, sp=4 ring=4 (pure ring; two sp groups), sp=4 ring=1
(must be exactly UlyssesAttention), causal and document-masked, batch 1 and 2, padded layouts;
it also records the structure (kernel calls, post/wait order). A 4-rank spawn measures memory
(MemTracker), selective checkpointing and scripts/bench_ulysses.py's counters (bytes of the
ring and head-group rows, their MemTracker peaks): these import torch._dynamo, hence a spawn
of their own.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from support.common import fwd_bwd, rel_err
from support.ring import Recorder, dense_mask, doc_ids, hybrid_groups, reference
from support.spawn import run_distributed
from ulysses_train.model.attention import sdpa_attention
from ulysses_train.model.masking import DocumentMask
from ulysses_train.parallel import ring as ring_mod
from ulysses_train.parallel.layout import SequenceLayout
from ulysses_train.parallel.ring import UlyssesRingAttention
from ulysses_train.parallel.ulysses import UlyssesAttention

WORLD, HQ, HKV, D = 8, 4, 2, 8
TOL = 1e-5
LAYOUTS = [(8, 4), (8, 2), (4, 4)]  # (sp, ring)
# (seq_len, batch, masked): 32 divides 2*sp for every layout; 27 and 21 are padded.
SHAPES = [(32, 1, False), (32, 2, False), (32, 1, True), (32, 2, True), (27, 2, False), (21, 2, True)]


def _inputs(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, h, D, generator=g) for h in (HQ, HKV, HKV, HQ)]  # q, k, v, grad


def _compare(groups, sp_rank, layout, batch, masked):
    """Errors of UlyssesRingAttention on this rank's positions vs the unpadded reference."""
    s, sp = layout.seq_len, layout.padded_len
    q, k, v, grad = _inputs(batch, sp)  # padded rows; the padding's values must not matter
    grad[:, s:] = 0  # padded positions carry no loss
    ids = doc_ids(batch, s, sp) if masked else None  # (B, S'), padding has id -1
    want = reference(q[:, :s], k[:, :s], v[:, :s], grad[:, :s], None if ids is None else ids[:, :s])
    pos = layout.rank_positions(sp_rank)
    attn = UlyssesRingAttention(*groups, layout)
    mask = None if ids is None else DocumentMask(ids)
    q, k, v = (t[:, pos].requires_grad_() for t in (q, k, v))
    with Recorder() as forward:
        out = attn(q, k, v, mask=mask)
    with Recorder() as backward:
        out.backward(grad[:, pos])
    got = (out.detach(), q.grad, k.grad, v.grad)
    real = pos < s  # compare real tokens only; padded rows are dropped by the loss
    errors = {name: rel_err(a[:, real], b[:, pos[real]]) if real.any() else 0.0
              for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    return {"errors": errors, "forward": forward.events, "backward": backward.events,
            "empty_rows": forward.empty_rows}


def _expected_calls(layout, ring_rank, batch, masked) -> list[int]:
    """Per ring step t, the sub-blocks (query chunk, key chunk of ring rank (i - t) mod R) with
    any visible pair, counted from the dense global mask (not from the ring's own plan)."""
    sp, r, c = layout.padded_len, layout.ring, layout.chunk_len()
    ids = doc_ids(batch, layout.seq_len, sp) if masked else None
    vis = dense_mask(sp, ids)  # (B, S', S') bool
    chunks = [[j, 2 * r - 1 - j] for j in range(r)]
    return [sum(bool(vis[:, a * c:(a + 1) * c, b * c:(b + 1) * c].any())
                for a in chunks[ring_rank] for b in chunks[(ring_rank - t) % r]) for t in range(r)]


def _size_one_ring(groups, sp_rank) -> bool:
    """sp=4 ring=1: the hybrid layer equals UlyssesAttention(sdpa) bit for bit."""
    layout = SequenceLayout(32, 4, 1)
    q, k, v, grad = (t[:, layout.rank_positions(sp_rank)] for t in _inputs(2, 32))
    got = fwd_bwd(UlyssesRingAttention(*groups, layout), q, k, v, grad)
    want = fwd_bwd(UlyssesAttention(sdpa_attention, groups[0]), q, k, v, grad)
    return all(torch.equal(a, b) for a, b in zip(got, want))


def _noncausal(groups, sp_rank) -> dict[str, float]:
    """causal=False: every sub-block is computed in full (sp=4 ring=4)."""
    layout = SequenceLayout(32, 4, 4)
    q, k, v, grad = _inputs(2, 32)
    want = fwd_bwd(sdpa_attention, q, k, v, grad, causal=False)
    pos = layout.rank_positions(sp_rank)
    with Recorder() as rec:
        got = fwd_bwd(UlyssesRingAttention(*groups, layout), *(t[:, pos] for t in (q, k, v, grad)),
                      causal=False)
    errors = {name: rel_err(a, b[:, pos]) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    return {"errors": errors, "calls": rec.events.count("F")}


def _bad_inputs(groups, sp_rank) -> dict[str, str]:
    """ValueErrors for inputs the ring cannot use, raised before anything is sent (sp=4 ring=4)."""
    layout = SequenceLayout(32, 4, 4)
    q, k, v, _ = (t[:, layout.rank_positions(sp_rank)] for t in _inputs(2, 32))
    attn = UlyssesRingAttention(*groups, layout)
    local_mask, global_mask = (DocumentMask(torch.zeros(2, n, dtype=torch.long)) for n in (8, 32))
    calls = {"local_mask": lambda: attn(q, k, v, mask=local_mask),
             "noncausal_mask": lambda: attn(q, k, v, causal=False, mask=global_mask),
             "tokens": lambda: attn(q[:, :4], k[:, :4], v[:, :4]),
             "layout": lambda: UlyssesRingAttention(*groups, SequenceLayout(32, 4, 2))}
    messages = {}
    with Recorder() as rec:
        for name, call in calls.items():
            try:
                call()
                messages[name] = "no error"
            except ValueError as exc:
                messages[name] = str(exc)
    messages["events"] = rec.events
    return messages


def _main_job(rank, world):
    results = {}
    for sp, ring in LAYOUTS:
        groups, sp_rank, ring_rank = hybrid_groups(sp, ring)
        for seq, batch, masked in SHAPES:
            layout = SequenceLayout(seq, sp, ring)
            res = _compare(groups, sp_rank, layout, batch, masked)
            res["expected_calls"] = _expected_calls(layout, ring_rank, batch, masked)
            results[(sp, ring, seq, batch, masked)] = res
        if (sp, ring) == (4, 4):
            results["noncausal"] = _noncausal(groups, sp_rank)
            results["bad"] = _bad_inputs(groups, sp_rank)
    groups, sp_rank, _ = hybrid_groups(4, 1)
    results["size1"] = _size_one_ring(groups, sp_rank)
    return results


@pytest.fixture(scope="module")
def main_results():
    return run_distributed(_main_job, WORLD, timeout=300)


@pytest.mark.parametrize("seq,batch,masked", SHAPES)
@pytest.mark.parametrize("sp,ring", LAYOUTS)
def test_matches_full_attention(main_results, sp, ring, seq, batch, masked):
    key = (sp, ring, seq, batch, masked)
    worst = {n: max(res[key]["errors"][n] for res in main_results) for n in ("out", "dq", "dk", "dv")}
    assert max(worst.values()) <= TOL, worst


def test_size_one_ring_is_exactly_ulysses(main_results):
    assert all(res["size1"] for res in main_results)


def test_non_causal_computes_every_block(main_results):
    for res in main_results:
        assert max(res["noncausal"]["errors"].values()) <= TOL, res["noncausal"]
        assert res["noncausal"]["calls"] == 4 * 4  # 2 x 2 sub-blocks at each of R = 4 steps


def test_bad_inputs_raise_before_any_transfer(main_results):
    bad = main_results[0]["bad"]
    assert "must describe the global padded rows (B, S') = (2, 32)" in bad["local_mask"]
    assert "pass causal=True" in bad["noncausal_mask"]
    assert "must hold S'/R = 8 tokens" in bad["tokens"]
    assert "the Ulysses group has 1 ranks but the layout expects 2" in bad["layout"]
    assert bad["events"] == ""


@pytest.mark.parametrize("seq,batch,masked", SHAPES)
@pytest.mark.parametrize("sp,ring", LAYOUTS)
def test_fully_masked_sub_blocks_are_skipped(main_results, sp, ring, seq, batch, masked):
    # One kernel call per sub-block with any visible (query, key) pair, forward and backward.
    res = [r[(sp, ring, seq, batch, masked)] for r in main_results]
    for r in res:
        assert r["forward"].count("F") == r["backward"].count("B") == sum(r["expected_calls"])
    if not masked:  # causal zig-zag: 3 sub-blocks at step 0, 2 at every other step, of 4 each
        assert {tuple(r["expected_calls"]) for r in res} == {(3,) + (2,) * (ring - 1)}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sp,ring", LAYOUTS)
def test_transfer_posted_before_kernels_and_waited_after(main_results, sp, ring, masked):
    # Forward, per step: post the next K/V block (p), this step's kernels (F), wait (w).
    # Backward, per step: post K/V (p), kernels (B), wait for the previous rank's share of this
    # block's dK/dV (x), post it onward (q), wait K/V (w); the last step sends dK/dV home (q x).
    for res in main_results:
        r = res[(sp, ring, 32, 2, masked)]
        n = r["expected_calls"]
        fwd = "".join(f"p{'F' * k}w" for k in n[:-1]) + "F" * n[-1]
        bwd = (f"p{'B' * n[0]}qw" + "".join(f"p{'B' * k}xqw" for k in n[1:-1])
               + f"{'B' * n[-1]}xqx")
        assert (r["forward"], r["backward"]) == (fwd, bwd)
        assert all(k > 0 for k in n[:-1]) or masked  # causal: every transfer overlaps kernels


@pytest.mark.parametrize("sp,ring", LAYOUTS)
def test_document_rows_seeing_no_key_in_a_step_occur(main_results, sp, ring):
    # The LSE = -inf fix is only tested if some masked sub-block has a row with no visible key.
    assert sum(res[(sp, ring, 32, 2, True)]["empty_rows"] for res in main_results) > 0


# --- MemTracker and selective checkpointing import torch._dynamo: a 4-rank spawn of their own ---

class _Stay:
    """A Transfer that sends nothing and receives nothing: the ring's memory without transfers."""

    def __init__(self, send, group, tag):
        self.send = send

    def wait(self):
        return self.send


def _peak_bytes(group, layout, sp_rank, stay=False) -> tuple[int, int]:
    """MemTracker peaks (bytes of the tensors created inside; inputs excluded) of the ring
    forward and backward functions on this rank's tokens (pure ring: no all-to-all)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    q, k, v, grad = (t[:, layout.rank_positions(sp_rank)] for t in _inputs(2, layout.padded_len))
    real, ring_mod.Transfer = ring_mod.Transfer, _Stay if stay else ring_mod.Transfer
    try:
        with MemTracker() as forward:
            out, lse = ring_mod.ring_forward(q, k, v, None, True, group)
        with MemTracker() as backward:
            ring_mod.ring_backward(grad, q, k, v, out, lse, None, True, group)
    finally:
        ring_mod.Transfer = real
    return tuple(sum(t["Total"] for t in mt.get_tracker_snapshot("peak").values())
                 for mt in (forward, backward))


def _memory(rank) -> dict[str, object]:
    """Ring peaks at R = 4 (the world) and R = 2 (pairs) with the same 16 local tokens, and at
    R = 4 with transfers that allocate nothing."""
    r4, r2 = SequenceLayout(64, 4, 4), SequenceLayout(32, 2, 2)
    pair = hybrid_groups(2, 2)[0][1]
    k_local = _inputs(2, 64)[1][:, r4.rank_positions(rank)]
    return {"r4": _peak_bytes(dist.group.WORLD, r4, rank), "r2": _peak_bytes(pair, r2, rank % 2),
            "r4_stay": _peak_bytes(dist.group.WORLD, r4, rank, stay=True),
            "kv_block": 2 * k_local.numel() * k_local.element_size()}


def _selective(groups, sp_rank, mode) -> dict[str, object]:
    """Ring transfers posted by forward and by backward of a checkpointed projection +
    attention, and its gradient error vs no checkpointing (sp=4 ring=2: all-to-alls too)."""
    from ulysses_train.parallel.activations import _checkpoint_fn

    layout = SequenceLayout(32, 4, 2)
    attn = UlyssesRingAttention(*groups, layout)
    torch.manual_seed(0)
    proj = torch.nn.Linear(D, D)
    x = _inputs(2, 32)[0][:, layout.rank_positions(sp_rank)]

    def block(t):
        h = proj(t)
        return attn(h, h[:, :, :HKV], h[:, :, HKV:])

    grads = []
    for fn in (None, _checkpoint_fn(mode)):
        proj.zero_grad()
        with Recorder() as forward:
            out = block(x) if fn is None else fn(block, x)
        with Recorder() as backward:
            out.sum().backward()
        grads.append(proj.weight.grad.clone())
    return {"forward": forward.events, "backward": backward.events,
            "error": rel_err(grads[1], grads[0])}


def _bench_module():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_ulysses.py")
    spec = importlib.util.spec_from_file_location("bench_ulysses", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _bench_bytes(rank, world) -> dict[str, tuple]:
    """scripts/bench_ulysses.py's bytes-sent counter vs its communication model (forward)."""
    bench = _bench_module()
    out = {}
    for hkv in (HKV, HQ):  # kv replicated by the Ulysses all-to-all, and not
        cfg = {"seq_len": 64, "heads": HQ, "kv_heads": hkv, "head_dim": D, "batch": 1}
        inputs = bench.global_inputs(cfg)
        for r in (1, 2, 4):
            layout = SequenceLayout(64, world, r)
            attn = (UlyssesAttention(sdpa_attention, None) if r == 1
                    else UlyssesRingAttention(*bench.hybrid_groups(world, r), layout))
            local = [t[:, layout.rank_positions(rank)].contiguous() for t in inputs]
            step = bench.make_step(attn, local, causal=True)
            out[(hkv, r)] = (bench.sent_bytes(step, attn, local)[0], bench.model_bytes(cfg, world, r, 4))
    return out


def _bench_groups(rank, world) -> dict[int, dict[str, tuple]]:
    """scripts/bench_ulysses.py's Ulysses and head-group rows in miniature (16 query heads: 4
    per rank, G in 2, 4): per kv head count, row -> (sent fwd, sent bwd, MemTracker peak by
    category, bytes of the row's inputs q, k, v, grad)."""
    bench = _bench_module()
    out = {}
    for hkv in (2, 8):  # kv replicated (travels with group 0), and split over the groups at G = 2
        cfg = {"seq_len": 32, "heads": 16, "kv_heads": hkv, "head_dim": D, "batch": 1}
        mine = slice(rank * 32 // world, (rank + 1) * 32 // world)
        local = [t[:, mine].contiguous() for t in bench.global_inputs(cfg)]
        steps, sent = bench.ulysses_rows(cfg, local, world, (2, 4))
        out[hkv] = {name: (*sent[name][:2], bench.peak_snapshot(step), sum(t.nbytes for t in step.inputs))
                    for name, step in steps.items()}
    return out


def _tools_job(rank, world):
    results = {"memory": _memory(rank), "bench": _bench_bytes(rank, world),
               "groups": _bench_groups(rank, world)}
    groups, sp_rank, _ = hybrid_groups(4, 2)
    for mode in ("selective", "full"):
        results[mode] = _selective(groups, sp_rank, mode)
    return results


@pytest.fixture(scope="module")
def tools_results():
    return run_distributed(_tools_job, 4, timeout=300)


def test_ring_holds_local_block_plus_two_in_flight(tools_results):
    for res in tools_results:
        m, block = res["memory"], res["memory"]["kv_block"]
        # Per-rank forward memory does not grow with the ring: R = 4 holds what R = 2 holds
        # (an all-gather, or keeping the blocks seen, would add 2 blocks).
        assert m["r4"][0] == m["r2"][0], m
        # The transfers add one received block to the packed local copy: K/V held = the local
        # input + the block being sent + the block arriving, 3 of the sequence's 4 blocks.
        assert m["r4"][0] - m["r4_stay"][0] == block, m
        # Backward: + the next K/V block, and this block's dK/dV (fp32 = K/V here) arriving.
        assert m["r4"][1] - m["r4_stay"][1] <= 2 * block, m


def test_bench_communication_model_matches_bytes_sent(tools_results):
    for res in tools_results:
        for key, (measured, model) in res["bench"].items():
            assert measured == model > 0, (key, measured, model)


def test_bench_head_group_rows_send_the_ulysses_bytes(tools_results):
    for res in tools_results:
        for hkv, rows in res["groups"].items():
            assert sorted(rows) == ["ulysses", "ulysses_g2", "ulysses_g4"], (hkv, rows)
            for name, (fwd, bwd, peak, inputs) in rows.items():
                assert (fwd, bwd) == rows["ulysses"][:2] and fwd > 0 and bwd > 0, (hkv, name, rows)
                # Every row counts its inputs (track_external: "Other"), alive the whole step,
                # plus what the step creates.
                assert peak["Other"] == inputs and peak["Total"] > inputs, (hkv, name, peak, inputs)


def test_selective_checkpointing_keeps_the_ring_output(tools_results):
    for res in tools_results:
        sel, full = res["selective"], res["full"]
        assert max(sel["error"], full["error"]) <= TOL
        # ring = 2: one K/V hop forward; backward one K/V hop and two dK/dV hops, no re-run.
        hops = (sel["forward"].count("p"), sel["backward"].count("p"), sel["backward"].count("q"))
        assert hops == (1, 1, 2)
        assert sel["backward"].count("F") == 0
        # Full checkpointing re-runs the ring forward in backward (the contrast).
        assert full["backward"].count("F") > 0 and full["backward"].count("p") == 2
