"""RoPE scaling for context extension: each method against its published formula, the yarn
temperature, validation of the scaling keys, the GPT wiring and the Hydra overrides.

The references below are written per frequency in plain Python floats (float64) straight from the
papers' formulas, deliberately not through `rope.py`, so a bug there cannot cancel out.
"""
import math
from dataclasses import replace

import pytest
import torch

from support.common import small_config
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import ModelConfig
from ulysses_train.config.validate import validate
from ulysses_train.model import GPT, rope_inv_freq
from ulysses_train.model.rope import (
    rope_cos_sin,
    rope_frequencies,
    rope_scaled_inv_freq,
    yarn_attention_factor,
    yarn_correction_range,
)

# (head_dim, theta, factor, original_seq_len): Llama 3.1's setting, a Llama-2-like one, a tiny one.
SETTINGS = [(128, 500000.0, 8.0, 8192), (64, 10000.0, 4.0, 4096), (16, 10000.0, 16.0, 256)]
CFG = ModelConfig(name="test", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                  vocab_size=1000, rope_factor=4.0, rope_original_seq_len=64)
METHODS = ("linear", "ntk", "yarn", "llama3")


def ref_base(dim, theta):
    return [theta ** (-2 * i / dim) for i in range(dim // 2)]


def ref_ntk(dim, theta, factor):
    """NTK-aware (bloc97): the same table with base theta * factor^(D / (D - 2))."""
    return ref_base(dim, theta * factor ** (dim / (dim - 2)))


def ref_llama3(dim, theta, factor, original, low=1.0, high=4.0):
    """Llama 3.1's rule, by wavelength bands."""
    out = []
    for f in ref_base(dim, theta):
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(f)
        elif wavelen > original / low:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def ref_yarn(dim, theta, factor, original, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """YaRN (Peng et al. 2023, "NTK-by-parts", as its reference code and transformers compute it):
    h(f_i) = (1 - g_i) f_i / s + g_i f_i, where the kept share g_i falls linearly in the pair
    index i from 1 at i <= low to 0 at i >= high, and low/high are the indices of the pairs
    making beta_fast/beta_slow turns over the original context (floored/ceiled when truncating,
    clamped to [0, dim - 1])."""
    def pair(turns):  # solve original * theta^(-2i/dim) / (2 pi) = turns for i
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair(beta_fast), pair(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    out = []
    for i, f in enumerate(ref_base(dim, theta)):
        gamma = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append((1 - gamma) * f / factor + gamma * f)
    return out


def close(got: torch.Tensor, ref: list, rtol=2e-6) -> bool:
    assert got.dtype == torch.float32 and got.shape == (len(ref),)
    return torch.allclose(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=rtol, atol=0)


@pytest.mark.parametrize("dim,theta,factor,original", SETTINGS)
def test_every_method_matches_its_formula(dim, theta, factor, original):
    def scaled(method):
        return rope_scaled_inv_freq(dim, theta, method, factor, original)

    assert close(scaled("none"), ref_base(dim, theta))
    assert close(scaled("linear"), [f / factor for f in ref_base(dim, theta)])
    assert close(scaled("ntk"), ref_ntk(dim, theta, factor))
    assert close(scaled("llama3"), ref_llama3(dim, theta, factor, original))
    assert close(scaled("yarn"), ref_yarn(dim, theta, factor, original))
    # Non-default knobs reach the formula too.
    got = rope_scaled_inv_freq(dim, theta, "yarn", factor, original, beta_fast=16.0, beta_slow=2.0)
    assert close(got, ref_yarn(dim, theta, factor, original, beta_fast=16.0, beta_slow=2.0))
    got = rope_scaled_inv_freq(dim, theta, "llama3", factor, original, low_freq_factor=2.0,
                               high_freq_factor=8.0)
    assert close(got, ref_llama3(dim, theta, factor, original, low=2.0, high=8.0))


def test_none_is_exactly_the_old_table():
    for cfg in (CFG, ModelConfig(), replace(CFG, rope_theta=500000.0)):
        inv_freq, mscale = rope_frequencies(cfg)
        assert torch.equal(inv_freq, rope_inv_freq(cfg.d_model // cfg.n_heads, cfg.rope_theta))
        assert mscale == 1.0


def test_linear_is_positions_divided_by_factor():
    base = rope_inv_freq(16, 10000.0)
    pos = torch.arange(0, 100_000, 37)[None]  # (1, S), far beyond any original context
    # factor 4: f / 4 and p / 4 are exact in fp32, so both routes round the same product once.
    lin = rope_scaled_inv_freq(16, 10000.0, "linear", 4.0)
    for a, b in zip(rope_cos_sin(pos, lin), rope_cos_sin(pos / 4, base)):
        assert torch.equal(a, b)
    lin = rope_scaled_inv_freq(16, 10000.0, "linear", 3.0)
    for a, b in zip(rope_cos_sin(pos[:, :50], lin), rope_cos_sin(pos[:, :50] / 3, base)):
        assert torch.allclose(a, b, atol=5e-4)  # fp32 angles up to ~1800 rad


def test_ntk_keeps_the_fastest_pair_and_interpolates_the_slowest():
    base, ntk = rope_inv_freq(64, 10000.0), rope_scaled_inv_freq(64, 10000.0, "ntk", 8.0)
    assert ntk[0] == base[0] == 1.0
    assert math.isclose(ntk[-1].item(), base[-1].item() / 8.0, rel_tol=1e-5)
    assert (ntk[1:] < base[1:]).all() and (ntk[1:-1] > base[1:-1] / 8.0).all()


def test_llama3_three_bands():
    # Llama 3.1: factor 8 from an 8192 context, low 1, high 4 -> bands at wavelengths 2048, 8192.
    base = rope_inv_freq(128, 500000.0)
    got = rope_scaled_inv_freq(128, 500000.0, "llama3", 8.0, 8192, low_freq_factor=1.0,
                               high_freq_factor=4.0)
    wavelen = 2 * math.pi / base.double()
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    mid = ~high & ~low
    assert high.sum() > 0 and low.sum() > 0 and mid.sum() > 0
    assert torch.equal(got[high], base[high])  # short wavelengths: untouched, bit for bit
    assert torch.allclose(got[low], base[low] / 8.0, rtol=1e-6, atol=0)
    assert (got[mid] < base[mid]).all() and (got[mid] > base[mid] / 8.0).all()
    # In the middle band the interpolated share falls smoothly as the wavelength shrinks.
    share = (base[mid] / got[mid]).double()
    assert (share[1:] > share[:-1]).all()


def test_yarn_ramp_is_linear_in_the_pair_index_between_floored_bounds():
    dim, theta, factor, original = 128, 10000.0, 16.0, 4096
    base = rope_inv_freq(dim, theta)
    got = rope_scaled_inv_freq(dim, theta, "yarn", factor, original, beta_fast=32.0, beta_slow=1.0)
    low, high = yarn_correction_range(dim, theta, original, 32.0, 1.0)
    assert (low, high) == (20, 46)  # i(32 turns) = 20.94 floored, i(1 turn) = 45.03 ceiled
    i = torch.arange(dim // 2)
    fast, slow = i <= low, i >= high
    ramp = ~fast & ~slow
    assert torch.equal(got[fast], base[fast])
    assert torch.allclose(got[slow], base[slow] / factor, rtol=1e-6, atol=0)
    # Inside the range the kept share is linear in the index, not in the number of turns.
    gamma = (got[ramp].double() / base[ramp].double() - 1 / factor) / (1 - 1 / factor)
    assert torch.allclose(gamma, 1 - (i[ramp].double() - low) / (high - low), atol=1e-5)
    untruncated = yarn_correction_range(dim, theta, original, 32.0, 1.0, truncate=False)
    assert low < untruncated[0] < untruncated[1] < high
    loose = rope_scaled_inv_freq(dim, theta, "yarn", factor, original, truncate=False)
    assert close(loose, ref_yarn(dim, theta, factor, original, truncate=False))
    assert not torch.equal(loose, got)


def test_yarn_attention_scaling():
    factor = 16.0
    default = 0.1 * math.log(factor) + 1.0  # the paper's sqrt(1/t)
    assert yarn_attention_factor(factor) == pytest.approx(default, rel=1e-12)
    assert yarn_attention_factor(1.0) == 1.0
    assert yarn_attention_factor(factor, attention_factor=0.5) == 0.5  # given: used as is
    ratio = (0.1 * 0.7 * math.log(factor) + 1) / (0.1 * 0.9 * math.log(factor) + 1)
    assert yarn_attention_factor(factor, mscale=0.7, mscale_all_dim=0.9) == pytest.approx(ratio)
    assert yarn_attention_factor(factor, mscale=0.7) == pytest.approx(default)  # needs both
    cfg = replace(CFG, rope_scaling="yarn", rope_factor=factor)
    inv_freq, m = rope_frequencies(cfg)
    assert m == pytest.approx(default, rel=1e-12)
    assert rope_frequencies(replace(cfg, rope_attention_factor=1.25))[1] == 1.25
    cos, sin = rope_cos_sin(torch.arange(300)[None] * 97, inv_freq, m)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.allclose(cos ** 2 + sin ** 2, torch.full_like(cos, default ** 2), rtol=1e-5)
    for other in ("none", "linear", "ntk", "llama3"):  # the scaling is yarn's alone
        assert rope_frequencies(replace(cfg, rope_scaling=other))[1] == 1.0


def build(cfg: ModelConfig, meta=False) -> GPT:
    if meta:
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
    else:
        model = GPT(cfg)
    model.init_weights(0)
    return model


@pytest.fixture(scope="module")
def reference_run():
    """(ids, long positions, logits of the unscaled model) shared by the per-method tests."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
    pos = (torch.arange(16) * 40 + 1000).expand(2, 16)  # far past rope_original_seq_len=64
    with torch.no_grad():
        return ids, pos, build(CFG)(ids, pos)


@pytest.mark.parametrize("method", METHODS)
def test_gpt_forward_with_each_scaling(method, reference_run):
    ids, pos, unscaled = reference_run
    cfg = replace(CFG, rope_scaling=method)
    model = build(cfg, meta=True)  # init_weights must recompute the scaled table after to_empty
    inv_freq, mscale = rope_frequencies(cfg)
    assert torch.equal(model.inv_freq, inv_freq) and model.attention_scaling == mscale
    with torch.no_grad():
        logits = model(ids, pos)[..., :CFG.vocab_size]  # the padded columns are -inf (model/vocab.py)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, unscaled[..., :CFG.vocab_size], atol=1e-4)  # other angles


def test_gpt_applies_the_yarn_temperature():
    ids, pos = torch.arange(16)[None] % CFG.vocab_size, torch.arange(16)[None] * 50
    model = build(replace(CFG, rope_scaling="yarn"))
    assert model.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    with torch.no_grad():
        with_t = model(ids, pos)
        model.attention_scaling = 1.0
        without_t = model(ids, pos)
    assert not torch.allclose(with_t, without_t, atol=1e-4)


def test_every_method_validates():
    for method in ("none", *METHODS):
        validate(small_config(model={"rope_scaling": method}))


BAD = [  # (key, value, key named in the error)
    ("rope_scaling", "dynamic", "model.rope_scaling"),
    ("rope_scaling", "longrope", "model.rope_scaling"),
    ("rope_attention_factor", 0.0, "model.rope_attention_factor"),
    ("rope_attention_factor", math.nan, "model.rope_attention_factor"),
    ("rope_mscale", -1.0, "model.rope_mscale"),
    ("rope_mscale_all_dim", math.inf, "model.rope_mscale_all_dim"),
    ("rope_factor", 0.5, "model.rope_factor"),
    ("rope_factor", 0.0, "model.rope_factor"),
    ("rope_factor", math.nan, "model.rope_factor"),
    ("rope_factor", math.inf, "model.rope_factor"),
    ("rope_original_seq_len", 0, "model.rope_original_seq_len"),
    ("rope_original_seq_len", -4096, "model.rope_original_seq_len"),
    ("rope_beta_fast", math.inf, "model.rope_beta_fast"),
    ("rope_beta_fast", 1.0, "model.rope_beta_fast"),  # not above beta_slow=1
    ("rope_beta_slow", 0.0, "model.rope_beta_slow"),
    ("rope_beta_slow", math.nan, "model.rope_beta_slow"),
    ("rope_low_freq_factor", -1.0, "model.rope_low_freq_factor"),
    ("rope_high_freq_factor", 0.5, "model.rope_high_freq_factor"),  # not above low=1
    ("rope_high_freq_factor", math.nan, "model.rope_high_freq_factor"),
]


@pytest.mark.parametrize("key,value,expected_key", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_scaling_value_names_its_key(key, value, expected_key):
    with pytest.raises(ConfigError) as info:
        validate(small_config(model={"rope_scaling": "yarn", key: value}))
    assert info.value.key == expected_key
    assert str(info.value).startswith(expected_key + ": ") and "\n" not in str(info.value)


def test_ntk_refuses_a_head_dim_of_two():
    with pytest.raises(ConfigError, match="model.rope_scaling: ntk needs a head dim > 2"):
        validate(small_config(model={"rope_scaling": "ntk", "d_model": 8}))


def test_scaling_keys_go_through_hydra_overrides():
    from ulysses_train.cli import compose as cli

    cfg = cli.precheck(["model.rope_scaling=yarn", "model.rope_factor=4", "model.rope_beta_fast=16",
                        "model.rope_original_seq_len=2048", "model.rope_high_freq_factor=8"])
    m = cfg.model
    assert (m.rope_scaling, m.rope_factor, m.rope_original_seq_len) == ("yarn", 4.0, 2048)
    assert (m.rope_beta_fast, m.rope_beta_slow, m.rope_high_freq_factor) == (16.0, 1.0, 8.0)
    with pytest.raises(ConfigError) as info:
        cli.precheck(["model.rope_scaling=llama3", "model.rope_factor=0.5"])
    assert info.value.key == "model.rope_factor"
