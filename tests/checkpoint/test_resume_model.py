"""Resuming the same run keeps the model it was trained as: a change of a key that changes what
the weights compute (config/architecture.py FUNCTION: the RoPE keys, norm_eps) is refused in one
line naming the key, saying how to resume and how to start the next stage (`model.init_from`).

The bug (issue 19, item 5): rerunning a run dir with model.rope_factor 2 -> 4 or another
model.rope_theta resumed with exit 0, trained another function and rewrote meta.json. The
checks below read meta.json only; tests/e2e/test_entrypoint.py runs the reported case through
train.py.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from support.common import cpu_dims, small_config
from ulysses_train.checkpoint import manifest, store
from ulysses_train.checkpoint.identity import check_before_start
from ulysses_train.config.architecture import FUNCTION
from ulysses_train.config.errors import ConfigError
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

YARN = dict(rope_scaling="yarn", rope_factor=2.0, rope_original_seq_len=16)
# (the checkpoint's value -> this run's) per FUNCTION key, each valid on top of YARN.
CHANGES = {"rope_scaling": "llama3", "rope_theta": 5e5, "rope_factor": 4.0,
           "rope_original_seq_len": 8, "rope_beta_fast": 16.0, "rope_beta_slow": 2.0,
           "rope_low_freq_factor": 2.0, "rope_high_freq_factor": 8.0,
           "rope_attention_factor": 1.2, "rope_mscale": 0.8, "rope_mscale_all_dim": 0.9,
           "rope_truncate": False, "norm_eps": 1e-6, "sliding_window": 8,
           "layer_types": ["full_attention", "full_attention"], "rope_local_theta": 1e4,
           "norm_weight_offset": 1.0, "mlp_activation": "gelu_tanh", "scale_embeddings": True,
           "query_pre_attn_scalar": 8.0}


def _model(**changes):
    return dataclasses.replace(small_config().model, **{**YARN, **changes})


def _fake_run(run_dir, drop=(), **model) -> str:
    """A run dir with one committed-looking checkpoint (`latest` names it) whose meta.json
    records `model`; `drop`: keys an older version did not record. Returns the step dir."""
    step = os.path.join(run_dir, "checkpoints", store.step_dirname(1))
    os.makedirs(step)
    open(os.path.join(step, manifest.DCP_METADATA), "wb").close()
    saved = {k: v for k, v in dataclasses.asdict(_model(**model)).items() if k not in drop}
    with open(os.path.join(step, manifest.META), "w") as f:
        json.dump({"step": 1, "model": saved}, f)
    manifest.write_manifest(step)
    store.CheckpointDir(os.path.dirname(step), log=print).point_latest(os.path.basename(step))
    return step


def test_every_function_key_is_compared():
    assert set(CHANGES) == set(FUNCTION)


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_a_changed_function_key_is_refused_naming_it(tmp_path, key):
    step = _fake_run(tmp_path / "run")
    old = getattr(_model(), key)
    with pytest.raises(ConfigError) as info:
        store.check_shape(step, _model(**{key: CHANGES[key]}))
    message = info.value.message
    assert info.value.key == f"model.{key}"
    assert f"{step} was trained with {key}={old} (this run: {CHANGES[key]})" in message
    restore = "null" if old is None else str(old).lower() if isinstance(old, bool) else str(old)
    setting = f"'model.{key}=[]'" if old == [] else f"model.{key}={restore}"  # lists: quoted
    assert f"set {setting} to resume it" in message
    assert f"new run: model.init_from={step} hydra.run.dir=NEW_DIR" in message
    assert "\n" not in message
    store.check_shape(step, _model())  # the same model resumes


def test_several_changes_are_all_named_and_restored(tmp_path):
    step = _fake_run(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        store.check_shape(step, _model(rope_theta=5e5, rope_factor=4.0))
    assert info.value.key == "model.rope_theta"  # RESUME_KEYS order
    assert "rope_theta=10000.0 (this run: 500000.0), rope_factor=2.0 (this run: 4.0)" in \
        info.value.message
    assert "set model.rope_theta=10000.0 model.rope_factor=2.0 to resume it" in info.value.message


def test_an_unrecorded_key_reads_as_the_default(tmp_path):
    """A checkpoint of a version before rope_truncate was trained with its default (True)."""
    step = _fake_run(tmp_path / "run", drop=("rope_truncate",))
    store.check_shape(step, _model())
    with pytest.raises(ConfigError, match="rope_truncate=True .this run: False."):
        store.check_shape(step, _model(rope_truncate=False))


def test_refused_before_start_for_auto_and_for_an_explicit_path(tmp_path, monkeypatch):
    """The pre-check (before Hydra writes anything into the run dir) refuses `resume=auto`
    (the run dir's latest) and `checkpoint.resume=PATH`; a relative run dir is named in full,
    and the advice for PATH says to drop it (else the new run would resume it, not start)."""
    monkeypatch.chdir(tmp_path)
    step = _fake_run(tmp_path / "run")
    cfg = small_config()
    cfg.model = _model(rope_factor=4.0)
    with pytest.raises(ConfigError) as auto:
        check_before_start(cfg, "run")  # relative, as hydra.run.dir=run gives it
    assert auto.value.key == "model.rope_factor"
    assert f"new run: model.init_from={step} hydra.run.dir=NEW_DIR" in auto.value.message
    cfg.checkpoint.resume = step
    with pytest.raises(ConfigError) as explicit:
        check_before_start(cfg, str(tmp_path / "elsewhere"))
    assert "drop checkpoint.resume and add model.init_from=" in explicit.value.message
    with pytest.raises(ConfigError, match="drop checkpoint.resume"):
        store.check_resume_path(step, cfg.model)  # the input check of an explicit PATH


def test_flags_and_dimensions_keep_their_messages(tmp_path):
    """A flag is fixed by the weights, so no init_from advice; a dimension is another model."""
    step = _fake_run(tmp_path / "run")
    with pytest.raises(ConfigError) as flag:
        store.check_shape(step, _model(qkv_bias=True, rope_factor=4.0))
    assert flag.value.key == "model.qkv_bias" and "model.init_from" not in flag.value.message
    assert "set model.qkv_bias=false model.rope_factor=2.0 to resume it" in flag.value.message
    with pytest.raises(ConfigError) as shape:
        store.check_shape(step, _model(n_layers=3, rope_factor=4.0))
    assert shape.value.key == "checkpoint.resume"
    assert "different model shape: n_layers=2 (this run: 3)" in shape.value.message


def test_a_resume_without_its_init_from_is_told_to_give_it_again(tmp_path):
    """Found by a fresh-user pass: a run started with model.init_from and resumed without it
    gets the preset's shape, and the line only said 'resume with the same model settings'."""
    step = _fake_run(tmp_path / "run", init_from="/models/tiny-hf")
    with pytest.raises(ConfigError) as info:
        store.check_shape(step, _model(n_layers=3))
    assert "this run started from model.init_from=/models/tiny-hf: give it again" in \
        info.value.message
    with pytest.raises(ConfigError) as given:  # given, the advice would be wrong
        store.check_shape(step, _model(n_layers=3, init_from="/models/tiny-hf"))
    assert "give it again" not in given.value.message


def test_the_trainer_refuses_it_too(tmp_path):
    """A caller that skips the pre-check (Trainer in-process) is refused by the checkpoint
    manager's own check, before any state is loaded or saved."""
    cfg = small_config(train={"steps": 1})
    cfg.model = _model()
    Trainer(cfg, str(tmp_path), cpu_dims()).fit()
    meta = (tmp_path / "checkpoints" / store.step_dirname(1) / manifest.META).read_bytes()
    cfg.train.steps = 2
    cfg.model = _model(rope_theta=5e5)
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, str(tmp_path), cpu_dims())
    assert info.value.key == "model.rope_theta"
    assert (tmp_path / "checkpoints" / store.step_dirname(1) / manifest.META).read_bytes() == meta
    assert store.CheckpointDir(str(tmp_path / "checkpoints"), print).complete_steps() == [
        store.step_dirname(1)]
