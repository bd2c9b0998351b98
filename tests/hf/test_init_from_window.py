"""Sliding-window models in from and out to Hugging Face (issue 20 §5).

- Import: Mistral's `sliding_window` and Qwen2's `use_sliding_window` + `max_window_layers` (or
  `layer_types`) become `model.sliding_window` / `model.layer_types` as transformers 5 reads
  them; the loaded model's loss and logits equal transformers' on the source (fp32) at
  `data.seq_len=32`, four times the window, where the window changes the function.
- Round trip: init_from -> one trainer step at lr 1e-12 -> export (fp32) ->
  `AutoModelForCausalLM.from_pretrained` (no warning, no missing key) computes our logits
  (<= 1e-4) and the source's, as the same model_type. Under sp=2:
  tests/hf/test_init_from_layouts.py (its 2-rank spawn).
- Export of a run from scratch (large init: a dropped window moves the logits by 6 to 13): a
  mix goes out as Ministral, an all-sliding model as Mistral, one with q/k/v biases as Qwen2
  (sliding, sliding, full: `max_window_layers` cannot say it, `layer_types` does); each loads
  back through `model.init_from` with the same window.
- The config.json cases transformers ignores or cannot run are refused in one line.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from support.common import SMALL, cpu_dims
from support.hf import WINDOW, auto_logits, export_round_trip
from ulysses_train.cli import compose as cli
from ulysses_train.config.errors import ConfigError
from ulysses_train.hf.config import hf_model_fields
from ulysses_train.hf.init_from import load_initial_weights
from ulysses_train.model import GPT
from ulysses_train.parallel.parallelize import build_model
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SEQ = 32  # 4 windows
ARGS = [a for a in SMALL if not a.startswith(("model.", "data.seq_len"))] + [
    f"data.seq_len={SEQ}"]
MIXED = ["full_attention", "sliding_attention", "sliding_attention"]


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(5))


EXPECTED = {"mistral": (WINDOW, [], False), "qwen2": (WINDOW, MIXED, True),
            "qwen2-mwl": (WINDOW, MIXED, True)}


@pytest.mark.parametrize("tag", list(EXPECTED))
def test_import_maps_the_window_and_computes_transformers_loss(hf_windowed, tag):
    cfg = cli.precheck([*ARGS, f"model.init_from={hf_windowed[tag]}"])
    m = cfg.model
    assert (m.sliding_window, list(m.layer_types), m.qkv_bias) == EXPECTED[tag]
    model = build_model(cfg, cpu_dims())
    load_initial_weights(model, hf_windowed[tag], m, cpu_dims())
    ids = _ids(m.vocab_size)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        loss_sum, n = model(ids, pos, labels)
        ours = model(ids, pos)[..., :m.vocab_size]
    theirs = auto_logits(hf_windowed[tag], ids)
    import transformers

    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_windowed[tag],
                                                               dtype=torch.float32)
        hf_loss = hf.eval()(input_ids=ids, labels=ids).loss.item()
    loss = (loss_sum / n).item()
    print(f"import {tag}: loss ours {loss:.6f} transformers {hf_loss:.6f}, "
          f"max|logits delta| {(ours - theirs).abs().max():.2e}")
    assert loss == pytest.approx(hf_loss, rel=1e-5)
    assert (ours - theirs).abs().max() <= 1e-4
    # the window matters at this length: the same weights without it compute another function
    full = GPT(dataclasses.replace(m, sliding_window=0, layer_types=[]))
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (full(ids, pos)[..., :m.vocab_size] - theirs).abs().max() > 1e-2


def train_one_step(tmp_path, name: str, *overrides) -> str:
    """One trainer step at lr 1e-12 in this process; returns the run dir."""
    cfg = cli.precheck([*ARGS, "train.steps=1", "optim.lr=1e-12",
                        f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    run = str(tmp_path / name)
    Trainer(cfg, run, cpu_dims()).fit()
    return run


@pytest.mark.parametrize("tag", ["mistral", "qwen2-mwl"])
def test_init_from_one_step_export_computes_transformers_logits(hf_windowed, tmp_path, tag):
    run = train_one_step(tmp_path, "run", f"model.init_from={hf_windowed[tag]}")
    config = export_round_trip(run, tmp_path / "out", _ids(300), hf_windowed[tag])
    assert config["model_type"] == tag.split("-")[0] and config["sliding_window"] == WINDOW
    if tag == "qwen2-mwl":
        assert config["use_sliding_window"] and config["max_window_layers"] == 1
        assert config["layer_types"] == MIXED
    else:
        assert "layer_types" not in config  # MistralConfig warns about it


LOCAL_FIRST = ["sliding_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("types,bias,model_type", [
    (MIXED, False, "ministral"), ([], False, "mistral"), (LOCAL_FIRST, True, "qwen2")],
    ids=["mixed", "all-sliding", "qwen2-local-first"])
def test_export_of_a_windowed_run_from_scratch_loads_back(tmp_path, types, bias, model_type):
    layers = f"model.layer_types=[{','.join(types)}]"
    model = [a for a in SMALL if a.startswith("model.") and "n_layers" not in a]
    run = train_one_step(tmp_path, "run", *model, "model.n_layers=3", "model.vocab_size=300",
                         f"model.sliding_window={WINDOW}", layers, f"++model.qkv_bias={bias}",
                         "model.init_std=0.3")  # large weights: the window shows
    config = export_round_trip(run, tmp_path / "out", _ids(300))
    assert config["model_type"] == model_type and config["sliding_window"] == WINDOW
    m = cli.precheck([*ARGS, f"model.init_from={tmp_path / 'out'}"]).model
    assert (m.sliding_window, list(m.layer_types), m.qkv_bias) == (WINDOW, types, bias)


TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
            intermediate_size=96, vocab_size=300)
REFUSED = [  # (config.json, words of the one-line error)
    (dict(model_type="llama", sliding_window=8), "LlamaForCausalLM ignores"),
    (dict(model_type="mistral", sliding_window=8, layer_types=MIXED), "set model_type to "
                                                                        "ministral"),
    (dict(model_type="qwen2", layer_types=MIXED), "use_sliding_window=false"),
    (dict(model_type="ministral", sliding_window=None, layer_types=MIXED), "sliding_window=null"),
    (dict(model_type="mistral", sliding_window=0), "sliding_window=0 is not a positive"),
    (dict(model_type="ministral", sliding_window=8, layer_types=MIXED[:2]), "has 2 entries"),
    (dict(model_type="ministral", sliding_window=8, layer_types=["chunked_attention"] * 3),
     "['chunked_attention'] are not supported"),
]


@pytest.mark.parametrize("config,words", REFUSED, ids=[w[:20] for _, w in REFUSED])
def test_window_transformers_would_not_run_is_refused_in_one_line(tmp_path, config, words):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({**TINY, **config}))
    (tmp_path / "src" / "model.safetensors").write_bytes(b"")  # the pre-check reads no weights
    with pytest.raises(ConfigError) as info:
        cli.precheck([*ARGS, f"model.init_from={tmp_path / 'src'}"])
    assert info.value.key == "model.init_from" and words in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("config,want", [
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8), (0, [])),  # mwl 28
    (dict(model_type="qwen2", sliding_window=8, max_window_layers=0), (0, [])),  # not used
    (dict(model_type="qwen2", use_sliding_window=True, max_window_layers=2),
     (4096, MIXED[:1] * 2 + MIXED[1:2])),  # the default window
    (dict(model_type="mistral"), (4096, [])), (dict(model_type="mistral", sliding_window=None),
                                               (0, [])),
    (dict(model_type="ministral", sliding_window=8), (8, [])),
    (dict(model_type="ministral", sliding_window=8, layer_types=["attention"] + MIXED[1:]),
     (8, MIXED)),  # transformers' legacy name
], ids=["qwen2-mwl28", "qwen2-off", "qwen2-default", "mistral-default", "mistral-null",
        "ministral-all", "ministral-legacy"])
def test_what_transformers_derives_is_what_we_train(config, want):
    stated, _ = hf_model_fields({**TINY, **config})
    assert (stated["sliding_window"], stated["layer_types"]) == want


def test_an_override_of_the_stated_window_is_an_error(hf_windowed):
    src = f"model.init_from={hf_windowed['qwen2']}"
    for override, key in (("model.sliding_window=4", "model.sliding_window"),
                          ("model.layer_types=[full_attention,full_attention,sliding_attention]",
                           "model.layer_types")):
        with pytest.raises(ConfigError) as info:
            cli.precheck([*ARGS, src, override])
        assert info.value.key == key and "the weights were trained with that value" in str(
            info.value)
    m = cli.precheck([*ARGS, src, f"model.sliding_window={WINDOW}"]).model  # the same: fine
    assert m.sliding_window == WINDOW
