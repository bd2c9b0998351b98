"""Document masking and sliding windows under Ulysses against the single-process reference.

Every rank builds the same global q/k/v, document ids and model (seeded), computes the
whole-sequence masked reference itself, runs its own sequence slice through UlyssesAttention
with the DocumentMask of the *global* rows, and reports relative errors of the output and of
the q/k/v gradients on its slice. Documents cross the slice boundaries (and one boundary falls
exactly on a document start), so a mask built from a slice, or positions restarted per slice,
would fail. One 4-rank spawn covers P = 4 and P = 2 (two pairs: group rank != global rank).
FlexAttention is not run here: it has no CPU backward (its GPU test is in tests/model).
Sliding windows (issue 20 §2) share the spawn: windows inside a P=4 slice (3), equal to it (6),
spanning slices (10) and covering the row (S), with and without documents; and a mixed GPT
(sliding, sliding, full) with documents on rows of 21 tokens padded to 24, against the
one-process GPT on the unpadded rows.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from support.common import fwd_bwd, rel_err
from support.spawn import block_group, run_distributed, sp_gpt_errors
from ulysses_train.config.schema import ModelConfig
from ulysses_train.data.batch import Batch, document_positions
from ulysses_train.model.attention import eager_attention, sdpa_attention
from ulysses_train.model.masking import DocumentMask
from ulysses_train.parallel.ulysses import UlyssesAttention

WORLD, S, D = 4, 24, 8
TOL = 1e-5
# Document lengths per row (sum S). P=4 slices end at 6, 12, 18; P=2 at 12. Row 0: documents
# [6, 15) crosses 12, one starts exactly at 6 and 18. Row 1: [1, 14) crosses 6 and 12, [16, 24)
# crosses 18.
LENGTHS = [[5, 1, 9, 3, 6], [1, 13, 2, 8]]
KERNELS = {"sdpa": sdpa_attention, "eager": eager_attention}
# (P, Hq, Hkv): kv replicated (Hkv < P), Hkv == P, Hkv > P.
CASES = [(4, 8, 2), (4, 8, 4), (4, 8, 8), (2, 4, 1), (2, 8, 4)]
WINDOWS = [3, 6, 10, S]
WINDOW_CASES = [(w, docs) for w in WINDOWS for docs in (False, True)]
MIXED = ["sliding_attention", "sliding_attention", "full_attention"]


def _doc_ids() -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                        for r in LENGTHS])  # (B, S)


def _global_inputs(hq, hkv, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(LENGTHS)
    return [torch.randn(b, S, h, D, generator=g) for h in (hq, hkv, hkv, hq)]  # q, k, v, grad


def _compare(group, fn, hq, hkv, documents=True, **kw) -> dict[str, float]:
    p, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, grad_out = _global_inputs(hq, hkv)
    mask = DocumentMask(_doc_ids()) if documents else None  # global rows: every rank holds them
    reference = fwd_bwd(fn, q, k, v, grad_out, mask=mask, **kw)
    mine = slice(r * S // p, (r + 1) * S // p)
    got = fwd_bwd(UlyssesAttention(fn, group), q[:, mine], k[:, mine], v[:, mine],
                   grad_out[:, mine], mask=mask, **kw)
    return {name: rel_err(a, b[:, mine]) for name, a, b in zip(("out", "dq", "dk", "dv"), got, reference)}


def _sliced_mask_refused(group) -> str:
    """A mask built from the rank's own slice must be refused, not silently misapplied."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, _ = _global_inputs(8, 4)
    mine = slice(r * S // p, (r + 1) * S // p)
    try:  # every rank fails at the same point, after the same collectives: no hang
        UlyssesAttention(sdpa_attention, group)(q[:, mine], k[:, mine], v[:, mine],
                                                mask=DocumentMask(_doc_ids()[:, mine]))
    except ValueError as exc:
        return str(exc)
    return "no error"


def _gpt(group) -> dict[str, float]:
    """GPT + Ulysses + global DocumentMask + restarting positions == the single-process GPT."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=128)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, S), generator=g)
    labels = torch.randint(0, 128, (2, S), generator=g)
    labels[torch.rand(2, S, generator=g) < 0.3] = -100  # valid counts differ between slices
    docs = _doc_ids()
    positions = document_positions(docs)  # on the whole row, before slicing
    return sp_gpt_errors(group, cfg, ids, positions, labels, attn_mask=DocumentMask(docs))


def _padded_sliding_gpt(group) -> dict[str, float]:
    """A mixed-window GPT under Ulysses on rows of 21 tokens padded to 24 (Batch.pad_to, as the
    trainer pads) == the one-process GPT on the unpadded rows: loss sum and every gradient."""
    from ulysses_train.model import GPT, sdpa_attention

    cfg = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      vocab_size=128, sliding_window=5, layer_types=MIXED)
    p, r = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (2, 21), generator=g)
    labels = torch.randint(0, 128, (2, 21), generator=g)
    docs = _doc_ids()[:, :21]
    batch = Batch(ids, labels, document_positions(docs), docs)
    padded = batch.pad_to(S)
    torch.manual_seed(0)
    models = [GPT(cfg), GPT(cfg, attention_fn=UlyssesAttention(sdpa_attention, group))]
    models[1].load_state_dict(models[0].state_dict())
    mine = slice(r * S // p, (r + 1) * S // p)
    losses = []
    for model, b, cols in ((models[0], batch, slice(None)), (models[1], padded, mine)):
        loss_sum, _ = model(b.input_ids[:, cols], b.position_ids[:, cols], b.labels[:, cols],
                            attn_mask=model.document_mask(b.document_ids))
        loss_sum.backward()
        losses.append(loss_sum.detach())
    dist.all_reduce(losses[1], group=group)
    errors = {"loss": rel_err(losses[1], losses[0])}
    for (name, ref), sp in zip(models[0].named_parameters(), models[1].parameters()):
        dist.all_reduce(sp.grad, group=group)
        errors[name] = rel_err(sp.grad, ref.grad)
    return errors


def _job(rank: int, world: int) -> dict:
    results = {}
    for p in (4, 2):
        group = block_group(p)
        for case in (c for c in CASES if c[0] == p):
            for kernel, fn in KERNELS.items():
                results[(*case, kernel)] = _compare(group, fn, *case[1:])
        results[(p, "gpt")] = _gpt(group)
        results[(p, "sliced")] = _sliced_mask_refused(group)
        results[(p, "sliding-gpt")] = _padded_sliding_gpt(group)
    group = block_group(4)
    for window, docs in WINDOW_CASES:
        for kernel, fn in KERNELS.items():
            results[("window", window, docs, kernel)] = _compare(group, fn, 8, 2, docs,
                                                                 window=window)
    return results


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_job, WORLD, timeout=180)


def _worst(results, key) -> dict[str, float]:
    return {name: max(res[key][name] for res in results) for name in results[0][key]}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("p,hq,hkv", CASES)
def test_masked_ulysses_equals_single_process(results, p, hq, hkv, kernel):
    worst = _worst(results, (p, hq, hkv, kernel))
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("p", [4, 2])
def test_masked_gpt_under_ulysses_equals_single_process(results, p):
    worst = _worst(results, (p, "gpt"))
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("p", [4, 2])
def test_mask_of_a_slice_is_refused(results, p):
    assert all("global (unsliced) document ids" in res[(p, "sliced")] for res in results)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("window,documents", WINDOW_CASES)
def test_sliding_window_under_ulysses_equals_single_process(results, window, documents, kernel):
    """sp=4, 8 query / 2 kv heads (kv replicated), batch 2: output and q/k/v gradients."""
    worst = _worst(results, ("window", window, documents, kernel))
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("p", [4, 2])
def test_padded_mixed_window_gpt_under_ulysses_equals_single_process(results, p):
    worst = _worst(results, (p, "sliding-gpt"))
    assert max(worst.values()) <= TOL, worst
