"""Local attention kernels: SDPA against the explicit fp32 reference, GQA layout, causality."""
import pytest
import torch

from ulysses_train.model import eager_attention, sdpa_attention


def _qkv(hq: int, hkv: int, B: int = 2, S: int = 9, D: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, hq, D, generator=g), torch.randn(B, S, hkv, D, generator=g),
            torch.randn(B, S, hkv, D, generator=g))


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_eager_forward_and_backward(hq, hkv, causal):
    tensors = _qkv(hq, hkv)
    outs, grads = [], []
    for fn in (sdpa_attention, eager_attention):
        q, k, v = (t.clone().requires_grad_() for t in tensors)
        out = fn(q, k, v, causal=causal)
        assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view_as(out))
        outs.append(out)
        grads.append((q.grad, k.grad, v.grad))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gqa_head_mapping_is_repeat_interleave():
    # Query head h reads kv head h // (Hq / Hkv): the layout a Ulysses wrapper must preserve.
    q, k, v = _qkv(8, 2)
    expanded = [t.repeat_interleave(4, dim=2) for t in (k, v)]
    torch.testing.assert_close(sdpa_attention(q, k, v), sdpa_attention(q, *expanded), atol=1e-6, rtol=1e-6)
    tiled = [t.repeat(1, 1, 4, 1) for t in (k, v)]  # the other (wrong) convention
    assert not torch.allclose(sdpa_attention(q, k, v), sdpa_attention(q, *tiled), atol=1e-3)


@pytest.mark.parametrize("fn", [sdpa_attention, eager_attention])
def test_causal_ignores_future(fn):
    q, k, v = _qkv(4, 2)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, 5:] += 1.0  # change tokens 5.. only
    a, b = fn(q, k, v), fn(q2, k2, v2)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    # and without the mask, the past does see the future
    assert not torch.allclose(fn(q, k, v, causal=False)[:, :5], fn(q2, k2, v2, causal=False)[:, :5])


def test_bf16_stays_bf16():
    q, k, v = (t.bfloat16() for t in _qkv(4, 2))
    for fn in (sdpa_attention, eager_attention):
        assert fn(q, k, v).dtype == torch.bfloat16


def test_rejects_bad_head_counts():
    q, k, v = _qkv(6, 4)
    with pytest.raises(ValueError):
        sdpa_attention(q, k, v)
    with pytest.raises(ValueError):
        eager_attention(q, k[:, :3], v)
