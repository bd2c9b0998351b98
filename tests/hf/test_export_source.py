"""What the export keeps of `model.init_from`'s Hugging Face source (issue 19, items 2, 3, 6):
its generation_config.json and special-token ids (lists too) through training, through a second
stage from our step dir and with the source gone; a max_position_embeddings never below the
source's and, with RoPE scaling, the factor x original transformers reads (loaded without a
warning, our logits); a raised rope_theta (ABF) accepted, logged and exported.

Tiny models trained one step in this process on data=synthetic (no tokenizer: the source's ids
stay); a run tokenizer is put in place by hand where the test is about it.
"""
import json
import os
import shutil

import pytest
import torch
import transformers  # noqa: E402  (a dev dependency: missing = a failure, not a skip)

from support.common import SMALL, cpu_dims
from support.hf import TransformersWarnings
from ulysses_train.cli import compose as cli
from ulysses_train.cli.export import main as export_main
from ulysses_train.config.errors import ConfigError
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ARGS = [a for a in SMALL if not a.startswith(("model.", "data.seq_len"))]
ARCH = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=96, vocab_size=200, rms_norm_eps=1e-5)
GENERATION = {"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": 3, "do_sample": True,
              "temperature": 0.6, "top_p": 0.9}


def hf_source(path, generation: dict | None = None, **config) -> str:
    """A tiny Llama saved by transformers into `path` (config.json with bos 0, eos [1, 2],
    pad 3 unless `config` says otherwise), and `generation` as its generation_config.json."""
    c = transformers.LlamaConfig(**{**ARCH, "bos_token_id": 0, "eos_token_id": [1, 2],
                                    "pad_token_id": 3, **config})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(c).save_pretrained(path)
    gen = os.path.join(path, "generation_config.json")
    if generation is None:
        os.remove(gen)
    else:
        with open(gen, "w") as f:
            json.dump(generation, f)
    return str(path)


def train(tmp_path, name, *overrides, seq_len=32) -> str:
    """A one-step run `tmp_path/name` composed as train.py composes it; returns the run dir."""
    cfg = cli.precheck([*ARGS, f"data.seq_len={seq_len}", "train.steps=1",
                        f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    run = tmp_path / name
    Trainer(cfg, str(run), cpu_dims()).fit()
    return str(run)


def export(run, out) -> dict:
    """Export `run` (fp32) into `out`; return {file name: JSON} of its two config files, each
    loaded by transformers without a warning."""
    assert export_main([str(run), str(out), "--dtype", "fp32"]) == 0
    with TransformersWarnings() as said:
        transformers.AutoConfig.from_pretrained(out)
        transformers.GenerationConfig.from_pretrained(out)
    assert not said.messages, said.messages
    return {n: json.loads((out / n).read_text()) for n in ("config.json", "generation_config.json")}


def ids(config: dict) -> tuple:
    return tuple(config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))


def test_generation_config_survives_init_from_training_and_a_second_stage(tmp_path):
    """Catches: the export wrote {bos 0, eos 1} from scratch, so generate() never stopped at
    the end-of-turn id 2, and temperature / top_p were lost."""
    src = hf_source(tmp_path / "src", GENERATION)
    stage1 = train(tmp_path, "stage1", f"model.init_from={src}")
    shutil.rmtree(src)  # the run recorded what the export needs: the source may go
    first = export(stage1, tmp_path / "out1")
    assert first["generation_config.json"] == GENERATION
    assert ids(first["config.json"]) == (0, [1, 2], 3)
    stage2 = train(tmp_path, "stage2", f"model.init_from={stage1}/checkpoints/step_00000001")
    second = export(stage2, tmp_path / "out2")
    assert second == first


def test_without_generation_config_the_source_ids_make_one(tmp_path):
    src = hf_source(tmp_path / "src", None, eos_token_id=[1, 2, 5])
    out = export(train(tmp_path, "run", f"model.init_from={src}"), tmp_path / "out")
    assert ids(out["config.json"]) == ids(out["generation_config.json"]) == (0, [1, 2, 5], 3)


def _run_tokenizer(run, bos, eos):
    """Put a tokenizer whose BOS/EOS ids are `bos`/`eos` into `run`/tokenizer (the copy the run
    would have saved had it trained on text with it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = {"<unk>": 9, "a": 10, "<s>": bos, "</s>": eos}
    tok = Tokenizer(models.WordLevel(names, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(os.path.join(run, "tokenizer"))
    tok.save(os.path.join(run, "tokenizer", "tokenizer.json"))
    with open(os.path.join(run, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def test_the_run_tokenizer_wins_only_where_it_changed_the_ids(tmp_path):
    src = hf_source(tmp_path / "src", GENERATION)
    run = train(tmp_path, "run", f"model.init_from={src}")
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(run, same)
    shutil.copytree(run, other)
    _run_tokenizer(same, bos=0, eos=2)  # the source's tokenizer: eos 2 is one of [1, 2]
    out = export(same, tmp_path / "out_same")
    assert out["generation_config.json"] == GENERATION and ids(out["config.json"]) == (0, [1, 2], 3)
    _run_tokenizer(other, bos=4, eos=5)  # data.tokenizer_path=another tokenizer
    out = export(other, tmp_path / "out_other")
    assert ids(out["config.json"]) == ids(out["generation_config.json"]) == (4, 5, 3)
    assert (out["generation_config.json"]["temperature"],
            out["generation_config.json"]["top_p"]) == (0.6, 0.9)


def test_max_position_embeddings_is_never_below_the_source(tmp_path):
    """Catches: a source with 512 trained at 64 tokens exported 64 (serving engines cap the
    context there); a run from scratch keeps its trained length."""
    src = hf_source(tmp_path / "src", GENERATION, max_position_embeddings=512)
    run = train(tmp_path, "run", f"model.init_from={src}", seq_len=64)
    assert export(run, tmp_path / "out")["config.json"]["max_position_embeddings"] == 512
    scratch = train(tmp_path, "scratch", *[a for a in SMALL if a.startswith("model.")],
                    seq_len=64)
    assert export(scratch, tmp_path / "out2")["config.json"]["max_position_embeddings"] == 64


@pytest.mark.parametrize("source_scaling", [False, True], ids=["added-yarn", "source-yarn"])
def test_yarn_export_is_factor_times_original_and_loads_without_warnings(tmp_path, capsys,
                                                                        source_scaling):
    """Catches: YaRN x4 over 32 trained at 64 exported max_position_embeddings 64, which
    transformers 5 warns about and transformers <= 4.55 reads as factor 64 / 32 = 2."""
    from test_export import check_logits

    if source_scaling:  # the source already states it (max_position_embeddings 4 x 32)
        src = hf_source(tmp_path / "src", GENERATION, max_position_embeddings=128,
                        rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 32,
                                         "rope_theta": 10000.0})
        extend = []
    else:  # a 32-token source extended here
        src = hf_source(tmp_path / "src", GENERATION, max_position_embeddings=32)
        extend = ["model.rope_scaling=yarn", "model.rope_factor=4"]
    run = train(tmp_path, "run", f"model.init_from={src}", *extend, seq_len=64)
    extension = "model.rope_scaling: yarn x4 over 32 (the source was trained with none: " \
                "context extension)"  # logged when the scaling was added here
    assert (extension in capsys.readouterr().out) != source_scaling
    config = export(run, tmp_path / "out")["config.json"]
    assert config["max_position_embeddings"] == 128
    assert config["rope_scaling"]["original_max_position_embeddings"] == 32
    assert config["rope_scaling"]["factor"] == 4.0
    check_logits(run, tmp_path / "out", "yarn x4 over 32")  # loads warning-free, our logits


def test_yarn_shorter_than_the_source_is_refused(tmp_path):
    """factor x original below the source's context cannot be written consistently (yarn reads
    its factor from max_position_embeddings): one line before any work."""
    src = hf_source(tmp_path / "src", GENERATION, max_position_embeddings=512)
    with pytest.raises(ConfigError) as info:
        cli.precheck([*ARGS, f"model.init_from={src}", "model.rope_scaling=yarn",
                      "model.rope_factor=2", "model.rope_original_seq_len=64"])
    assert info.value.key == "model.rope_factor" and "512" in str(info.value)


def test_a_resume_with_a_shorter_yarn_is_refused_as_the_rope_change_it_is(tmp_path):
    """Catches (fresh-user pass): resuming a yarn x8 run with x2 was refused by the export-context
    check against the *source's* context, advising a factor the resume check then refused too;
    the refusal that applies is resume's (another rope_factor than the checkpoint's)."""
    src = hf_source(tmp_path / "src", GENERATION, max_position_embeddings=512)
    yarn = [f"model.init_from={src}", "model.rope_scaling=yarn", "model.rope_original_seq_len=64"]
    run = train(tmp_path, "run", *yarn, "model.rope_factor=8")
    with pytest.raises(ConfigError) as info:
        cli.precheck([*ARGS, "data.seq_len=32", "train.steps=1", *yarn, "model.rope_factor=2",
                      f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"])
    assert info.value.key == "model.rope_factor", str(info.value)
    assert "rope_factor=8.0 (this run: 2.0)" in str(info.value) and "model.init_from=" in str(
        info.value)


def test_raised_rope_theta_from_an_hf_dir_is_accepted_logged_and_exported(tmp_path, capsys):
    """Catches: model.rope_theta=500000 from an HF dir was refused ("drop the override"), while
    adjusted base frequency is how Code Llama, Llama 3 and Qwen extended their context."""
    src = hf_source(tmp_path / "src", GENERATION)
    run = train(tmp_path, "run", f"model.init_from={src}", "model.rope_theta=500000")
    log = capsys.readouterr().out
    assert "model.rope_theta: 500000 (the source was trained with 10000: adjusted base " \
           "frequency)" in log, log
    config = export(run, tmp_path / "out")["config.json"]
    assert config["rope_theta"] == 500000.0


def test_static_ntk_from_an_hf_dir_says_at_the_start_that_it_cannot_be_exported(tmp_path,
                                                                                capsys):
    """Found by a fresh-user pass: ntk trained without a word and only the export refused it."""
    src = hf_source(tmp_path / "src", GENERATION)
    train(tmp_path, "run", f"model.init_from={src}", "model.rope_scaling=ntk",
          "model.rope_factor=4")
    log = capsys.readouterr().out
    assert "model.rope_scaling: static ntk has no transformers rope_type, so this run cannot " \
           "be exported" in log, log


def test_eval_says_and_records_a_rope_override(tmp_path, capsys):
    """Found by a fresh-user pass: eval of an HF dir with model.rope_theta=500000 changed the
    loss but neither logged it (training does) nor recorded it in eval.json."""
    from ulysses_train.evaluate.run import run as evaluate

    src = hf_source(tmp_path / "src", GENERATION)
    cfg = cli.precheck([*ARGS, "data.seq_len=32", f"data.cache_dir={tmp_path / 'cache'}",
                        f"model.init_from={src}", "model.rope_theta=500000", "eval.batches=1",
                        "eval.passkey_lengths=[]"])
    assert evaluate(cfg, str(tmp_path / "ev")) == 0
    assert "eval: model.rope_theta: 500000 (the source was trained with 10000" in \
        capsys.readouterr().out
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["rope"] == {"theta": 500000.0, "scaling": "none"}


def test_an_unreadable_generation_config_is_one_line_before_any_work(tmp_path):
    src = hf_source(tmp_path / "src", GENERATION)
    (tmp_path / "src" / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError) as info:
        cli.precheck([*ARGS, f"model.init_from={src}"])
    assert info.value.key == "model.init_from" and "generation_config.json" in str(info.value)
    assert "\n" not in str(info.value)
