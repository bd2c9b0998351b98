"""Resume refuses a different data stream; memory and layout knobs keep the run dir.

The data position is step x global_batch_size over a stream fixed by the seed, data.seq_len and
the tokens, so a resume with any of those changed would silently re-read or skip samples, or
read token ids that now mean other pieces. Each checkpoint's meta.json records them
(checkpoint/identity.py) and a resume compares them; the default run dir hashes only what defines the
run, so "rerun with train.activation_checkpointing=full" continues it.
"""
import dataclasses
import json
import os

import pytest

from support.common import SMALL, cpu_dims, run_train, small_config
from ulysses_train.checkpoint import identity as run_identity
from ulysses_train.checkpoint import manifest, store
from ulysses_train.cli import compose as cli
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import Config
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# ---- the default run dir ----------------------------------------------------------------------
# Keys that change only how the run is driven, logged, debugged, or how the same math is computed.
HOW_SECTIONS = ("parallel", "checkpoint", "logging", "debug", "eval", "plan")
HOW_TRAIN = ("steps", "exit_after_steps", "max_skipped_steps", "val_every", "micro_batch_size",
             "activation_checkpointing", "activation_offload", "loss_chunk", "mlp_chunk",
             "compile", "deterministic")


def _keys(obj, prefix: str) -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _keys(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _excluded() -> set:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cli.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    GlobalHydra.instance().clear()
    return set(cfg.hydra.job.config.override_dirname.exclude_keys)


def test_run_hash_excludes_exactly_the_how_keys():
    """Every key of the how-sections (a debug or parallel key added later too) and every memory
    knob is excluded; no key of the data stream, the model or the optimizer is."""
    cfg, excluded = Config(), _excluded()
    how = {k for s in HOW_SECTIONS for k in _keys(getattr(cfg, s), s + ".")}
    how |= {f"train.{k}" for k in HOW_TRAIN} | {"data.cache_dir"}
    assert how <= excluded, sorted(how - excluded)
    what = set(_keys(cfg, "")) - how
    assert not what & excluded, sorted(what & excluded)
    assert {"data.seq_len", "train.global_batch_size", "train.seed", "optim.lr"} <= what


BASE = SMALL + ["train.steps=4"]


@pytest.mark.parametrize("extra,world", [
    (["train.activation_checkpointing=full"], 1),
    (["train.activation_checkpointing=selective", "train.activation_offload=true"], 1),
    (["parallel.sp=2"], 2),  # "continue on twice the ranks"
    (["parallel.zero=3", "train.micro_batch_size=1"], 2),
    (["train.loss_chunk=16", "train.mlp_chunk=8", "train.compile=true"], 1),
    (["checkpoint.async_save=true", "parallel.backend=gloo", "train.deterministic=true",
      "logging.wandb.mode=offline", "debug.nan_at_step=3"], 1),
])
def test_memory_and_layout_knobs_keep_the_default_run_dir(extra, world):
    assert cli.run_dir_for(BASE + extra, world) == cli.run_dir_for(BASE)


@pytest.mark.parametrize("extra", [["data.seq_len=64"], ["train.global_batch_size=8"],
                                   ["train.seed=1"], ["optim.lr=1e-4"], ["model.n_layers=3"]])
def test_what_defines_the_run_changes_the_default_run_dir(extra):
    assert cli.run_dir_for(BASE + extra) != cli.run_dir_for(BASE)


def test_rerun_with_a_memory_knob_resumes_and_a_changed_seq_len_is_refused_early(tmp_path):
    """End to end with the default run dir: stop at step 2, rerun with activation
    checkpointing and smaller micro-batches -> the same run, resumed. Then the same run dir
    with data.seq_len changed: one error line naming the key, before the trainer starts."""
    base = BASE + [f"data.cache_dir={tmp_path / 'cache'}"]
    first = run_train(base + ["train.exit_after_steps=2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_train(base + ["train.activation_checkpointing=full",
                              "train.micro_batch_size=1"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    (run,) = os.listdir(tmp_path / "runs")
    step2 = tmp_path / "runs" / run / "checkpoints" / "step_00000002"
    assert f"resumed from {step2} at step 2" in again.stdout
    longer = run_train(base + ["data.seq_len=64", f"hydra.run.dir={tmp_path / 'runs' / run}",
                               "train.steps=6"], cwd=tmp_path)
    assert longer.returncode == 2
    assert longer.stderr.startswith("error: data.seq_len: 64 here, but ")
    assert "data.seq_len=32 to resume" in longer.stderr and "model.init_from" in longer.stderr
    assert longer.stdout == ""  # refused by the pre-check: no torch, no data, no model


# ---- the data identity ------------------------------------------------------------------------
def _trainer(run_dir, **sections):
    return Trainer(small_config(**sections), str(run_dir), cpu_dims())


def _stop_at_2(run_dir, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"steps": 4, "exit_after_steps": 2, **sections["train"]}
    _trainer(run_dir, **sections).fit()


@pytest.mark.parametrize("section,key,value", [
    ("train", "global_batch_size", 8), ("train", "seed", 1), ("data", "seq_len", 16),
    ("data", "document_mask", True)])
def test_resume_with_another_data_stream_is_refused_naming_the_key(tmp_path, section, key,
                                                                   value):
    _stop_at_2(tmp_path)
    changed = small_config(train={"steps": 4})
    setattr(getattr(changed, section), key, value)
    with pytest.raises(ConfigError) as early:  # from meta.json alone, before any data is built
        run_identity.check_before_start(changed, str(tmp_path))
    assert early.value.key == f"{section}.{key}"
    with pytest.raises(ConfigError) as late:  # and by the checkpoint manager itself
        Trainer(changed, str(tmp_path), cpu_dims())
    assert late.value.key == f"{section}.{key}" and "hydra.run.dir=NEW_DIR" in late.value.message


def test_meta_json_records_the_data_identity(tmp_path):
    _stop_at_2(tmp_path)
    meta = store.read_meta(str(tmp_path / "checkpoints" / "step_00000002"))
    data = meta["identity"]["data"]
    assert "data.mixture" not in data  # recorded only for data.sources (tests/data/test_mixture*)
    assert {k: data[k] for k in run_identity.STREAM_KEYS if k != "data.mixture"} == {
        "data.name": "synthetic", "data.seq_len": 32, "train.global_batch_size": 4,
        "train.seed": 0, "data.document_mask": False, "data.val_fraction": 0.02}
    assert meta["identity"]["optim"]["optim.lr"] == 1e-3


def _corpus(path, n_docs: int) -> None:
    with open(path, "a") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"Document {i}: the quick brown fox number {i * 7} "
                                        f"jumps over {i % 5} lazy dogs. " * 20}) + "\n")


def _files_config(tmp_path, corpus):
    return dict(data={"name": "files", "paths": [str(corpus)], "cache_dir": str(tmp_path / "c"),
                      "val_fraction": 0.0, "seq_len": 16},
                train={"steps": 4, "val_every": 0}, model={"vocab_size": 384})


def test_appended_documents_retrain_the_tokenizer_and_are_refused(tmp_path):
    """data=files: documents appended to the .jsonl between two runs of the same command. The
    tokenizer is retrained on the new corpus, so token ids mean other pieces: refused."""
    corpus = tmp_path / "corpus.jsonl"
    _corpus(corpus, 30)
    sections = _files_config(tmp_path, corpus)
    _stop_at_2(tmp_path / "run", **sections)
    _corpus(corpus, 10)
    with pytest.raises(ConfigError) as info:
        _trainer(tmp_path / "run", **sections)
    assert info.value.key == "data.paths"
    assert "the inputs changed on disk" in info.value.message
    assert "restore the data it was trained on" in info.value.message


def test_the_same_tokens_from_a_moved_corpus_resume_with_a_note(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    _corpus(corpus, 30)
    sections = _files_config(tmp_path, corpus)
    _stop_at_2(tmp_path / "run", **sections)
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(corpus.read_bytes())  # new path and mtime: a new cache key, same tokens
    sections["data"]["paths"] = [str(moved)]
    trainer = _trainer(tmp_path / "run", **sections)
    assert trainer.step == 2
    assert "note: data.paths changed" in capsys.readouterr().out


def _meta(**data):
    return {"identity": {"data": {"data.name": "stdlib", "data.seq_len": 32, **data}}}


def test_a_python_upgrade_that_retrains_the_stdlib_tokenizer_is_refused():
    """The stdlib corpus is rebuilt under a new Python; its tokenizer differs: refused, naming
    the versions. (The whole stdlib is too slow to tokenize twice in a test; this is the same
    comparison the files test drives for real.)"""
    saved = _meta(**{"data.python": "3.11.7", "data.tokenizer": "a" * 64})
    now = {"data": _meta(**{"data.python": "3.11.9", "data.tokenizer": "b" * 64})
           ["identity"]["data"]}
    with pytest.raises(ConfigError) as info:
        run_identity.check_resume(saved, now, "/ck/step_1", "auto", log=print)
    assert info.value.key == "data.python"
    assert "data.python '3.11.7' -> '3.11.9'" in info.value.message


@pytest.mark.parametrize("changed, blamed", [("data.tokens", "data.paths"),
                                               ("data.tokenizer", "data.tokenizer_path")])
def test_a_changed_corpus_under_a_given_tokenizer_names_the_corpus(changed, blamed):
    """With data.tokenizer_path set, appended documents (tokens differ, tokenizer equal) name
    data.paths, and only a changed tokenizer file names data.tokenizer_path (a fresh-user run
    got data.tokenizer_path for appended documents)."""
    base = {"data.name": "files", "data.tokenizer_path": "/t/tok.model",
            "data.paths": ["/c.jsonl"], "data.tokenizer": "a" * 64, "data.tokens": [1, 2, "h"]}
    saved = {"identity": {"data": base}}
    now = {"data": {**base, changed: "b" * 64 if changed == "data.tokenizer" else [3, 4, "g"]}}
    with pytest.raises(ConfigError) as info:
        run_identity.check_resume(saved, now, "/ck/step_1", "auto", log=print)
    assert info.value.key == blamed


def test_a_checkpoint_without_identity_resumes_with_a_warning(tmp_path, capsys):
    """Checkpoints written before the identity existed: warn, resume (and record it next save)."""
    _stop_at_2(tmp_path)
    step = tmp_path / "checkpoints" / "step_00000002"
    meta = json.loads((step / "meta.json").read_text())
    del meta["identity"]
    (step / "meta.json").write_text(json.dumps(meta))
    manifest.write_manifest(str(step))  # as an older version wrote it
    changed = small_config(train={"steps": 4, "seed": 5})
    run_identity.check_before_start(changed, str(tmp_path))  # nothing to compare: silent
    trainer = Trainer(changed, str(tmp_path), cpu_dims())
    assert trainer.step == 2
    assert "predates the data identity" in capsys.readouterr().out


def test_override_fragments_parse_back_to_the_value(tmp_path):
    """Advice prints `key=value` words; Hydra must read each back as the same value."""
    odd = str(tmp_path / "a dir, with 'quotes'=")
    words = [run_identity.override("hydra.run.dir", odd),
             run_identity.override("data.paths", [str(tmp_path / "a.jsonl")]),
             run_identity.override("data.document_mask", True)]
    import shlex

    (tmp_path / "a.jsonl").write_text("{}\n")
    args = SMALL + [shlex.split(w)[0] for w in words]
    config = cli.precheck(args)
    assert config.data.paths == [str(tmp_path / "a.jsonl")] and config.data.document_mask
    assert cli.run_dir_for(args) == odd


@pytest.mark.parametrize("init_from_now", ["/hf/llama", "/hf/other"])
def test_a_changed_default_tokenizer_from_model_init_from_names_it(init_from_now):
    """data.tokenizer_path empty: the tokenizer is model.init_from's, which the identity then
    records; a changed tokenizer names model.init_from (moved or edited in place alike), not
    the corpus."""
    cfg = Config()
    assert "model.init_from" not in run_identity.config_identity(cfg)
    cfg.model.init_from = "/hf/llama"
    base = run_identity.config_identity(cfg)
    assert base["model.init_from"] == "/hf/llama"
    cfg.data.tokenizer_path = "/t/tokenizer.json"  # an explicit tokenizer: init_from is no source
    assert "model.init_from" not in run_identity.config_identity(cfg)
    saved = {"identity": {"data": {**base, "data.tokenizer": "a" * 64}}}
    now = {"data": {**base, "model.init_from": init_from_now, "data.tokenizer": "b" * 64}}
    with pytest.raises(ConfigError) as info:
        run_identity.check_resume(saved, now, "/ck/step_1", "auto", log=print)
    assert info.value.key == "model.init_from"
