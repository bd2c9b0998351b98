"""Sliding-window attention under a ring (the halo exchange) against one-process attention.

Every rank builds the same global q/k/v, computes the whole-row reference itself (SDPA with the
dense window ∩ causal ∩ document mask), feeds the tokens at `layout.rank_positions(sp_rank)`
through UlyssesRingAttention(window=W) and reports fp32 relative errors of the output and the
q/k/v gradients. One 8-rank spawn covers ring sp=4 ring=4 (two sp groups) and sp=8 = ring 4 ×
Ulysses 2, W below, equal to and just past a chunk (c = 8), spanning several chunks and >= S,
with and without documents longer than a chunk, batch 2, and a padded seq_len; it records the
structure (kernel calls, post/wait order) and counts the bytes every rank sends
(scripts/bench_ulysses.py's counter) for sliding and full layers.
"""
from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch

from support.common import fwd_bwd, rel_err
from support.ring import doc_ids, hybrid_groups
from support.spawn import run_distributed
from ulysses_train.model.attention import sdpa_attention
from ulysses_train.model.masking import DocumentMask
from ulysses_train.parallel import ring_kernels, ring_window
from ulysses_train.parallel.layout import SequenceLayout
from ulysses_train.parallel.ring import UlyssesRingAttention

WORLD, HQ, HKV, D, B = 8, 4, 2, 8, 2
TOL = 1e-5
LAYOUTS = [(4, 4), (8, 4)]  # (sp, ring): pure ring, and ring 4 x Ulysses 2; chunk c = 8 at S' = 64
# (seq_len, window, documents): W < c, = c, c + 1, several chunks, >= S; 59 is padded to 64.
CASES = [(64, w, docs) for w in (3, 8, 9, 21, 64) for docs in (False, True)] + \
        [(59, 13, False), (59, 13, True)]


def _bench():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_ulysses.py")
    spec = importlib.util.spec_from_file_location("bench_ulysses", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _inputs(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, h, D, generator=g) for h in (HQ, HKV, HKV, HQ)]  # q, k, v, grad


def long_doc_ids(seq_len: int, padded_len: int, seed: int = 5) -> torch.Tensor:
    """(B, S') ids of documents 3..40 tokens long (across chunk boundaries, some longer than a
    chunk, so window and documents both cut); padding gets id -1."""
    return doc_ids(B, seq_len, padded_len, seed, lengths=(3, 40))


class Events:
    """Logs, in order, halo posts (p: K/V, q: dK/dV), their waits (w, x) and kernel calls (F, B);
    counts masked sub-blocks with a query row that sees no key (`empty_rows`)."""

    def __enter__(self):
        self.events, rec = "", self
        self.empty_rows = 0  # masked sub-blocks with a query row that sees no key in them
        self.saved = (ring_window.HaloExchange, ring_kernels.block_forward,
                      ring_kernels.block_backward, ring_window._bias)
        base, fwd, bwd, bias = self.saved

        class Logged(base):
            def __init__(self, sends, shapes, like, group, tag):
                self.letter = "pq"[tag - ring_window.KV_TAG]
                rec.events += self.letter
                super().__init__(sends, shapes, like, group, tag)

            def wait(self):
                rec.events += {"p": "w", "q": "x"}[self.letter]
                return super().wait()

        def logged(name, fn):
            def call(*args, **kw):
                rec.events += name
                return fn(*args, **kw)
            return call

        def counted_bias(*args):
            bias_t, empty = bias(*args)
            rec.empty_rows += empty is not None and bool(empty.any())
            return bias_t, empty

        ring_window.HaloExchange, ring_window._bias = Logged, counted_bias
        ring_kernels.block_forward, ring_kernels.block_backward = logged("F", fwd), logged("B", bwd)
        return self

    def __exit__(self, *exc):
        (ring_window.HaloExchange, ring_kernels.block_forward, ring_kernels.block_backward,
         ring_window._bias) = self.saved


def _compare(groups, sp_rank, layout, window, docs):
    s, sp = layout.seq_len, layout.padded_len
    q, k, v, grad = _inputs(B, sp)
    grad[:, s:] = 0  # padded positions carry no loss
    ids = long_doc_ids(s, sp) if docs else None
    want = fwd_bwd(sdpa_attention, q[:, :s], k[:, :s], v[:, :s], grad[:, :s], window=window,
                   mask=None if ids is None else DocumentMask(ids[:, :s]))
    pos = layout.rank_positions(sp_rank)
    attn = UlyssesRingAttention(*groups, layout)
    mask = None if ids is None else DocumentMask(ids)
    with Events() as rec:
        got = fwd_bwd(attn, *(t[:, pos] for t in (q, k, v, grad)), mask=mask, window=window)
    real = pos < s
    errors = {name: rel_err(a[:, real], b[:, pos[real]])
              for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    return {"errors": errors, "events": rec.events, "empty_rows": rec.empty_rows}


def _expected_calls(layout, ring_rank, window, docs) -> int:
    """Sub-blocks (query chunk, key chunk) of ring rank i with any visible pair, from the dense
    global mask (window ∩ causal ∩ documents), not from the layer's own plan."""
    sp, r, c = layout.padded_len, layout.ring, layout.chunk_len()
    i = torch.arange(sp)
    vis = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # (S', S')
    if docs:
        ids = long_doc_ids(layout.seq_len, sp)
        vis = vis & (ids[:, :, None] == ids[:, None, :])  # (B, S', S')
    return sum(bool(vis[..., a * c:(a + 1) * c, b * c:(b + 1) * c].any())
               for a in (ring_rank, 2 * r - 1 - ring_rank) for b in range(2 * r))


BYTES_SEQ, BYTES_WINDOWS = 128, (8, 17, 20)  # c = 16: S = 16 W, W = c + 1, W spanning two chunks


def _bytes(rank) -> dict:
    """Counted bytes (forward, backward) this rank sends for full and sliding layers (sp=4
    ring=4 on two sp groups, sp=8 = ring 4 x Ulysses 2), batch 1, and the bench model's."""
    bench = _bench()
    cfg = {"seq_len": BYTES_SEQ, "heads": HQ, "kv_heads": HKV, "head_dim": D, "batch": 1}
    inputs = bench.global_inputs(cfg)
    out = {}
    for sp in (4, 8):
        groups, sp_rank, ring_rank = hybrid_groups(sp, 4)
        layout = SequenceLayout(BYTES_SEQ, sp, 4)
        local = [t[:, layout.rank_positions(sp_rank)].contiguous() for t in inputs]
        attn = UlyssesRingAttention(*groups, layout)
        for window in (0,) + BYTES_WINDOWS:
            kw = {"window": window} if window else {}
            counted = bench.sent_bytes(bench.make_step(attn, local, causal=True, **kw), attn, local, **kw)
            out[(sp, window)] = counted + (bench.model_bytes(cfg, sp, 4, 4, window, ring_rank), ring_rank)
    return out


def _job(rank, world):
    results = {}
    for sp, ring in LAYOUTS:
        groups, sp_rank, ring_rank = hybrid_groups(sp, ring)
        for seq, window, docs in CASES:
            layout = SequenceLayout(seq, sp, ring)
            res = _compare(groups, sp_rank, layout, window, docs)
            res["expected_calls"] = _expected_calls(layout, ring_rank, window, docs)
            res["ring_rank"] = ring_rank
            results[(sp, seq, window, docs)] = res
    results["bytes"] = _bytes(rank)
    results["bad"] = _bad_windows(*hybrid_groups(4, 4)[:2])
    return results


def _bad_windows(groups, sp_rank) -> dict[str, str]:
    """ValueErrors for windows the ring cannot take, raised before anything is sent."""
    layout = SequenceLayout(64, 4, 4)
    q, k, v, _ = (t[:, layout.rank_positions(sp_rank)] for t in _inputs(B, 64))
    attn = UlyssesRingAttention(*groups, layout)
    messages = {}
    with Events() as rec:
        for name, kw in {"negative": {"window": -1}, "noncausal": {"window": 3, "causal": False}}.items():
            try:
                attn(q, k, v, **kw)
                messages[name] = "no error"
            except ValueError as exc:
                messages[name] = str(exc)
    messages["events"] = rec.events
    return messages


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, WORLD, timeout=300)


@pytest.mark.parametrize("seq,window,docs", CASES)
@pytest.mark.parametrize("sp,ring", LAYOUTS)
def test_matches_one_process_windowed_attention(results, sp, ring, seq, window, docs):
    key = (sp, seq, window, docs)
    worst = {n: max(res[key]["errors"][n] for res in results) for n in ("out", "dq", "dk", "dv")}
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("seq,window,docs", CASES)
@pytest.mark.parametrize("sp,ring", LAYOUTS)
def test_only_sub_blocks_with_a_visible_pair_are_computed(results, sp, ring, seq, window, docs):
    # One kernel call per (query chunk, key chunk) with any pair in window ∩ causal ∩ documents,
    # forward and backward: no block beyond the window, none the documents empty.
    for res in results:
        r = res[(sp, seq, window, docs)]
        assert r["events"].count("F") == r["events"].count("B") == r["expected_calls"], r


@pytest.mark.parametrize("seq,window,docs", CASES)
@pytest.mark.parametrize("sp,ring", LAYOUTS)
def test_halo_posted_before_local_kernels_and_waited_after(results, sp, ring, seq, window, docs):
    # Forward: post the K/V halo (p), the blocks on keys held here (F, at least the diagonal),
    # wait (w), the blocks on received keys. Backward the same (B), then the dK/dV of the
    # received slices goes home (q, x). W >= S is the full causal ring: no halo at all.
    for res in results:
        events = res[(sp, seq, window, docs)]["events"]
        if window >= seq:
            assert set(events) == {"F", "B"}, events
        else:
            assert re.fullmatch(r"pF+wF*pB+wB*qx", events), events


def _halo_closed_form(window: int, ring_rank: int, ring: int, c: int) -> int:
    """Tokens of K (and of V) ring rank i sends when W <= c + 1: the trailing W - 1 tokens of
    chunk i to rank i + 1 (its chunk i + 1) unless i = R - 1, and of chunk 2R-1-i to rank i - 1
    (its chunk 2R - i) unless i = 0."""
    assert window <= c + 1
    return (window - 1) * ((ring_rank < ring - 1) + (ring_rank > 0))


@pytest.mark.parametrize("sp", [4, 8])
def test_sliding_layer_sends_its_halo_only(results, sp):
    u, c, ring = sp // 4, BYTES_SEQ // 8, 4
    per_token = 2 * max(HKV // u, 1) * D * 4  # K and V, heads after the Ulysses all-to-all, fp32
    for res in results:
        full_fwd, full_bwd, full_model, _ = res["bytes"][(sp, 0)]
        assert full_fwd == full_model
        ulysses = full_fwd - (ring - 1) * 2 * c * per_token  # the full ring: R - 1 hops of 2c tokens
        ring_full = (full_fwd - ulysses, full_bwd - ulysses)  # backward: the same all-to-alls
        for window in BYTES_WINDOWS:
            fwd, bwd, model, ring_rank = res["bytes"][(sp, window)]
            assert fwd == model, (window, fwd, model)
            halo = (fwd - ulysses, bwd - ulysses)
            if window <= c + 1:
                assert halo[0] == _halo_closed_form(window, ring_rank, ring, c) * per_token
            assert 0 < halo[0] <= 2 * (window - 1) * per_token  # at most 2 (W - 1) tokens
            # Backward: the K/V halo again, and the fp32 dK/dV of what it received sent home.
            received = ring_window.halo_tokens_received(ring_rank, ring, c, window)
            assert 0 < received <= 2 * (window - 1)
            assert halo[1] == halo[0] + received * per_token, (window, halo)
            if window * 16 == BYTES_SEQ:  # the goal: <= 1/4 of a full layer's ring bytes
                assert 4 * halo[0] <= ring_full[0] and 4 * halo[1] <= ring_full[1], (halo, ring_full)


@pytest.mark.parametrize("sp,ring", LAYOUTS)
def test_rows_seeing_no_key_in_a_sub_block_occur(results, sp, ring):
    # The LSE = -inf handling of such rows is only tested if some masked sub-block has one.
    assert sum(res[(sp, 64, window, True)]["empty_rows"] for res in results for window in (3, 21)) > 0


def test_bad_windows_raise_before_any_transfer(results):
    for res in results:
        bad = res["bad"]
        assert "window must be an int >= 0 tokens" in bad["negative"], bad
        assert "a sliding window is causal" in bad["noncausal"] and bad["events"] == "", bad
