"""Ring attention's local pieces in one process: the LSE merge and the blockwise kernels."""
from __future__ import annotations

import math

import pytest
import torch

from support.common import rel_err
from ulysses_train.parallel import ring_kernels as rk

B, HQ, HKV, C, D = 2, 4, 2, 8, 8


def _eager(q, k, v, allowed):
    """Reference softmax attention in fp32 with a (B, 1, cq, ck) bool mask: out, LSE."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for a row without keys
    probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0).unsqueeze(-1))
    return probs @ v, lse


def _case(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, C, D, generator=g) for h in (HQ, HKV, HKV))
    allowed = torch.ones(B, 1, C, C, dtype=torch.bool)
    bias = None
    if kind == rk.CAUSAL:
        allowed = allowed.tril()
    elif kind == rk.MASKED:
        allowed = torch.rand(B, 1, C, C, generator=g) < 0.5
        allowed[0, 0, 3] = False  # a row that sees no key in this block
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    return q, k, v, allowed, bias


def test_merge_of_disjoint_key_sets_is_softmax_over_their_union():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, D, generator=g) for _ in range(3))
    allowed = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    first, second = allowed.clone(), allowed.clone()
    first[..., 3:], second[..., :3] = False, False
    first[..., 1, :] = False  # row 1 sees keys only in the second set
    second[..., 1, :] = True
    want = _eager(q, k, v, first | second)
    out, lse = rk.merge(*(t.float() for t in _eager(q, k, v, first)), *_eager(q, k, v, second))
    assert rel_err(out, want[0]) < 1e-6 and rel_err(lse, want[1]) < 1e-6


def test_merge_keeps_rows_without_any_key_finite():
    out, lse = torch.zeros(1, 1, 2, D), torch.full((1, 1, 2), float("-inf"))
    new_out, new_lse = rk.merge(out, lse, torch.zeros(1, 1, 2, D), torch.full((1, 1, 2), float("-inf")))
    assert torch.equal(new_out, torch.zeros_like(out)) and torch.isneginf(new_lse).all()


def test_cpu_flash_op_reports_zero_lse_for_a_row_without_keys():
    # Why the ring overwrites such rows with -inf: the op says out = 0 and LSE = 0 for them.
    q, k, v, allowed, bias = _case(rk.MASKED)
    out, lse = rk.block_forward(q, k, v, rk.MASKED, bias)
    assert torch.equal(out[0, :, 3], torch.zeros(HQ, D)) and torch.equal(lse[0, :, 3], torch.zeros(HQ))


def _kernel_errors(device, kind):
    q, k, v, allowed, bias = (None if t is None else t.to(device) for t in _case(kind))
    want_out, want_lse = _eager(q, k, v, allowed)
    out, lse = rk.block_forward(q, k, v, kind, bias)
    seen = ~torch.isneginf(want_lse)  # rows without keys: out 0, LSE reported differently
    errors = {"out": rel_err(out, want_out), "lse": rel_err(lse[seen], want_lse[seen])}
    # Backward from the block's own (out, LSE), as the ring does with the global ones.
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(out)
    ref_out = _eager(*leaves, allowed)[0]
    ref = torch.autograd.grad(ref_out, leaves, grad)
    got = rk.block_backward(grad, q, k, v, out, lse.masked_fill(~seen, 0), kind, bias)
    errors.update({name: rel_err(a, b) for name, a, b in zip(("dq", "dk", "dv"), got, ref)})
    return errors


@pytest.mark.parametrize("kind", [rk.FULL, rk.CAUSAL, rk.MASKED])
def test_cpu_block_kernels_match_eager(kind):
    errors = _kernel_errors("cpu", kind)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", [rk.FULL, rk.CAUSAL, rk.MASKED])
def test_cuda_block_kernels_match_eager(kind):
    # The CUDA path (memory-efficient SDPA op) has not run yet: no GPU where it was written.
    errors = _kernel_errors("cuda", kind)
    assert max(errors.values()) <= 1e-4, errors
