"""Hydra composition: presets, the schema, and translation of Hydra's errors to one line."""
import os

import pytest
import yaml

from support.common import small_config
from ulysses_train.cli import compose as cli
from ulysses_train.cli import job
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import MODEL_PRESETS, ModelConfig
from ulysses_train.model import PRESETS


def test_defaults_compose_to_dataclasses():
    cfg = cli.precheck([])
    assert cfg.model.name == "tiny" and cfg.data.name == "stdlib"
    assert cfg.train.precision == "auto" and cfg.checkpoint.resume == "auto"
    assert cfg.logging.wandb.mode == "offline"


def test_overrides_reach_the_dataclasses():
    cfg = cli.precheck(["model=tinyllama_1b", "train.steps=7", "data.paths=[a.txt,b.jsonl]",
                        "hydra.run.dir=/tmp/somewhere"])
    assert (cfg.model.n_layers, cfg.model.n_kv_heads, cfg.train.steps) == (22, 4, 7)
    assert cfg.data.paths == ["a.txt", "b.jsonl"]


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_yaml_presets_match_python_presets(name):
    """configs/model/*.yaml (what Hydra reads) and PRESETS (what bench.py reads) agree."""
    with open(os.path.join(cli.CONFIG_DIR, "model", f"{name}.yaml")) as f:
        from_yaml = yaml.safe_load(f)
    assert from_yaml["name"] == name
    for key, value in PRESETS[name].items():
        assert from_yaml.get(key, getattr(ModelConfig(), key)) == value, key


@pytest.mark.parametrize("overrides,key,fragment", [
    (["train.steps=abc"], "train.steps", "not a valid integer"),
    (["optim.lr=fast"], "optim.lr", "not a valid float"),
    (["train.stpes=5"], "train.stpes", "unknown key"),
    (["+train.foo=1"], "train.foo", "unknown key"),
    (["+bar=1"], "bar", "unknown key"),
    (["model=gpt5"], "model", "unknown preset 'gpt5'"),
    (["data=web"], "data", "unknown preset 'web'"),
    (["train.steps"], "train.steps", "write key=value"),
    (["train.deterministic=maybe"], "train.deterministic", "'maybe' is not a valid bool"),
    (["data=files", "data.paths=a.jsonl"], "data.paths", "expects a list; write data.paths=["),
    (["checkpoint.resume=" + os.path.abspath(__file__)], "checkpoint.resume", "is not a directory"),
    (["data.text_field="], "data.text_field", "must name the field"),
    (["parallel.timeout_s=1e14"], "parallel.timeout_s", "must be at most 604800 seconds"),
    (["model.sliding_window=-4"], "model.sliding_window", "must be >= 0 tokens"),
    (["model.n_layers=2", "model.sliding_window=8", "model.layer_types=[full_attention,global]"],
     "model.layer_types", "unknown entries ['global']"),
    (["model.layer_types=[sliding_attention]"], "model.layer_types",
     "has 1 entries for model.n_layers=4"),
    # the example is the key's own (it was data.paths' a.jsonl for every list key)
    (["model.layer_types=sliding_attention"], "model.layer_types",
     "expects a list; write model.layer_types=[sliding_attention,full_attention]"),
    # issue 23: a mixture entry's own key, with its index, not OmegaConf's bare field name
    (["data.sources=[{kind:files,paths:[a]},{name:b,kind:files,paths:[b],wieght:2}]"],
     "data.sources[1].wieght", "unknown key"),
    (["data.sources=[{kind:files,paths:[a],weight:abc}]"], "data.sources[0].weight",
     "'abc' is not a valid float"),
    (["data.sources={kind:files}"], "data.sources", "expects a list; write data.sources=[{"),
    (["data.sources=[{kind:files,paths:[a],weight:0}]"], "data.sources[0].weight",
     "must be a positive number"),
    (["data.sources=[{kind:tokens,paths:[a.bin]}]"], "data.sources[0].paths",
     "file not found"),
    (["data.sources=[{kind:megatron,paths:[/no/where/books]}]"], "data.sources[0].paths",
     "/no/where/books.idx not found"),
    (["data.sources=[{kind:files,paths:[a]},{kind:files,paths:[b]}]", "data.sources.1.wieght=2"],
     "data.sources[1].wieght", "unknown key"),  # was data.sources[?].data.sources[1].wieght
    (["data.sources=[{kind:files,paths:[a]}]", "+data.sources.0.foo=1"], "data.sources[0].foo",
     "unknown key"),  # was accepted silently
    (["data.sources=[{kind:files,paths:[a]}]", "data.sources.3.weight=2"], "data.sources[3]",
     "there is no such entry"),
    (["data.sources=[a,b]"], "data.sources[0]", "an entry is a mapping such as {name:"),
    (["data.sources=[{kind:files,paths:[a]}]", "~data.sources.0"], "overrides",
     "cannot be removed by its index"),
    (["data.sources=[{kind:megatron,paths:[a],dtype:int8}]"], "data.sources[0].dtype",
     "is not used by a megatron source"),
    (["data.sources=[{kind:files,paths:[a],length_upsample:1e6}]"],
     "data.sources[0].length_upsample", "must be between 1 (off) and 100"),
])
def test_hydra_errors_become_one_line(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        cli.precheck(overrides)
    assert info.value.key == key
    assert fragment in info.value.message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, key, fragment", [
    ("name: files\nsources:\n  - {kind: files, paths: [a]}\n  - {kind: files, wieght: 1}\n",
     "data.sources[].wieght", "unknown key"),
    ("name: files\nsources:\n  a: {kind: files}\n", "data/mix.yaml", "holds a mapping here"),
    ("name: files\nseq_len: 4\nseq_len: 5\n", "mix.yaml", "'seq_len' appears twice"),
])
def test_a_data_group_file_s_mistakes_are_one_line(tmp_path, text, key, fragment):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mix.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        cli.precheck([f"hydra.searchpath=[file://{tmp_path}]", "data=mix"])
    assert info.value.key.endswith(key) and fragment in info.value.message


def test_run_hash_is_stable_and_distinguishes():
    assert cli.run_hash("a=1") == cli.run_hash("a=1")
    assert cli.run_hash("a=1") != cli.run_hash("a=2")


def test_only_rank_zero_writes_hydra_files():
    assert cli.rank_overrides(0) == []
    assert "hydra.output_subdir=null" in cli.rank_overrides(3)


def test_restart_warning_only_when_restarts_cannot_work():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in job.restart_warning(shared)
    assert job.restart_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert job.restart_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert job.restart_warning({}) is None


def test_hydra_config_yaml_is_rewritten_only_when_init_from_or_auto_changed_it(tmp_path):
    """Catches: .hydra/config.yaml showing the model= preset while model.init_from decided the
    architecture (or the composed layout while parallel.auto chose another)."""
    import dataclasses

    from omegaconf import OmegaConf

    composed = cli.precheck([])
    (tmp_path / "config.yaml").write_text("hydra's composition\n")
    assert not job.write_effective_config(str(tmp_path), composed, composed)
    assert (tmp_path / "config.yaml").read_text() == "hydra's composition\n"
    imported = dataclasses.replace(composed, model=dataclasses.replace(
        composed.model, n_layers=5, init_from="/models/src"))
    assert job.write_effective_config(str(tmp_path), composed, imported)
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# the config this run uses: Hydra's composition with model.init_from")
    assert OmegaConf.create(text).model.n_layers == 5
    assert os.listdir(tmp_path) == ["config.yaml"]  # no .tmp left behind
    assert not job.write_effective_config(str(tmp_path / "none"), composed, imported)


@pytest.mark.parametrize("override,key,value", [
    ("model.init_from=~/ut_tmp/a", "model.init_from", "~/ut_tmp/a"),  # ~: Hydra's delete operator
    ("eval.checkpoint=~/runs/x", "eval.checkpoint", "~/runs/x"),
    ("data.tokenizer_path=/models/a#b/tokenizer.json", "data.tokenizer_path",
     "/models/a#b/tokenizer.json"),
    ("checkpoint.resume=/runs/a&b/step_1", "checkpoint.resume", "/runs/a&b/step_1"),
    ("data.paths=[~/a.jsonl, b.jsonl]", "data.paths", ["~/a.jsonl", "b.jsonl"]),
    ("+data.extra=x=y", "data.extra", "x=y"),
])
def test_unparsable_values_name_the_key_and_a_quoting_that_parses(override, key, value):
    """Catches: `error: overrides: LexerNoViableAltException: ...` (no key, no fix). The
    suggested override, split as the shell would, is parsed by Hydra's own override parser
    back to the value the user meant."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    with pytest.raises(ConfigError) as info:
        cli.compose([override])
    assert info.value.key == key
    message = info.value.message
    assert f"Hydra cannot parse the value {override.split('=', 1)[1]!r} unquoted" in message
    suggestion = message.split("quote it: ", 1)[1]
    (argument,) = shlex.split(suggestion)
    parsed = OverridesParser.create().parse_override(argument)
    assert parsed.key_or_group == key and parsed.value() == value


def test_unparsable_values_without_a_plain_quoting():
    """Quotes inside the value, or `${`, need more than wrapping; Hydra's own paths never
    expand ~, so a quoted one would make a directory named ~: say $HOME instead."""
    for override in ("model.init_from=a'b~", "model.init_from=${oops"):
        with pytest.raises(ConfigError, match="model.init_from: Hydra cannot parse the value "
                                              ".*; quote or escape it as https://hydra.cc"):
            cli.compose([override])
    with pytest.raises(ConfigError) as info:
        cli.compose(["hydra.run.dir=~/runs/x"])
    assert info.value.key == "hydra.run.dir"
    assert info.value.message.endswith("write hydra.run.dir=$HOME/runs/x")


def test_quoted_tilde_paths_expand(tmp_path, monkeypatch):
    """The quoting the errors above suggest works: model.init_from and data.paths expand ~
    (HOME is the test's tmp dir)."""
    import json

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ut_tmp" / "a").mkdir(parents=True)
    (tmp_path / "ut_tmp" / "a" / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=90, num_hidden_layers=3, vocab_size=300, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=256, hidden_act="silu",
        tie_word_embeddings=True)))
    cfg = cli.compose(['model.init_from="~/ut_tmp/a"'])
    assert cfg.model.init_from == "~/ut_tmp/a" and cfg.model.n_layers == 3  # from config.json
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    cfg = cli.precheck(["data=files", 'data.paths=["~/a.jsonl"]',
                        f"hydra.run.dir={tmp_path / 'run'}"])
    assert cfg.data.paths == ["~/a.jsonl"]


def test_quoted_tilde_run_dir_is_refused_not_made_verbatim():
    """Catches: 'hydra.run.dir="~/x"' (quoted as other path keys are) making ./~/x: Hydra never
    expands ~, and a later `rm -rf ~/...` by a user cleaning it up is dangerous."""
    with pytest.raises(ConfigError) as info:
        cli.precheck(['hydra.run.dir="~/runs/x"'])
    assert info.value.key == "hydra.run.dir" and "hydra.run.dir=$HOME/runs/x" in info.value.message



def test_input_files_are_checked_by_cli_checks(tmp_path):
    """The file checks config.validate no longer makes (config/ does no I/O): data.paths, an
    explicit checkpoint.resume=PATH, model.init_from — one ConfigError naming each key."""
    from ulysses_train.cli.checks import check_inputs
    from ulysses_train.config import ConfigError

    cases = [({"data": {"name": "files", "paths": [str(tmp_path / "no.jsonl")]}},
              "data.paths", "file not found"),
             ({"data": {"name": "files", "paths": [str(tmp_path)]}}, "data.paths",
              "is a directory"),
             ({"checkpoint": {"resume": "/nonexistent/step_00000001"}}, "checkpoint.resume",
              "does not exist"),
             ({"checkpoint": {"resume": str(tmp_path)}}, "checkpoint.resume",
              "not a complete checkpoint")]
    for sections, key, words in cases:
        with pytest.raises(ConfigError) as info:
            check_inputs(small_config(**sections))
        assert info.value.key == key and words in info.value.message, (sections, info.value)


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    """hydra.run.dir naming a file, a path under a file, or nothing at all: Hydra failed with a
    FileExistsError / NotADirectoryError traceback, or trained in the current directory."""
    afile = tmp_path / "a.jsonl"
    afile.write_text("{}\n")
    cases = [(str(afile), "is a file, not a directory"),
             (str(afile / "sub"), f"cannot be created: {afile} is a file"),
             ("", "is empty")]
    for run_dir, words in cases:
        with pytest.raises(ConfigError) as info:
            cli.run_dir_for([f"hydra.run.dir={run_dir}"])
        assert info.value.key == "hydra.run.dir" and words in info.value.message, info.value
    assert cli.run_dir_for([f"hydra.run.dir={tmp_path / 'new' / 'run'}"]) == str(
        tmp_path / "new" / "run")


def test_the_entry_points_own_overrides_join_the_users_run_of_overrides():
    from ulysses_train.cli.train import with_overrides

    ours = ["hydra.job.name=train"]
    assert with_overrides(["a=1", "--cfg", "job"], ours) == ["hydra.job.name=train", "a=1",
                                                            "--cfg", "job"]
    assert with_overrides(["--cfg", "job", "a=1"], ours) == ["--cfg", "job",
                                                            "hydra.job.name=train", "a=1"]
    assert with_overrides(["--help"], ours) == ["--help", "hydra.job.name=train"]
