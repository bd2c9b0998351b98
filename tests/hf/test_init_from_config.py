"""`model.init_from`, config side: config.json (or our meta.json) decides model.*; explicit
command-line values that disagree, and what we cannot compute, are one-line errors.

config.json files are written by transformers' own `save_pretrained` (transformers 5 spelling,
`rope_parameters`) or by hand in the older spelling (`rope_scaling` + top-level `rope_theta`).
"""
import json
import os

import pytest
import transformers  # noqa: E402  (a dev dependency: missing = a failure, not a skip)

from support.common import SMALL, run_train
from ulysses_train.cli import compose as cli
from ulysses_train.config.errors import ConfigError
from ulysses_train.hf.config import apply_init_from, explicit_model_keys, rope_notes

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
            intermediate_size=96, vocab_size=300, rms_norm_eps=1e-5, max_position_embeddings=512)
ARGS = [a for a in SMALL if not a.startswith("model.")]  # the architecture comes from init_from


def hf_dir(tmp_path, name="tiny-llama", model_type="llama", **kw) -> str:
    """A model dir as transformers' `save_pretrained` writes it for `model_type` (config.json
    and random weights: model.init_from loads both)."""
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[model_type]
    path = str(tmp_path / name)
    transformers.AutoModelForCausalLM.from_config(cls(**{**TINY, **kw})).save_pretrained(path)
    return path


def raw_dir(tmp_path, config: dict, name="raw") -> str:
    """A model dir with a hand-written config.json (older spellings, odd settings), plus the
    weights transformers makes for it where it can build the model."""
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    try:
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(path))
    except Exception:  # a config transformers refuses too: the test is about its refusal
        return str(path)
    model.save_pretrained(tmp_path / f"{name}-weights")  # would rewrite config.json: elsewhere
    os.replace(tmp_path / f"{name}-weights" / "model.safetensors", path / "model.safetensors")
    return str(path)


def precheck(*args):
    return cli.precheck([*ARGS, *args])


def test_llama_config_json_fills_the_model_and_names_the_run(tmp_path):
    path = hf_dir(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    m = precheck(f"model.init_from={path}", "model=llama3_8b").model  # preset overridden
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.ffn_hidden) == (3, 64, 4, 2, 96)
    assert (m.vocab_size, m.norm_eps, m.rope_theta) == (300, 1e-5, 5e5)  # vocab unpadded
    assert (m.tie_embeddings, m.qkv_bias, m.rope_scaling) == (False, False, "none")
    assert m.rope_original_seq_len == 512  # the pretraining context, for a later extension
    assert m.name == "tiny-llama"
    run_dir = cli.run_dir_for([*ARGS, f"model.init_from={path}"])
    assert os.path.basename(run_dir).startswith("tiny-llama-synthetic-")


def test_older_spelling_rope_scaling_and_top_level_theta(tmp_path):
    config = {"model_type": "llama", **TINY, "rope_theta": 250000.0, "tie_word_embeddings": True,
              "rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 16}}
    m = precheck(f"model.init_from={raw_dir(tmp_path, config)}").model
    assert (m.rope_theta, m.rope_scaling, m.rope_factor) == (250000.0, "yarn", 4.0)
    # original_max_position_embeddings missing: max_position_embeddings, as in transformers
    assert (m.rope_original_seq_len, m.rope_beta_fast, m.rope_beta_slow) == (512, 16.0, 1.0)
    assert (m.rope_attention_factor, m.rope_truncate, m.tie_embeddings) == (None, True, True)


@pytest.mark.parametrize("rope,expected", [
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 128},
     dict(rope_scaling="llama3", rope_factor=8.0, rope_original_seq_len=128,
          rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256,
      "attention_factor": 1.1, "mscale": 0.7, "mscale_all_dim": 0.9, "truncate": False},
     dict(rope_scaling="yarn", rope_factor=2.0, rope_original_seq_len=256,
          rope_attention_factor=1.1, rope_mscale=0.7, rope_mscale_all_dim=0.9,
          rope_truncate=False)),
    ({"rope_type": "linear", "factor": 3.0}, dict(rope_scaling="linear", rope_factor=3.0)),
])
def test_rope_parameters_map_onto_our_keys(tmp_path, rope, expected):
    path = hf_dir(tmp_path, rope_parameters={**rope, "rope_theta": 10000.0})
    m = precheck(f"model.init_from={path}").model
    assert {k: getattr(m, k) for k in expected} == expected


def test_qwen2_has_qkv_biases_and_mistral_keeps_its_window(tmp_path):
    m = precheck(f"model.init_from={hf_dir(tmp_path, 'q', 'qwen2', tie_word_embeddings=True)}").model
    assert m.qkv_bias and m.tie_embeddings and m.name == "q" and m.sliding_window == 0
    m = precheck(f"model.init_from={hf_dir(tmp_path, 'm', 'mistral', sliding_window=32)}").model
    # window 32 == data.seq_len: the same function as none, but stated, so the export keeps it
    # (windows shorter than data.seq_len: tests/hf/test_init_from_window.py)
    assert not m.qkv_bias and m.n_layers == 3 and (m.sliding_window, m.layer_types) == (32, [])


def test_context_extension_keys_are_free_when_config_json_has_no_scaling(tmp_path):
    m = precheck(f"model.init_from={hf_dir(tmp_path)}", "model.rope_scaling=yarn",
                 "model.rope_factor=4", "model.n_layers=3").model  # equal explicit value: fine
    assert (m.rope_scaling, m.rope_factor, m.rope_original_seq_len) == ("yarn", 4.0, 512)
    m = precheck(f"model.init_from={hf_dir(tmp_path, 'b')}", "model.rope_scaling=yarn",
                 "model.rope_original_seq_len=300").model
    assert m.rope_original_seq_len == 300


@pytest.mark.parametrize("override,key", [
    ("model.n_layers=2", "model.n_layers"), ("model.vocab_size=256", "model.vocab_size"),
    ("model.tie_embeddings=true", "model.tie_embeddings"), ("++model.qkv_bias=true",
                                                             "model.qkv_bias"),
    ("model.ffn_hidden=128", "model.ffn_hidden"), ("model.norm_eps=1e-6", "model.norm_eps"),
])
def test_explicit_value_that_disagrees_is_an_error_naming_it(tmp_path, override, key):
    with pytest.raises(ConfigError) as info:
        precheck(f"model.init_from={hf_dir(tmp_path)}", override)
    assert info.value.key == key and "model.init_from=" in str(info.value)


def test_stated_rope_scaling_is_where_a_further_extension_starts(tmp_path):
    """A model already scaled (Llama 3.1: llama3 x8) can be extended further: the RoPE keys
    of config.json are defaults an override changes (rope_theta too: adjusted base frequency,
    tests/hf/test_export_source.py)."""
    path = hf_dir(tmp_path, rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 128,
                                             "rope_theta": 1e4})
    m = precheck(f"model.init_from={path}", "model.rope_factor=16").model
    assert (m.rope_scaling, m.rope_factor, m.rope_original_seq_len) == ("llama3", 16.0, 128)
    m = precheck(f"model.init_from={path}").model
    assert (m.rope_scaling, m.rope_factor) == ("llama3", 8.0)  # unchanged without an override


REFUSED = [  # (config.json changes, words the one-line error must contain)
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "inference-only"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}),
     "rope_type 'longrope' is not supported"),
    (dict(num_hidden_layers=None), "missing 'num_hidden_layers'"),
]


@pytest.mark.parametrize("change,words", REFUSED, ids=[w[:24] for _, w in REFUSED])
def test_unsupported_config_json_is_refused_in_one_line(tmp_path, change, words):
    config = {"model_type": "llama", **TINY, **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        precheck(f"model.init_from={raw_dir(tmp_path, config)}")
    assert info.value.key == "model.init_from" and words in str(info.value)
    assert "\n" not in str(info.value)


def _our_step(tmp_path, **model) -> str:
    """A one-step run of ours (stage 1) whose checkpoints/latest names step_00000001."""
    from support.common import cpu_dims
    from ulysses_train.train.trainer import Trainer

    overrides = [f"model.{k}={v}" for k, v in model.items()]
    cfg = precheck(*overrides, "model.name=stage1-model", "train.steps=1",
                   f"data.cache_dir={tmp_path / 'cache'}")
    Trainer(cfg, str(tmp_path / "stage1"), cpu_dims()).fit()
    return str(tmp_path / "stage1" / "checkpoints" / "step_00000001")


def test_our_checkpoint_decides_the_architecture_rope_stays_free(tmp_path):
    step = _our_step(tmp_path, n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                     vocab_size=300, rope_scaling="yarn", rope_factor=2.0, qkv_bias=True)
    for source in (step, str(tmp_path / "stage1")):  # a step dir, or a run dir's latest
        m = precheck(f"model.init_from={source}", "model.rope_factor=4").model
        assert (m.n_layers, m.vocab_size, m.qkv_bias, m.name) == (3, 300, True, "stage1-model")
        assert (m.rope_scaling, m.rope_factor) == ("yarn", 4.0)  # a new stage may extend further
    with pytest.raises(ConfigError) as info:
        precheck(f"model.init_from={step}", "model.d_model=128")
    assert info.value.key == "model.d_model"
    os.remove(tmp_path / "stage1" / "checkpoints" / "latest")
    with pytest.raises(ConfigError, match="without checkpoints/latest"):
        precheck(f"model.init_from={tmp_path / 'stage1'}")
    with pytest.raises(ConfigError, match="neither a Hugging Face model directory"):
        precheck(f"model.init_from={tmp_path}")
    with pytest.raises(ConfigError, match="does not exist"):
        precheck(f"model.init_from={tmp_path / 'nope'}")


def test_a_new_stage_from_our_checkpoint_may_change_the_window(tmp_path):
    """Found by a fresh-user pass: resume refused a wider window and advised a new run with
    model.init_from=<step>, which then refused it too ('the weights were trained with that
    value'). The window only changes what the weights compute (a FUNCTION key): a new stage may
    change it, and the trainer says so."""
    types = "[sliding_attention,sliding_attention,full_attention]"
    step = _our_step(tmp_path, n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                     sliding_window=8, layer_types=types)
    m = precheck(f"model.init_from={step}", "model.sliding_window=16").model
    assert (m.sliding_window, m.layer_types[2]) == (16, "full_attention")
    m = precheck(f"model.init_from={step}", "model.sliding_window=16",
                 f"model.layer_types={types.replace('full', 'sliding')}").model
    assert m.layer_types == ["sliding_attention"] * 3
    assert "model.sliding_window: 16 (the source was trained with 8)" in rope_notes(step, m)


def test_explicit_keys_and_no_init_from_changes_nothing():
    assert explicit_model_keys(["model=tiny", "model.n_layers=2", "++model.qkv_bias=true",
                                "+model.x=1", "data.seq_len=8"]) == {"n_layers", "qkv_bias", "x"}
    cfg = cli.precheck(ARGS)
    assert apply_init_from(cfg, {"n_layers"}) is cfg


def test_train_py_builds_the_model_config_json_describes(tmp_path):
    """train.py's main applies the same mapping as the pre-check (meta.json records it)."""
    path = hf_dir(tmp_path, rope_parameters={"rope_type": "llama3", "factor": 4.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64,
                                             "rope_theta": 10000.0})
    run = tmp_path / "run"
    args = [*ARGS, f"model.init_from={path}", "train.steps=1", f"hydra.run.dir={run}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(run / "checkpoints" / "step_00000001" / "meta.json") as f:
        saved = json.load(f)["model"]
    assert (saved["n_layers"], saved["vocab_size"], saved["rope_scaling"]) == (3, 300, "llama3")
    assert (saved["name"], saved["rope_original_seq_len"]) == ("tiny-llama", 64)
