"""Qwen3 and Gemma 3 in from and out to Hugging Face (issue 21).

Sources: support/hf.py save_family (transformers' save_pretrained, fp32): head_dim 16 != 48 / 4
heads, 2 kv heads, four layers mixing sliding (window 8) and full attention, random norm
weights; Gemma 3 with its own RoPE base on the local layers and linear x2 on the global ones,
query_pre_attn_scalar 24 != head_dim; a Gemma3ForConditionalGeneration with a tiny vision tower.

- In: `model.init_from` (pre-check + hf/init_from, the library path) gives logits equal to
  transformers' (<= 1e-4) at every position of data.seq_len=32, four windows.
- Out: init_from -> one step at lr 1e-12 -> export (fp32) -> AutoModelForCausalLM computes our
  logits and the source's, and AutoConfig reads the same architecture from both.
- Bad input: one line naming the config.json field; an unsupported model_type lists the
  supported ones; a switch mix no transformers class computes is not exported.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers  # noqa: E402  (a dev dependency: missing = a failure, not a skip)

from support.common import SMALL, cpu_dims, run_train
from support.hf import auto_logits, export_round_trip
from ulysses_train.cli import compose as cli
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import ModelConfig
from ulysses_train.hf.config import hf_model_fields, rope_notes
from ulysses_train.hf.export_config import hf_config_json
from ulysses_train.hf.family import GEMMA3_TEXT_DEFAULTS, SUPPORTED
from ulysses_train.hf.init_from import load_initial_weights
from ulysses_train.parallel.parallelize import build_model
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SEQ = 32  # 4 windows of 8
ARGS = [a for a in SMALL if not a.startswith(("model.", "data.seq_len"))] + [
    f"data.seq_len={SEQ}"]
TAGS = ["qwen3", "gemma3", "gemma3-vision"]


def _ids(vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(5))


def load(path: str):
    """(ModelConfig, our GPT with the weights of HF dir `path`, the load's log line)."""
    cfg = cli.precheck([*ARGS, f"model.init_from={path}"])
    model = build_model(cfg, cpu_dims())
    line = load_initial_weights(model, path, cfg.model, cpu_dims())
    return cfg.model, model, line


def our_logits(model, m: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids))[..., :m.vocab_size]


@pytest.fixture(scope="module")
def loaded(hf_families):
    return {tag: load(hf_families[tag]) for tag in TAGS}


@pytest.mark.parametrize("tag", TAGS)
def test_init_from_computes_transformers_logits(loaded, hf_families, tag):
    m, model, line = loaded[tag]
    assert (m.head_dim, m.n_heads, m.n_kv_heads, m.qk_norm, m.sliding_window) == (
        16, 4, 2, True, 8)
    gemma = tag.startswith("gemma3")
    assert (m.sandwich_norm, m.scale_embeddings, m.norm_weight_offset) == (
        (True, True, 1.0) if gemma else (False, False, 0.0))
    ids = _ids()
    delta = (our_logits(model, m, ids) - auto_logits(hf_families[tag], ids)).abs().max()
    print(f"in {tag}: max|ours - transformers| = {delta:.2e}")  # pytest -s shows it
    assert delta <= 1e-4
    assert ("ignoring the" in line and "vision tower" in line) == (tag == "gemma3-vision"), line


def test_both_gemma3_conditional_generation_layouts_load_the_same_weights(
        loaded, hf_families, tmp_path):
    """transformers 5 saves `language_model.model.*` (the hub's layout) but holds
    `model.language_model.*` in memory; a checkpoint saved so loads the same tensors."""
    from safetensors.torch import load_file, save_file

    src = hf_families["gemma3-vision"]
    renamed = {("model." + k[len("language_model."):].replace("model.", "language_model.", 1)
                if k.startswith("language_model.model.") else "model." + k): v
               for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    (tmp_path / "src").mkdir()
    save_file(renamed, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "src" / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    _, model, line = load(str(tmp_path / "src"))
    assert "vision tower" in line
    theirs = loaded["gemma3-vision"][1].state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def train_one_step(tmp_path, init_from: str) -> str:
    """One trainer step at lr 1e-12 in this process from `init_from`; returns the run dir."""
    cfg = cli.precheck([*ARGS, "train.steps=1", "optim.lr=1e-12", f"model.init_from={init_from}",
                        f"data.cache_dir={tmp_path / 'cache'}"])
    run = str(tmp_path / "run")
    Trainer(cfg, run, cpu_dims()).fit()
    return run


# Every config field transformers reads for each family's architecture.
COMMON = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
          "num_hidden_layers", "head_dim", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
          "sliding_window", "layer_types", "rope_parameters", "attention_bias",
          "max_position_embeddings")
FIELDS = {"qwen3": COMMON + ("hidden_act", "use_sliding_window", "max_window_layers"),
          "gemma3": COMMON + ("hidden_activation", "query_pre_attn_scalar",
                              "attn_logit_softcapping", "final_logit_softcapping",
                              "use_bidirectional_attention")}


@pytest.mark.parametrize("tag", ["qwen3", "gemma3"])
def test_export_computes_transformers_logits_and_states_the_architecture(
        hf_families, tmp_path, tag):
    src = hf_families[tag]
    run = train_one_step(tmp_path, src)
    config = export_round_trip(run, tmp_path / "out", _ids(), src)  # logits <= 1e-4, printed
    assert config["architectures"] == [{"qwen3": "Qwen3ForCausalLM",
                                        "gemma3": "Gemma3ForCausalLM"}[tag]]
    a = transformers.AutoConfig.from_pretrained(src)
    b = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert a.model_type == b.model_type
    for key in FIELDS[tag]:  # max_position_embeddings too: Gemma's linear x2 source serves
        #                      256 positions, factor x (256 / factor), not factor x 256
        assert getattr(a, key) == getattr(b, key), (key, getattr(a, key), getattr(b, key))


@pytest.mark.parametrize("override", [dict(query_pre_attn_scalar=16), dict(layer_types=[
    "full_attention"] * 4, sliding_window=None)], ids=["scalar-is-head-dim", "no-window"])
def test_gemma3_variants_round_trip_through_the_config(override):
    """head_dim's and the scalar's 0 (= the default) and a model without sliding layers read
    back from the export's config.json as the same fields."""
    from support.hf import family_config

    hf = family_config("gemma3", **override).to_dict()
    stated, defaults = hf_model_fields(hf)
    m = ModelConfig(**{**stated, **defaults})
    assert m.query_pre_attn_scalar == (0.0 if "query_pre_attn_scalar" in override else 24.0)
    again = hf_config_json(m, 256, "fp32", {})
    assert hf_model_fields(json.loads(json.dumps(again))) == (stated, defaults)


TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
            intermediate_size=96, vocab_size=300)
REFUSED = [  # (config.json, the field the one line names)
    (dict(model_type="gemma3_text", attn_logit_softcapping=50.0), "attn_logit_softcapping=50"),
    (dict(model_type="gemma3_text", final_logit_softcapping=30.0), "final_logit_softcapping=30"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True),
     "use_bidirectional_attention=true"),
    (dict(model_type="gemma3_text", attention_bias=True), "attention_bias=true"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias=true"),
    (dict(model_type="gemma3", text_config=dict(attn_logit_softcapping=50.0)),
     "text_config.attn_logit_softcapping=50"),
    (dict(model_type="gemma3_text", hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(model_type="gemma3_text", rope_parameters={"sliding_attention": {
        "rope_type": "linear", "factor": 2.0}}), "sliding_attention.rope_type='linear'"),
    (dict(model_type="gemma3_text", rope_parameters={"rope_type": "linear", "factor": 2.0}),
     "rope_parameters must be keyed by layer type"),
    (dict(model_type="gemma3_text", rope_scaling={"type": "linear", "factor": 8.0}),
     "rename the key to rope_type"),
    (dict(model_type="gemma2"), "supported: " + ", ".join(SUPPORTED)),
    # found by the fresh-user pass: transformers would scale by 0^-1/2 / refuses a null width
    (dict(model_type="gemma3_text", query_pre_attn_scalar=0), "query_pre_attn_scalar=0"),
    (dict(model_type="qwen3", head_dim=None), "head_dim=null"),
]


@pytest.mark.parametrize("config,words", REFUSED, ids=[w[:24] for _, w in REFUSED])
def test_what_we_do_not_compute_is_refused_in_one_line(config, words):
    with pytest.raises(ConfigError) as info:
        hf_model_fields({**TEXT, **config}, "src/config.json")
    message = str(info.value)
    assert info.value.key == "model.init_from" and "src/config.json: " in message
    assert words in message and "\n" not in message, message


def test_the_command_line_refuses_softcapping_in_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(
        {**TEXT, "model_type": "gemma3_text", "attn_logit_softcapping": 50.0}))
    (tmp_path / "src" / "model.safetensors").write_bytes(b"")  # the pre-check reads no weights
    done = run_train([*ARGS, f"model.init_from={tmp_path / 'src'}",
                      f"hydra.run.dir={tmp_path / 'run'}"])
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: model.init_from: ") and "attn_logit_softcapping" in err, err


def test_a_sparse_hub_text_config_reads_as_transformers_fills_it():
    """google/gemma-3-4b's text_config states five keys; the rest is Gemma3TextConfig's."""
    text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024)
    theirs = transformers.Gemma3Config(text_config=dict(text)).text_config
    stated, _ = hf_model_fields({"model_type": "gemma3", "text_config": text})
    assert (stated["n_heads"], stated["n_kv_heads"], stated["vocab_size"]) == (
        theirs.num_attention_heads, theirs.num_key_value_heads, theirs.vocab_size)
    assert stated["head_dim"] == theirs.head_dim and stated["query_pre_attn_scalar"] == 0.0
    assert stated["sliding_window"] == theirs.sliding_window
    assert stated["layer_types"] == theirs.layer_types and stated["tie_embeddings"]
    full, local = theirs.rope_parameters["full_attention"], theirs.rope_parameters[
        "sliding_attention"]
    assert (stated["rope_scaling"], stated["rope_factor"], stated["rope_theta"]) == (
        full["rope_type"], full["factor"], full["rope_theta"])
    assert stated["rope_local_theta"] == local["rope_theta"] and local["rope_type"] == "default"
    defaults = transformers.Gemma3TextConfig()
    assert {k: getattr(defaults, k) for k in GEMMA3_TEXT_DEFAULTS} == GEMMA3_TEXT_DEFAULTS


@pytest.mark.parametrize("config", [
    dict(model_type="qwen3"), dict(model_type="qwen3", head_dim=16),
    dict(model_type="llama", head_dim=32), dict(model_type="mistral", head_dim=16),
    dict(model_type="qwen2", head_dim=32)], ids=["qwen3-128", "qwen3-16", "llama", "mistral",
                                                 "qwen2"])
def test_head_dim_is_what_transformers_reads(config):
    """Qwen3's default is 128, not hidden / heads; every family honours a stated head_dim;
    one equal to hidden / heads is stated as 0 (the run identity of older runs stays)."""
    stated, _ = hf_model_fields({**TEXT, **config})
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{**TEXT, **config}))
    theirs = model.model.layers[0].self_attn.head_dim
    assert (stated["head_dim"] or TEXT["hidden_size"] // TEXT["num_attention_heads"]) == theirs
    assert stated["head_dim"] == (0 if theirs * 4 == 64 else theirs)


@pytest.mark.parametrize("switches,key", [
    (dict(sandwich_norm=True), "model.qk_norm"),
    (dict(qk_norm=True, sandwich_norm=True, norm_weight_offset=1.0, scale_embeddings=True),
     "model.mlp_activation"),
    (dict(query_pre_attn_scalar=24.0), "model.query_pre_attn_scalar"),
    (dict(qk_norm=True, qkv_bias=True), "model.qk_norm"),
    (dict(rope_local_theta=500.0, sliding_window=8), "model.rope_local_theta")],
    ids=["sandwich-alone", "gemma-silu", "scalar", "qk-norm-bias", "local-theta"])
def test_a_mix_no_transformers_class_computes_is_not_exported(switches, key):
    with pytest.raises(ConfigError) as info:
        hf_config_json(ModelConfig(**switches), 256, "fp32", {})
    assert info.value.key == key and "no transformers class computes" in str(info.value)


def test_rope_notes_name_a_changed_local_base(hf_families, loaded):
    import dataclasses

    m = loaded["gemma3"][0]
    assert rope_notes(hf_families["gemma3"], m) == []
    notes = rope_notes(hf_families["gemma3"], dataclasses.replace(m, rope_local_theta=2e4))
    assert notes == ["model.rope_local_theta: 20000.0 (the source was trained with 10000.0)"]
