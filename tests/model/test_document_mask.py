"""Document masking: every kernel with a DocumentMask equals each document run on its own.

The reference never sees a mask: each document is cut out of its packed row and run through
plain causal `eager_attention` (or the plain GPT) as a sequence of its own. Rows hold documents
of uneven lengths, single-token ones included, laid out differently in each row, so a mask
that leaks across documents, ignores the row, or is shifted by one shows up.

FlexAttention has no backward on CPU (torch refuses), so its gradients are checked only by the
GPU test at the end; on CPU it is compared forward only, in eager mode.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ulysses_train.config.schema import ModelConfig
from ulysses_train.data.batch import document_positions
from ulysses_train.model import GPT, DocumentMask
from ulysses_train.model import attention as attn
from ulysses_train.model.attention import (
    document_mask_for,
    eager_attention,
    flex_attention_kernel,
    sdpa_attention,
    select_attention,
)

# Document lengths per row (each row sums to S): single-token documents at a row start, in the
# middle and at the end; the two rows disagree everywhere.
# Eager flex on CPU warns that it is unfused: expected, it only runs here as a reference.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

LENGTHS = [[5, 1, 9, 3, 6], [1, 13, 2, 7, 1]]
S = 24
TOL = dict(atol=1e-5, rtol=1e-5)


def doc_ids(lengths=LENGTHS) -> torch.Tensor:
    """(B, S) document ids from per-row document lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                        for row in lengths])


def segments(lengths=LENGTHS):
    """(row, start, end) of every document."""
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            yield b, start, start + n
            start += n


def qkv(hq, hkv, b=None, d=8, seed=0):
    b = len(LENGTHS) if b is None else b
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, S, h, d, generator=g) for h in (hq, hkv, hkv, hq)]  # q, k, v, grad


def fwd_bwd(fn, q, k, v, grad_out, backward=True, **kw):
    q, k, v = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
    out = fn(q, k, v, **kw)
    if not backward:
        return [out.detach()]
    (out * grad_out).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


def per_document(q, k, v, grad_out, backward=True):
    """Each document through plain causal eager attention; results put back in place."""
    results = [torch.zeros_like(t) for t in (q, q, k, v)][:4 if backward else 1]
    for b, s, e in segments():
        part = [t[b:b + 1, s:e] for t in (q, k, v, grad_out)]
        for full, got in zip(results, fwd_bwd(eager_attention, *part, backward=backward)):
            full[b:b + 1, s:e] = got
    return results


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """Stand-in for flash_attn_varlen_func (same call convention), from eager attention."""
    assert q.dim() == 3 and cu_q.dtype == torch.int32 and causal and torch.equal(cu_q, cu_k)
    assert max_q == max_k == int(cu_q.diff().max())
    bounds = cu_q.tolist()
    return torch.cat([eager_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0]
                      for a, b in zip(bounds[:-1], bounds[1:])])


def varlen_kernel(q, k, v, *, causal=True, mask=None):
    return attn._varlen_attention(q, k, v, mask, causal, fake_varlen)


KERNELS = {"sdpa": sdpa_attention, "eager": eager_attention, "varlen_plumbing": varlen_kernel}
HEADS = [(4, 4), (8, 2), (4, 1)]


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_equals_documents_run_separately(kernel, hq, hkv):
    q, k, v, grad_out = qkv(hq, hkv)
    got = fwd_bwd(KERNELS[kernel], q, k, v, grad_out, mask=DocumentMask(doc_ids()))
    want = per_document(q, k, v, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{kernel} {name}: {m}")
    assert got[0].is_contiguous() and got[0].shape == q.shape


@pytest.mark.parametrize("hq,hkv", HEADS)
def test_flex_forward_equals_documents_run_separately(hq, hkv):
    q, k, v, grad_out = qkv(hq, hkv)
    got = fwd_bwd(flex_attention_kernel, q, k, v, grad_out, backward=False,
                  mask=DocumentMask(doc_ids()))
    torch.testing.assert_close(got[0], per_document(q, k, v, grad_out, backward=False)[0], **TOL)


def test_mask_representations_agree():
    ids = doc_ids()
    mask = DocumentMask(ids)
    dense = mask.dense()
    assert dense.shape == (2, 1, S, S) and dense.dtype == torch.bool
    assert mask.dense() is dense  # cached: every layer reuses it
    for b, s, e in segments():  # a query sees exactly its document's past
        for i in range(s, e):
            assert dense[b, 0, i].nonzero().squeeze(1).tolist() == list(range(s, i + 1))
    cu_seqlens, max_seqlen = mask.varlen()
    starts = [b * S + s for b, s, _ in segments()]
    assert cu_seqlens.tolist() == starts + [2 * S] and max_seqlen == 13
    block = mask.block_mask()
    assert block.shape == (2, 1, S, S) and mask.block_mask() is block
    assert torch.equal(block.to_dense().bool().any(), torch.tensor(True))


def test_rows_cut_even_when_ids_continue_across_rows():
    # Row 1 starts with the id row 0 ended on: flattened for varlen, it is still a new document.
    ids = torch.tensor([[0, 0, 1, 1], [1, 1, 2, 2]])
    assert DocumentMask(ids).varlen()[0].tolist() == [0, 2, 4, 6, 8]


def test_mask_is_refused_for_other_shapes_and_non_causal():
    q, k, v, _ = qkv(4, 2)
    local = DocumentMask(doc_ids()[:, : S // 2])  # e.g. a sequence-parallel slice's ids
    for fn in (sdpa_attention, eager_attention, flex_attention_kernel, varlen_kernel):
        with pytest.raises(ValueError, match="global"):
            fn(q, k, v, mask=local)
        with pytest.raises(ValueError, match="causal"):
            fn(q, k, v, causal=False, mask=DocumentMask(doc_ids()))
    with pytest.raises(TypeError):
        sdpa_attention(q, k, v, mask=torch.ones(2, 1, S, S, dtype=torch.bool))
    with pytest.raises(ValueError):
        DocumentMask(torch.zeros(S))


def test_without_mask_new_kernels_are_plain_causal():
    q, k, v, _ = qkv(8, 2)
    for fn in (flex_attention_kernel, attn.flash_varlen_attention):
        assert torch.equal(fn(q, k, v), sdpa_attention(q, k, v))


def test_select_attention(monkeypatch):
    assert select_attention("cpu", False) is sdpa_attention
    assert select_attention(torch.device("cpu"), True) is sdpa_attention  # dense fallback
    assert select_attention("cuda", False) is sdpa_attention
    monkeypatch.setattr(attn, "flash_attn_available", lambda: False)
    assert select_attention("cuda:0", True) is flex_attention_kernel
    # Not picked automatically while it is untested against the real flash-attn.
    monkeypatch.setattr(attn, "flash_attn_available", lambda: True)
    assert select_attention("cuda", True) is flex_attention_kernel


def test_document_mask_for_prebuilds_what_the_kernel_reads():
    mask = document_mask_for(doc_ids(), sdpa_attention)
    assert list(mask._dense) == [0] and not mask._block_masks
    wrapper = SimpleNamespace(local_attention=flex_attention_kernel)  # as UlyssesAttention holds it
    mask = document_mask_for(doc_ids(), wrapper)  # looked through
    assert list(mask._block_masks) == [0] and not mask._dense
    mask = document_mask_for(doc_ids(), sdpa_attention, windows=(0, 3))  # one form per window
    assert sorted(mask._dense) == [0, 3]


# --- the whole model -----------------------------------------------------------------------

CFG = ModelConfig(name="test", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                  vocab_size=128)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, CFG.vocab_size, (2, S), generator=g)
    labels = torch.randint(0, CFG.vocab_size, (2, S), generator=g)
    labels[torch.rand(2, S, generator=g) < 0.3] = -100  # uneven valid counts per document
    return ids, labels


def _model(kernel):
    torch.manual_seed(0)  # torch's default init, the same for every kernel
    return GPT(CFG, attention_fn=kernel)


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "flex"])
def test_gpt_with_document_mask_equals_documents_as_sequences(tokens, kernel):
    fn = {"sdpa": sdpa_attention, "eager": eager_attention, "flex": flex_attention_kernel}[kernel]
    ids, labels = tokens
    docs = doc_ids()
    positions = document_positions(docs)
    model, reference = _model(fn), _model(eager_attention)
    backward = kernel != "flex"  # no flex backward on CPU
    with torch.set_grad_enabled(backward):
        logits = model(ids, positions, attn_mask=DocumentMask(docs))
        losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, S)
        if backward:
            model(ids, positions, labels, attn_mask=DocumentMask(docs))[0].backward()
        for b, s, e in segments():
            # Each document alone, positions 0.. (RoPE is relative, so positions alone cannot
            # fail this; the data tests check that positions restart).
            alone = reference(ids[b:b + 1, s:e], torch.arange(e - s)[None])
            torch.testing.assert_close(logits[b:b + 1, s:e], alone, **TOL)
            want = F.cross_entropy(alone.transpose(1, 2), labels[b:b + 1, s:e], reduction="none")
            torch.testing.assert_close(losses[b:b + 1, s:e], want, **TOL)
            if backward:
                reference(ids[b:b + 1, s:e], torch.arange(e - s)[None], labels[b:b + 1, s:e])[0].backward()
    if backward:  # the gradient of the summed loss is the sum over documents
        for (name, p), r in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, r.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_gpt_mask_changes_the_result(tokens):
    ids, _ = tokens
    model = _model(sdpa_attention)
    positions = torch.arange(S).expand(2, S)
    with torch.no_grad():
        masked = model(ids, positions, attn_mask=DocumentMask(doc_ids()))
        plain = model(ids, positions)
    assert torch.allclose(masked[0, :5], plain[0, :5], atol=1e-6)  # first document: no difference
    assert not torch.allclose(masked[0, 5:], plain[0, 5:], atol=1e-3)


# --- GPU: compiled FlexAttention, its gradients and its compile cache ---------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_on_cuda_matches_dense_sdpa(dtype):
    seq, lengths = 1000, [[300, 1, 450, 249], [129, 128, 127, 616]]  # S not a multiple of 128
    ids = doc_ids(lengths).cuda()
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, seq, h, 64, generator=g).cuda().to(dtype)
                         for h in (8, 2, 2, 8))
    mask = document_mask_for(ids, flex_attention_kernel)
    got = fwd_bwd(flex_attention_kernel, q, k, v, grad_out, mask=mask)
    want = fwd_bwd(sdpa_attention, *(t.float() for t in (q, k, v, grad_out)), mask=mask)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, **tol)
    # A new batch (other ids, same shapes) must reuse the compiled kernel, not recompile.
    from torch._dynamo import config as dynamo_config

    with dynamo_config.patch(error_on_recompile=True):
        other = document_mask_for(ids.flip(1).contiguous(), flex_attention_kernel)
        fwd_bwd(flex_attention_kernel, q, k, v, grad_out, mask=other)
