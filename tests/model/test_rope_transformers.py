"""RoPE scaling equals Hugging Face transformers' (the test oracle, never imported by the package).

Two levels: our inverse frequencies and attention scaling against `ROPE_INIT_FUNCTIONS` for each
shared method over several factors and head dims (bit-exact: the same fp32 operations), and the
logits of a tiny GPT against `LlamaForCausalLM` with the same weights (fp32, max |delta| <= 1e-5)
at positions far past the original context, where the methods differ most.
"""
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from ulysses_train.config.schema import ModelConfig
from ulysses_train.hf.names import hf_names
from ulysses_train.model import GPT
from ulysses_train.model.rope import rope_frequencies

# (rope_type, transformers rope_parameters beyond rope_type / rope_theta / factor, our keys)
CASES = [
    ("linear", {}, {}),
    ("llama3", {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256},
     {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_seq_len": 256}),
    ("llama3", {"low_freq_factor": 2.0, "high_freq_factor": 8.0,
                "original_max_position_embeddings": 1024},
     {"rope_low_freq_factor": 2.0, "rope_high_freq_factor": 8.0, "rope_original_seq_len": 1024}),
    ("yarn", {"original_max_position_embeddings": 512},
     {"rope_original_seq_len": 512}),
    ("yarn", {"original_max_position_embeddings": 2048, "beta_fast": 16.0, "beta_slow": 2.0,
              "truncate": False},
     {"rope_original_seq_len": 2048, "rope_beta_fast": 16.0, "rope_beta_slow": 2.0,
      "rope_truncate": False}),
    ("yarn", {"original_max_position_embeddings": 4096, "attention_factor": 1.3},
     {"rope_original_seq_len": 4096, "rope_attention_factor": 1.3}),
    ("yarn", {"original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 1.0},
     {"rope_original_seq_len": 4096, "rope_mscale": 0.707, "rope_mscale_all_dim": 1.0}),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]
# (head_dim, n_heads, theta)
HEADS = [(16, 4, 10000.0), (64, 2, 500000.0), (128, 1, 1000000.0)]


def _hf_config(rope_type, extra, factor, head_dim, n_heads, theta, **kw) -> LlamaConfig:
    params = {"rope_type": rope_type, "rope_theta": theta, "factor": factor, **extra}
    # The extended context (transformers warns when it disagrees with factor x original).
    extended = int(extra.get("original_max_position_embeddings", 1024) * factor)
    return LlamaConfig(hidden_size=head_dim * n_heads, num_attention_heads=n_heads,
                       num_key_value_heads=n_heads, rope_parameters=params,
                       max_position_embeddings=extended, **kw)


def _ours(rope_type, ours, factor, head_dim, n_heads, theta, **kw) -> ModelConfig:
    return ModelConfig(name="t", d_model=head_dim * n_heads, n_heads=n_heads,
                       n_kv_heads=n_heads, rope_theta=theta, rope_scaling=rope_type,
                       rope_factor=factor, **ours, **kw)


@pytest.mark.parametrize("factor", [2.0, 4.0, 32.0])
@pytest.mark.parametrize("head_dim,n_heads,theta", HEADS)
@pytest.mark.parametrize("rope_type,extra,ours", CASES, ids=IDS)
def test_inverse_frequencies_and_attention_scaling_equal_transformers(
        rope_type, extra, ours, head_dim, n_heads, theta, factor):
    hf = _hf_config(rope_type, extra, factor, head_dim, n_heads, theta)
    expected, expected_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    got, scaling = rope_frequencies(_ours(rope_type, ours, factor, head_dim, n_heads, theta))
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert scaling == pytest.approx(expected_scaling, rel=1e-12, abs=0)


def _tiny_pair(cfg: ModelConfig, hf_cfg: LlamaConfig) -> tuple[GPT, LlamaForCausalLM]:
    """Our GPT (init_weights(0), q/k/v biases random if any) and an HF model with its weights."""
    ours = GPT(cfg)
    ours.init_weights(0)
    theirs = LlamaForCausalLM(hf_cfg).eval()
    names = hf_names(cfg)
    state = {hf: ours.state_dict()[mine] for mine, hf in names.items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # drop our 128-padding rows
        if key in state:
            state[key] = state[key][:cfg.vocab_size]
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and \
        (not missing or cfg.tie_embeddings)
    return ours.eval(), theirs


LOGIT_CASES = [("none", {}, {})] + [CASES[i] for i in (1, 3, 6, 0)]


@pytest.mark.parametrize("rope_type,extra,ours_keys", LOGIT_CASES,
                         ids=["default", "llama3", "yarn", "yarn-mscale", "linear"])
def test_tiny_model_logits_equal_llama_for_causal_lm(rope_type, extra, ours_keys):
    common = dict(n_layers=2, ffn_hidden=96, vocab_size=200, norm_eps=1e-6)
    cfg = _ours(rope_type, ours_keys, 8.0, 16, 4, 10000.0, **common)
    cfg = replace(cfg, n_kv_heads=2, tie_embeddings=rope_type == "yarn")
    kw = dict(num_hidden_layers=2, intermediate_size=96, vocab_size=200, rms_norm_eps=1e-6,
              tie_word_embeddings=cfg.tie_embeddings, attn_implementation="eager")
    if rope_type == "none":
        hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0,
                             max_position_embeddings=8192, **kw)
    else:
        hf_cfg = _hf_config(rope_type, extra, 8.0, 16, 4, 10000.0, **kw)
    hf_cfg.num_key_value_heads = 2
    ours, theirs = _tiny_pair(cfg, hf_cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 24), generator=g)
    pos = (torch.arange(24) * 211 + 3000).expand(2, 24)  # up to ~8000: beyond every original
    with torch.no_grad():
        got = ours(ids, pos)[..., :200]
        expected = theirs(input_ids=ids, position_ids=pos).logits
    diff = (got - expected).abs().max().item()
    print(f"rope {rope_type}: max|logits - transformers| = {diff:.2e}")  # pytest -s shows it
    assert diff <= 1e-5
