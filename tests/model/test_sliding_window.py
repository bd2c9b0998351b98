"""Sliding-window attention (model.sliding_window, model.layer_types): the masks against
transformers' own mask functions, every kernel against an explicit softmax under that mask, and
the model's per-layer windows.

The reference mask is transformers' `create_sliding_window_causal_mask` (the function Mistral's
forward calls), fed our restarted positions: transformers finds the packed documents from
them itself, so neither the window nor the document rule is ours in the reference.
"""
from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig
from transformers import masking_utils as hf_masks

from support.common import fwd_bwd
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
from ulysses_train.model.masking import window_dense

# Eager flex on CPU warns that it is unfused: expected, it only runs here as a reference.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

S = 24
# Per-row document lengths: single-token documents at a row start, inside and at the end,
# documents shorter and longer than every window below; None = one document per row.
LAYOUTS = {"one-document": None, "documents": [[5, 1, 9, 3, 6], [1, 13, 2, 7, 1]]}
WINDOWS = [1, 2, 5, 8, S - 1, S, S + 7]  # 1 = only itself; >= S = plain causal


def doc_ids(lengths) -> torch.Tensor:
    if lengths is None:
        return torch.zeros(2, S, dtype=torch.long)
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                        for r in lengths])  # (B, S)


def transformers_mask(lengths, window: int) -> torch.Tensor:
    """(B, 1, S, S) bool from transformers' Mistral mask builder (sdpa form), packed documents
    detected by transformers from the positions restarting at each document."""
    cfg = MistralConfig(sliding_window=window, hidden_size=8, num_attention_heads=2,
                        num_key_value_heads=2, num_hidden_layers=1, intermediate_size=8,
                        vocab_size=16)
    cfg._attn_implementation = "sdpa"
    positions = document_positions(doc_ids(lengths))
    return hf_masks.create_sliding_window_causal_mask(
        config=cfg, inputs_embeds=torch.zeros(2, S, 8), attention_mask=None, cache=None,
        position_ids=positions, allow_is_causal_skip=False)


def ours(lengths, window: int) -> torch.Tensor:
    if lengths is None:
        return window_dense(S, window, torch.device("cpu")).expand(2, 1, S, S)
    return DocumentMask(doc_ids(lengths)).dense(window)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("window", WINDOWS)
def test_dense_masks_equal_transformers(layout, window):
    want = transformers_mask(LAYOUTS[layout], window)
    assert torch.equal(ours(LAYOUTS[layout], window), want)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("window", [2, 8, S])
def test_flex_mask_mod_equals_transformers(layout, window):
    """The BlockMask's mask_mod, evaluated on every (q, kv) pair by flex's own create_mask."""
    from torch.nn.attention.flex_attention import create_mask

    lengths = LAYOUTS[layout]
    if lengths is None:
        mask_mod = attn.window_block_mask(S, window, torch.device("cpu")).mask_mod
    else:
        mask_mod = DocumentMask(doc_ids(lengths)).block_mask(window).mask_mod
    dense = create_mask(mask_mod, 2, 1, S, S, device="cpu")
    assert torch.equal(dense, transformers_mask(lengths, window))


def softmax_reference(q, k, v, visible):
    """softmax(q k^T / sqrt(D), masked by `visible` (B, 1, S, S)) v in float64, GQA by
    repeat_interleave: independent of every kernel under test."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) -> (B, H, S, D)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, S, S)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).float()  # (B, H, S, D) -> (B, S, H, D)


def qkv(hq=8, hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, S, h, 8, generator=g) for h in (hq, hkv, hkv, hq)]  # q, k, v, grad


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, window_size):
    """Stand-in for flash_attn_varlen_func: flash-attn's window_size=(left, 0) means keys
    i - left ... i of the query's own varlen sequence; computed here from that definition."""
    assert causal and window_size[1] == 0 and torch.equal(cu_q, cu_k)
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(b - a)
        seen = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window_size[0])
        out[a:b] = softmax_reference(q[None, a:b], k[None, a:b], v[None, a:b], seen)[0]
    return out


def varlen_plumbing(q, k, v, *, causal=True, mask=None, window=0):
    return attn._varlen_attention(q, k, v, mask, causal, fake_varlen, window)


KERNELS = {"sdpa": sdpa_attention, "eager": eager_attention}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("window", [1, 5, S])
def test_kernels_apply_the_window_forward_and_backward(kernel, layout, window):
    lengths = LAYOUTS[layout]
    q, k, v, grad_out = qkv()
    mask = None if lengths is None else DocumentMask(doc_ids(lengths))
    got = fwd_bwd(KERNELS[kernel], q, k, v, grad_out, mask=mask, window=window)
    want = fwd_bwd(lambda *t: softmax_reference(*t, transformers_mask(lengths, window)),
                   q, k, v, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flex_and_flash_plumbing_apply_the_window(layout):
    """Forward only for flex (eager flex has no CPU backward); flash-attn's kernel is not
    installed: its window_size=(W-1, 0) and cu_seqlens plumbing runs against the stand-in."""
    lengths, window = LAYOUTS[layout], 5
    q, k, v, _ = qkv()
    mask = DocumentMask(doc_ids(lengths))  # a one-document row is one varlen sequence
    want = softmax_reference(q, k, v, transformers_mask(lengths, window))
    flex_mask = None if lengths is None else mask
    torch.testing.assert_close(flex_attention_kernel(q, k, v, mask=flex_mask, window=window),
                               want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(varlen_plumbing(q, k, v, mask=mask, window=window), want,
                               atol=1e-5, rtol=1e-5)


def test_window_needs_causal_and_a_valid_size():
    q, k, v, _ = qkv()
    for fn in (sdpa_attention, eager_attention, flex_attention_kernel):
        with pytest.raises(ValueError, match="causal=True"):
            fn(q, k, v, causal=False, window=4)
        with pytest.raises(ValueError, match="window must be an int >= 0"):
            fn(q, k, v, window=-1)


def test_select_attention_takes_the_block_sparse_kernel_for_windows_on_cuda():
    assert select_attention("cuda", False, sliding=True) is flex_attention_kernel
    assert select_attention("cpu", False, sliding=True) is sdpa_attention  # dense mask on CPU
    assert select_attention("cuda", False, sliding=False) is sdpa_attention


# --- the model: each layer its own window -------------------------------------------------

CFG = dict(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=128)
MIXED = ["sliding_attention", "sliding_attention", "full_attention"]


def _logits(cfg: ModelConfig, kernel=sdpa_attention, attn_mask=None, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    model = GPT(cfg, attention_fn=kernel)  # torch's seeded default init: same weights per seed
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, S), generator=g)
    positions = torch.arange(S).expand(2, S)
    with torch.no_grad():
        return model(ids, positions, attn_mask=attn_mask)


def test_each_layer_gets_its_window():
    """Mixed layer_types: the kernel sees window=W on sliding layers and no window keyword on
    full ones; [] with a window slides every layer (transformers' Mistral)."""
    calls = []

    def spy(q, k, v, **kw):
        calls.append(kw.get("window"))
        return sdpa_attention(q, k, v, **kw)

    _logits(ModelConfig(**CFG, sliding_window=4, layer_types=MIXED), spy)
    assert calls == [4, 4, None]
    calls.clear()
    _logits(ModelConfig(**CFG, sliding_window=4), spy)
    assert calls == [4, 4, 4]


def test_window_changes_the_model_until_it_covers_the_sequence():
    full = _logits(ModelConfig(**CFG))
    covering = _logits(ModelConfig(**CFG, sliding_window=S, layer_types=MIXED))
    torch.testing.assert_close(covering, full, atol=1e-5, rtol=1e-5)
    narrow = _logits(ModelConfig(**CFG, sliding_window=4, layer_types=MIXED))
    assert not torch.allclose(narrow, full, atol=1e-3)


def test_gpt_with_documents_equals_transformers_masked_layers():
    """The whole model with documents and a mixed window: each sliding layer through a kernel
    given transformers' mask for (documents, W), each full one transformers' causal packed
    mask, equals our masks built by `document_mask`."""
    lengths = LAYOUTS["documents"]
    cfg = ModelConfig(**CFG, sliding_window=5, layer_types=MIXED)
    torch.manual_seed(0)
    model = GPT(cfg)
    mask = model.document_mask(doc_ids(lengths))
    assert sorted(mask._dense) == [0, 5]  # built up front, one form per distinct window

    def reference(q, k, v, causal=True, mask=None, window=0):
        return softmax_reference(q, k, v, transformers_mask(lengths, window or S))

    torch.manual_seed(0)
    ref_model = GPT(cfg, attention_fn=reference)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, S), generator=g)
    positions = document_positions(doc_ids(lengths))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, positions, attn_mask=mask),
                                   ref_model(ids, positions, attn_mask=mask),
                                   atol=1e-5, rtol=1e-5)


def test_a_kernel_without_window_support_is_refused_not_silently_full():
    def causal_only(q, k, v, *, causal=True, mask=None):
        return sdpa_attention(q, k, v, causal=causal, mask=mask)

    _logits(ModelConfig(**CFG), causal_only)  # fine without a window
    with pytest.raises(TypeError, match="window"):
        _logits(ModelConfig(**CFG, sliding_window=4, layer_types=MIXED), causal_only)


def test_document_mask_for_builds_every_window_for_flex():
    ids = doc_ids(LAYOUTS["documents"])
    mask = document_mask_for(ids, flex_attention_kernel, windows=(0, 5))
    assert sorted(mask._block_masks) == [0, 5] and not mask._dense


# --- GPU: compiled FlexAttention with a window ----------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("documents", [False, True])
def test_compiled_flex_window_on_cuda_matches_dense_sdpa(documents):
    seq, window = 1000, 200  # S not a multiple of 128; W spans block boundaries
    lengths = [[300, 1, 450, 249], [129, 128, 127, 616]]
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                       for r in lengths]).cuda()
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, seq, h, 64, generator=g).cuda() for h in (8, 2, 2, 8))
    mask = document_mask_for(ids, flex_attention_kernel, (window,)) if documents else None
    got = fwd_bwd(flex_attention_kernel, q, k, v, grad_out, mask=mask, window=window)
    dense = DocumentMask(ids) if documents else None
    want = fwd_bwd(sdpa_attention, q, k, v, grad_out, mask=dense, window=window)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
