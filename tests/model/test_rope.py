"""RoPE: the rotate-half formula, global positions, fp32 angles."""
import math

import pytest
import torch

from ulysses_train.model import apply_rope, rope_inv_freq


def _reference(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Element by element, in float64: pair (i, i + D/2) rotated by pos * theta^(-2i/D)."""
    B, S, H, D = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            for h in range(H):
                for i in range(D // 2):
                    a = float(pos[b, s]) * theta ** (-2 * i / D)
                    x1, x2 = float(x[b, s, h, i]), float(x[b, s, h, i + D // 2])
                    out[b, s, h, i] = x1 * math.cos(a) - x2 * math.sin(a)
                    out[b, s, h, i + D // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def test_inv_freq():
    f = rope_inv_freq(8, 10000.0)
    assert f.dtype == torch.float32 and f.shape == (4,)
    expected = torch.tensor([10000.0 ** (-2 * i / 8) for i in range(4)])
    torch.testing.assert_close(f, expected)


def test_matches_per_element_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 8, generator=g)
    pos = torch.tensor([[0, 5, 17], [1000, 1001, 4096]])  # explicit, non-contiguous, large
    out = apply_rope(x, pos, rope_inv_freq(8, 10000.0))
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), _reference(x, pos, 10000.0), atol=2e-5, rtol=1e-5)


def test_positions_matter():
    x = torch.randn(1, 4, 2, 8)
    f = rope_inv_freq(8, 10000.0)
    pos = torch.arange(4)[None]
    assert not torch.allclose(apply_rope(x, pos, f), apply_rope(x, pos + 3, f))


def test_global_positions_make_slices_match_the_whole():
    # What a sequence-parallel rank relies on: rope of slice r at positions r*S/P... equals the
    # corresponding slice of rope over the whole sequence.
    x = torch.randn(2, 8, 2, 16)
    f = rope_inv_freq(16, 10000.0)
    pos = torch.arange(8).expand(2, 8)
    whole = apply_rope(x, pos, f)
    second_half = apply_rope(x[:, 4:], pos[:, 4:], f)
    torch.testing.assert_close(second_half, whole[:, 4:])
    assert not torch.allclose(apply_rope(x[:, 4:], pos[:, :4], f), whole[:, 4:])  # local positions: wrong


def test_dot_product_depends_only_on_relative_position():
    f = rope_inv_freq(16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rope(q, torch.tensor([[m]]), f)
        kn = apply_rope(k, torch.tensor([[n]]), f)
        return (qm * kn).sum()

    base = score(7, 3)
    for shift in (1, 50, 1000):
        torch.testing.assert_close(score(7 + shift, 3 + shift), base, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(8, 3), base, atol=1e-3)  # a different offset changes it


def test_bf16_input_uses_fp32_angles():
    # bf16 cannot represent position 100003 (spacing 512 there); bf16 angles would be far off.
    x = torch.randn(1, 2, 2, 16)
    pos = torch.tensor([[100003, 131071]])
    f = rope_inv_freq(16, 10000.0)
    out = apply_rope(x.bfloat16(), pos, f)
    assert out.dtype == torch.bfloat16
    ref = _reference(x.bfloat16().float(), pos, 10000.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_rejects_bad_shapes():
    f = rope_inv_freq(8, 10000.0)
    with pytest.raises(ValueError):
        apply_rope(torch.randn(1, 4, 2, 8), torch.arange(3)[None], f)
    with pytest.raises(ValueError):
        rope_inv_freq(7, 10000.0)
