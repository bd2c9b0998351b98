"""`python -m ulysses_train.export`: transformers loads the exported dir with no missing or
unexpected keys and computes our logits (fp32, CPU, max |delta| <= 1e-4) for the default RoPE,
llama3 and yarn, tied and untied, with q/k/v biases (Qwen2), from checkpoints written in one
process, at zero=3 dp=2 and at tp=2; plus its one-line errors, shards, tokenizer files, and the
config.json round trip of an imported model.

Our reference logits come from the checkpoint itself (DCP-loaded into a plain GPT), so every
layout is compared against what it saved.
"""
import json
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers  # noqa: E402  (a dev dependency: missing = a failure, not a skip)

from support.common import SMALL, cpu_dims, flip_byte, run_torchrun, small_config
from support.hf import TransformersWarnings, checkpoint_logits
from ulysses_train.checkpoint.manifest import write_manifest
from ulysses_train.cli import compose as cli
from ulysses_train.cli.export import main as export_main
from ulysses_train.config.schema import ModelConfig
from ulysses_train.model import GPT
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VOCAB = 200  # not a multiple of 128: the export must drop exactly our padding rows
ROPE = {"none": {}, "linear": dict(rope_factor=2.0), "llama3": dict(rope_factor=4.0, rope_original_seq_len=16),
        "yarn": dict(rope_factor=4.0, rope_original_seq_len=16, rope_beta_fast=16.0,
                     rope_attention_factor=1.2)}


def train_one_step(run_dir, **model) -> str:
    """A one-step run in this process (SMALL shapes); returns its run dir."""
    cfg = small_config(model={"vocab_size": VOCAB, **model}, train={"steps": 1})
    cfg.data.cache_dir = os.path.join(os.path.dirname(run_dir), "cache")
    Trainer(cfg, str(run_dir), cpu_dims()).fit()
    return str(run_dir)


def latest_step(run_dir) -> str:
    ckpts = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpts, "latest")) as f:
        return os.path.join(ckpts, f.read().strip())


def hf_logits(out_dir, ids, pos) -> torch.Tensor:
    """transformers' logits of the exported dir, which must load without a warning (a config it
    warns about, e.g. a yarn factor max_position_embeddings contradicts, is a failure)."""
    with TransformersWarnings() as said:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            out_dir, output_loading_info=True, attn_implementation="eager")
    assert not said.messages, said.messages
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys, no errors
    assert model.dtype == torch.float32
    with torch.no_grad():
        return model.eval()(input_ids=ids, position_ids=pos).logits


def export(*args) -> int:
    return export_main([str(a) for a in args])


def check_logits(run_dir, out_dir, tag) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 32), generator=g)
    pos = (torch.arange(32) * 3).expand(2, 32)  # to 93: past the original 16 of the scalings
    diff = (checkpoint_logits(latest_step(run_dir), ids, pos) - hf_logits(out_dir, ids, pos)).abs().max()
    print(f"export {tag}: max|ours - transformers| = {diff:.2e}")  # pytest -s shows it
    assert diff <= 1e-4
    return diff.item()


@pytest.mark.parametrize("rope,tie,qkv_bias", [
    ("none", False, False), ("none", True, False), ("linear", False, False),
    ("llama3", False, False), ("yarn", True, False), ("yarn", False, True)],
    ids=["default-untied", "default-tied", "linear", "llama3-untied", "yarn-tied", "qwen2-yarn"])
def test_transformers_loads_the_export_and_computes_our_logits(tmp_path, rope, tie, qkv_bias):
    run = train_one_step(tmp_path / "run", rope_scaling=rope, tie_embeddings=tie,
                         qkv_bias=qkv_bias, **ROPE[rope])
    out = tmp_path / "hf"
    assert export(run, out, "--dtype", "fp32", "--max-shard-size", "40KB") == 0
    check_logits(run, out, f"{rope} tie={tie} qkv_bias={qkv_bias}")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"]
    # trained at 32 tokens: with scaling, the extended context factor x original (linear x2
    # over the default 8192; llama3 and yarn x4 over 16), which transformers reads consistently
    assert config["vocab_size"] == VOCAB
    assert config["max_position_embeddings"] == {"none": 32, "linear": 16384}.get(rope, 64)
    assert config["tie_word_embeddings"] == tie and config["torch_dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    sizes = [os.path.getsize(out / s) for s in shards]
    # every shard holds at most 40 KB of data, or one bigger tensor (the 200 x 64 embedding)
    assert max(sizes) < VOCAB * 64 * 4 + 2000 and sum(sizes) > index["metadata"]["total_size"]


def test_bf16_export_is_the_cast_checkpoint(tmp_path):
    run = train_one_step(tmp_path / "run")
    out = tmp_path / "hf"
    assert export(run, out) == 0  # default: bf16, one shard
    from safetensors.torch import load_file

    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    state = GPT(ModelConfig(**json.loads(
        open(os.path.join(latest_step(run), "meta.json")).read())["model"])).state_dict()
    dcp.load({"model": state}, checkpoint_id=latest_step(run))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["model.embed_tokens.weight"],
                       state["tok_embeddings.weight"][:VOCAB].bfloat16())
    assert torch.equal(tensors["lm_head.weight"], state["output.weight"][:VOCAB].bfloat16())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """Run dirs of one step at zero=3 over dp=2 and at tp=2 (torchrun, 2 CPU ranks each)."""
    root = tmp_path_factory.mktemp("layouts")
    runs = {}
    for tag, extra in {"zero3-dp2": ["parallel.zero=3", "train.micro_batch_size=1"],
                       "tp2": ["parallel.tp=2"]}.items():
        run = root / tag
        args = [a for a in SMALL if not a.startswith("model.vocab_size")]
        done = run_torchrun(2, [*args, f"model.vocab_size={VOCAB}", "train.steps=1",
                                "model.rope_scaling=yarn", "model.rope_factor=4",
                                "model.rope_original_seq_len=16", *extra,
                                f"hydra.run.dir={run}", f"data.cache_dir={root / 'cache'}"])
        assert done.returncode == 0, done.stderr[-3000:]
        runs[tag] = run
    return runs


@pytest.mark.parametrize("layout", ["zero3-dp2", "tp2"])
def test_export_of_a_sharded_checkpoint(distributed_runs, tmp_path, layout):
    run = distributed_runs[layout]
    assert len(list(latest_step_files(run))) == 2  # really written by two ranks
    assert export(run, tmp_path / "hf", "--dtype", "fp32") == 0
    check_logits(run, tmp_path / "hf", layout)


def latest_step_files(run):
    return (n for n in os.listdir(latest_step(run)) if n.endswith(".distcp"))


def test_one_line_errors(tmp_path, capsys):
    run = train_one_step(tmp_path / "run")
    capsys.readouterr()  # the run's own output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "hf_in").mkdir()
    (tmp_path / "hf_in" / "config.json").write_text("{}")
    cases = [((run, tmp_path / "full"), "error: OUT_DIR: "),
             ((run, tmp_path / "full" / "x" / "sub"), "error: OUT_DIR: cannot create "),  # x: file
             ((tmp_path / "hf_in", tmp_path / "o0"), "error: CHECKPOINT: "),  # HF in, HF out?
             ((tmp_path / "nope", tmp_path / "o1"), "error: CHECKPOINT: "),
             ((tmp_path / "full", tmp_path / "o2"), "error: CHECKPOINT: "),  # not a checkpoint
             ((run, tmp_path / "o3", "--max-shard-size", "lots"), "error: --max-shard-size: ")]
    for args, start in cases:
        assert export(*args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(start) and len(err.splitlines()) == 1, err
        if "hf_in" in str(args[0]):
            assert "is a Hugging Face model directory, not one of our checkpoints" in err, err
        if args[0] == tmp_path / "full":  # export takes no HF dir: "neither" has no "nor"
            assert "is not one of our checkpoints" in err and "neither" not in err, err
        if "sub" in str(args[1]):
            assert "Not a directory" in err and not (tmp_path / "full" / "x").is_dir(), err
    assert export(run, tmp_path / "made" / ("x" * 300)) == 2  # its parent is made, then it fails
    assert "File name too long" in capsys.readouterr().err and not (tmp_path / "made").exists()
    if os.path.isdir("/proc/self"):  # a directory no one can create anything in
        assert export(run, "/proc/ulysses_export_test") == 2
        assert capsys.readouterr().err.startswith("error: OUT_DIR: cannot create /proc/")
    meta_path = os.path.join(latest_step(run), "meta.json")
    meta = json.loads(open(meta_path).read())
    meta["model"]["rope_scaling"] = "ntk"
    open(meta_path, "w").write(json.dumps(meta))
    write_manifest(latest_step(run))  # a checkpoint saved so, not a damaged one
    assert export(run, tmp_path / "o4") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.rope_scaling: static ntk") and "rope_scaling=yarn" in err
    assert not (tmp_path / "o4").exists()  # refused before anything is written
    os.remove(os.path.join(run, "checkpoints", "latest"))
    assert export(run, tmp_path / "o5") == 2
    assert "without checkpoints/latest" in capsys.readouterr().err
    assert export(os.path.join(run, "checkpoints"), tmp_path / "o6") == 2
    err = capsys.readouterr().err
    assert "is a checkpoints/ dir without `latest`" in err and "give one of its step_*" in err, err


def test_tokenizer_files_are_copied_and_give_the_special_ids(tmp_path, capsys):
    run = train_one_step(tmp_path / "run")
    capsys.readouterr()  # the run's own output
    # RUN/checkpoints names the same step as RUN (the rule model.init_from follows)
    assert export(os.path.join(run, "checkpoints"), tmp_path / "bare") == 0
    err = capsys.readouterr().err  # data=synthetic: no tokenizer/ at all, and the warning says so
    assert err.startswith("warning: the run has no tokenizer/ dir") and "holds" not in err, err
    tok = tmp_path / "run" / "tokenizer"
    tok.mkdir()
    from tokenizers import Tokenizer, models, pre_tokenizers

    real = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 5}, unk_token="<unk>"))
    real.pre_tokenizer = pre_tokenizers.Whitespace()
    real.save(str(tok / "tokenizer.json"))  # read by the same code that packs training data
    (tok / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                           "eos_token": {"content": "</s>"}}))
    assert export(run, tmp_path / "hf") == 0
    assert sorted(os.listdir(tok)) == sorted(
        n for n in os.listdir(tmp_path / "hf") if n.startswith("tokenizer"))
    for name in ("config.json", "generation_config.json"):
        config = json.loads((tmp_path / "hf" / name).read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_config_round_trip_of_an_imported_model(tmp_path):
    """HF config.json -> model.init_from -> training -> export -> the same architecture and
    RoPE as transformers reads them, and the source's context (max_position_embeddings 64 =
    yarn x4 over 16), not the trained 32."""
    src = tmp_path / "src"
    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, vocab_size=VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=64, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.9, "rope_theta": 5e4})
    transformers.LlamaForCausalLM(config).save_pretrained(src)  # init_from needs the weights too
    args = [a for a in SMALL if not a.startswith("model.")] + [f"model.init_from={src}"]
    cfg = cli.precheck([*args, "train.steps=1", f"data.cache_dir={tmp_path / 'cache'}"])
    Trainer(cfg, str(tmp_path / "run"), cpu_dims()).fit()
    assert export(tmp_path / "run", tmp_path / "out", "--dtype", "fp32") == 0
    a = transformers.AutoConfig.from_pretrained(src).to_dict()
    b = transformers.AutoConfig.from_pretrained(tmp_path / "out").to_dict()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "num_hidden_layers", "rms_norm_eps", "vocab_size",
                "tie_word_embeddings", "rope_parameters", "hidden_act", "head_dim"):
        assert a[key] == b[key], key
    assert a["max_position_embeddings"] == b["max_position_embeddings"] == 64


def test_weights_round_trip(tmp_path):
    """Import an HF dir's weights, train one step at a negligible learning rate, export: the
    tensors equal the source's."""
    src = tmp_path / "src"
    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=64)
    torch.manual_seed(0)
    # bf16 as published models are: a 1e-12 step moves tiny fp32 entries by an ulp, but never
    # a bf16 value (the fp32 master copy is exactly the bf16 source, 2^-8 from a rounding edge).
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(src)
    args = [a for a in SMALL if not a.startswith("model.")]
    args += [f"model.init_from={src}", "train.steps=1", "optim.lr=1e-12",
             "optim.weight_decay=0", f"hydra.run.dir={tmp_path / 'run'}",
             f"data.cache_dir={tmp_path / 'cache'}"]
    from support.common import run_train

    done = run_train(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert export(tmp_path / "run", tmp_path / "out", "--dtype", "fp32") == 0
    from safetensors.torch import load_file

    source = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    exported = {k: v for f in (tmp_path / "out").glob("*.safetensors")
                for k, v in load_file(f).items()}
    assert source.keys() == exported.keys()
    for name, tensor in source.items():
        assert torch.equal(exported[name].to(tensor.dtype), tensor), name




@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """One one-step run shared by the damage tests below (each damages a copy of it)."""
    return train_one_step(tmp_path_factory.mktemp("shared") / "run")


def _damaged_copy(run, tmp_path, damage) -> str:
    """A copy of run dir `run` whose shard file `__0_0.distcp` went through `damage(path)`."""
    copy = str(tmp_path / f"run_{damage.__name__}")
    shutil.copytree(run, copy)
    damage(os.path.join(latest_step(copy), "__0_0.distcp"))
    return copy


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage,says", [(_truncate, "bytes, the manifest says"),
                                         (os.remove, "__0_0.distcp: missing"),
                                         (flip_byte, "differs from the manifest's hash")],
                         ids=["truncated", "deleted", "bit-flipped"])
def test_a_damaged_checkpoint_is_refused_before_anything_is_written(
        one_step_run, tmp_path, capsys, damage, says):
    """As model.init_from and resume refuse it (the manifest's sizes and hashes): one line,
    exit 2; neither a new OUT_DIR (nor its new parent) nor a file in an empty one is left."""
    run = _damaged_copy(one_step_run, tmp_path, damage)
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "hf", tmp_path / "empty"):
        assert export(run, out) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: CHECKPOINT: {latest_step(run)} is damaged: ") and \
            says in err and err.endswith("use another step_* dir") and "\n" not in err, err
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "empty") == []


def test_a_failure_mid_write_removes_only_what_export_wrote(one_step_run, tmp_path, capsys,
                                                             monkeypatch):
    """An I/O error while reading a tensor (after some shards were written) or while writing
    config.json: one line, exit 1, and OUT_DIR as it was (a pre-existing empty dir stays, a
    new one goes), so the same command then succeeds."""
    import errno

    from ulysses_train.hf import export as export_module

    real_load, calls, written = dcp.load, [], []

    def failing_load(*args, **kwargs):  # the 5th tensor's read fails, after whole shards
        calls.append(1)
        if len(calls) == 5:
            written.append(len(list(out.glob("*.safetensors"))))
            raise OSError(errno.EIO, "Input/output error", "__0_0.distcp")
        return real_load(*args, **kwargs)

    def failing_json(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    for patch, start in ((("load", failing_load), "error: CHECKPOINT: "),
                         (("_write_json", failing_json), "error: OUT_DIR: writing ")):
        for out in (tmp_path / "new" / "hf", tmp_path / "empty"):
            calls.clear()
            with monkeypatch.context() as m:
                m.setattr(dcp if patch[0] == "load" else export_module, *patch)
                assert export(one_step_run, out, "--max-shard-size", "40KB") == 1
            err = capsys.readouterr().err.strip()
            assert err.startswith(start) and "\n" not in err and \
                ("Input/output error" in err or "No space left" in err), err
            assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "empty") == []
    assert len(written) == 2 and min(written) >= 2  # a shard done, the next begun: removed
    assert export(one_step_run, tmp_path / "empty", "--max-shard-size", "40KB") == 0  # the rerun
    assert len(list((tmp_path / "empty").glob("*.safetensors"))) > 2
