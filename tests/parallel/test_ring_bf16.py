"""bf16 ring and Ulysses x ring attention against an fp32 one-process reference.

Why: the ring merges its per-step partial outputs by log-sum-exp and accumulates dQ and dK/dV
over ring steps, all in fp32 (parallel/ring.py). In the fp32 tests (test_ring.py) doing any of
that in the input dtype is a no-op, so only bf16 inputs can catch such a slip.

How: one 8-rank spawn runs UlyssesRingAttention forward + backward on bf16 q/k/v and upstream
gradient (seed 0, 256 tokens, batch 1, 4 query / 2 kv heads of 16) for sp=8 ring=8 (pure ring),
sp=8 ring=4 (2 Ulysses x 4 ring) and sp=8 ring=2 (4 Ulysses x 2 ring, kv heads replicated).
The reference is fp32 SDPA on the same (bf16-valued) inputs upcast to fp32, so input rounding
is not counted. Error of a tensor: mean |got - bf16(ref)| / mean |ref|. Measuring against the
bf16-ROUNDED reference removes the final rounding to bf16, which every correct bf16 result
carries and which would otherwise hide an extra rounding or two.

Two input sets, each chosen so that an accumulator's rounding stands out from the rounding the
bf16 block kernels do anyway:
- "v+2 causal": v offset by +2 makes every block's output about as large as the final output,
  so rounding each block's output costs ~eps/sqrt(blocks) while rounding a bf16 output
  accumulator costs ~eps per ring step;
- "grad+1 non-causal": the upstream gradient offset by +1 makes dV's per-step contributions
  add up instead of cancelling, and non-causal attention makes every query row and every key
  row accumulate all 2R sub-blocks (the most accumulation steps a layout has).

Tolerance: 1.5 x the larger error of the correct code over seeds 0 and 1 (only seed 0 runs
here; errors are deterministic on one machine, the margin covers seeds and CPU kernels),
rounded up to two digits. Measured (seed 0; 2-core x86 CPU, torch 2.13) for the correct code,
for the one-process bf16 SDPA on the same inputs (the noise floor), and with each of these
bugs planted by hand, one at a time (an error above the tolerance is marked *):
  a_merge: kernels.merge computed in the input dtype (its results rounded each step),
  a_lse:   the forward's LSE accumulator in the input dtype,
  b_out:   the forward's output accumulator in the input dtype,
  c_dkv:   dK/dV accumulated (and passed around the ring) in the input dtype,
  d_dq:    dQ accumulated in the input dtype.

  case                          out      dq       dk       dv
  v+2 causal, one-process bf16  2.0e-4   5.9e-3   5.1e-3   3.3e-3
  sp=8 ring=8  correct          6.0e-4   6.7e-3   5.2e-3   2.5e-3
               a_merge          4.3e-3*  2.2e-2*  1.9e-2*  1.4e-2*
               a_lse            7.5e-4   1.4e-2*  1.6e-2*  1.4e-2*
               b_out            2.0e-3*  9.9e-3   7.1e-3   2.5e-3
  sp=8 ring=4  correct          7.1e-4   6.8e-3   5.0e-3   2.6e-3
               a_merge          3.1e-3*  1.7e-2*  1.5e-2*  1.1e-2*
               a_lse            7.9e-4   1.2e-2*  1.3e-2*  1.1e-2*
               b_out            1.4e-3*  8.2e-3   6.2e-3   2.6e-3
  sp=8 ring=2  correct          7.7e-4   6.8e-3   5.3e-3   3.2e-3
               a_merge          2.1e-3*  1.5e-2*  1.3e-2*  1.1e-2*
               a_lse            8.0e-4   1.1e-2   1.1e-2*  9.6e-3*
               b_out            1.0e-3   7.4e-3   5.7e-3   3.2e-3
  grad+1 non-causal, one-proc.  1.4e-3   1.8e-3   2.5e-3   1.9e-3
  sp=8 ring=8  correct          1.9e-3   2.4e-3   1.2e-3   4.4e-4
               a_merge          1.6e-2*  1.9e-2*  1.1e-2*  5.6e-3*
               a_lse            1.3e-2*  1.8e-2*  9.3e-3*  1.6e-3*
               b_out            4.4e-3*  2.7e-3   1.2e-3   4.4e-4
               c_dkv            1.9e-3   2.4e-3   2.9e-3*  2.1e-3*
               d_dq             1.9e-3   5.1e-3*  1.2e-3   4.4e-4
  sp=8 ring=4  correct          2.0e-3   2.6e-3   1.2e-3   5.5e-4
               a_merge          1.3e-2*  1.5e-2*  7.6e-3*  1.8e-3*
               a_lse            9.3e-3*  1.4e-2*  7.0e-3*  1.3e-3*
               b_out            3.4e-3*  2.7e-3   1.2e-3   5.5e-4
               c_dkv            2.0e-3   2.6e-3   2.3e-3*  1.8e-3*
               d_dq             2.0e-3   4.0e-3*  1.2e-3   5.5e-4
  sp=8 ring=2  correct          2.0e-3   2.5e-3   1.9e-3   1.4e-3
               a_merge          9.9e-3*  1.2e-2*  6.2e-3*  1.8e-3
               a_lse            6.5e-3*  1.1e-2*  5.6e-3*  1.8e-3
               (b_out, c_dkv, d_dq: within 1.3x of correct, below the tolerance)
With 2 ring steps a row merges at most 4 sub-blocks, too few for one extra rounding per step
to stand out: ring=2 catches the merge slips only; ring=8 catches every slip above, ring=4
too, but d_dq only just (4.0e-3 against 3.9e-3). d_dq is the closest call at ring=8 as well
(5.1e-3 against 3.9e-3): dQ sums one bf16 block result per step, whose own rounding is of the
same size as the accumulator's. (c_dkv and d_dq on "v+2 causal"
are not tabled: only c_dkv at ring=8 crosses a tolerance there, dv 4.4e-3.)
"""
from __future__ import annotations

import pytest
import torch

from support.common import fwd_bwd
from support.ring import hybrid_groups
from support.spawn import run_distributed
from ulysses_train.model.attention import sdpa_attention
from ulysses_train.parallel.layout import SequenceLayout
from ulysses_train.parallel.ring import UlyssesRingAttention

WORLD, HQ, HKV, D, SEQ = 8, 4, 2, 16, 256
NAMES = ("out", "dq", "dk", "dv")
LAYOUTS = [(8, 8), (8, 4), (8, 2)]  # (sp, ring)
# input set -> (causal, offset added to v, offset added to the upstream gradient)
INPUTS = {"v+2 causal": (True, 2.0, 0.0), "grad+1 non-causal": (False, 0.0, 1.0)}
# (input set, ring) -> tolerance of out, dq, dk, dv: see the module docstring for the numbers.
TOL = {("v+2 causal", 8): (9.0e-4, 1.1e-2, 8.0e-3, 4.0e-3),
       ("v+2 causal", 4): (1.1e-3, 1.1e-2, 8.4e-3, 4.0e-3),
       ("v+2 causal", 2): (1.3e-3, 1.1e-2, 8.2e-3, 4.8e-3),
       ("grad+1 non-causal", 8): (2.9e-3, 3.9e-3, 1.9e-3, 6.6e-4),
       ("grad+1 non-causal", 4): (3.1e-3, 3.9e-3, 2.0e-3, 8.8e-4),
       ("grad+1 non-causal", 2): (3.1e-3, 3.9e-3, 3.0e-3, 2.2e-3)}


def _inputs(name: str, seed: int = 0) -> list[torch.Tensor]:
    """bf16 q (1, S, HQ, D), k, v (1, S, HKV, D) and upstream gradient (1, S, HQ, D)."""
    _, v_off, g_off = INPUTS[name]
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(1, SEQ, h, D, generator=g) for h in (HQ, HKV, HKV, HQ))
    return [t.bfloat16() for t in (q, k, v + v_off, grad + g_off)]


def _job(rank, world):
    """Per layout and input set: this rank's positions and its bf16 out, dq, dk, dv."""
    results = {}
    for sp, ring in LAYOUTS:
        groups, sp_rank, _ = hybrid_groups(sp, ring)
        layout = SequenceLayout(SEQ, sp, ring)
        pos = layout.rank_positions(sp_rank)
        attn = UlyssesRingAttention(*groups, layout)
        for name, (causal, _, _) in INPUTS.items():
            local = (t[:, pos] for t in _inputs(name))
            results[(name, ring)] = (pos, fwd_bwd(attn, *local, causal=causal))
    return results


def _gather(per_rank, key) -> list[torch.Tensor]:
    """The global (1, S, H, D) out, dq, dk, dv from every rank's positions."""
    full = [None] * len(NAMES)
    for res in per_rank:
        pos, tensors = res[key]
        for i, t in enumerate(tensors):
            if full[i] is None:
                full[i] = torch.zeros(1, SEQ, *t.shape[2:], dtype=t.dtype)
            full[i][:, pos] = t
    return full


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """mean |got - bf16(want)| / mean |want|: zero when got is the correctly rounded result."""
    return ((got.float() - want.bfloat16().float()).abs().mean() / want.abs().mean()).item()


@pytest.fixture(scope="module")
def bf16_errors():
    per_rank = run_distributed(_job, WORLD, timeout=300)
    errors = {}
    for name, (causal, _, _) in INPUTS.items():
        inputs = _inputs(name)
        want = fwd_bwd(sdpa_attention, *(t.float() for t in inputs), causal=causal)
        floor = fwd_bwd(sdpa_attention, *inputs, causal=causal)  # one-process bf16
        errors[(name, "one-process")] = [_error(a, b) for a, b in zip(floor, want)]
        for _, ring in LAYOUTS:
            errors[(name, ring)] = [_error(a, b) for a, b in zip(_gather(per_rank, (name, ring)), want)]
    return errors


@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("sp,ring", LAYOUTS)
def test_bf16_ring_matches_fp32_reference(bf16_errors, sp, ring, inputs):
    got, tol = bf16_errors[(inputs, ring)], TOL[(inputs, ring)]
    report = {n: f"{e:.2e} (tol {t:.1e})" for n, e, t in zip(NAMES, got, tol)}
    report["one-process bf16"] = [f"{e:.2e}" for e in bf16_errors[(inputs, "one-process")]]
    assert all(e <= t for e, t in zip(got, tol)), report
