"""Checkpoints: atomic commit, retention, and every resume decision of DESIGN §2."""
import os

import pytest
import torch

from ulysses_train.checkpoint import CheckpointManager, is_complete
from ulysses_train.config import CheckpointConfig
from ulysses_train.errors import ConfigError
from ulysses_train.optim import build_optimizer
from ulysses_train.trainer import build_model

from helpers import cpu_dims, run_train, small_config


def make(seed=0):
    cfg = small_config(train={"seed": seed})
    model = build_model(cfg, cpu_dims())
    opt = build_optimizer(model, cfg.optim)
    ids = torch.randint(0, 256, (2, 16))
    loss, n = model(ids, torch.arange(16).expand(2, 16), ids)
    (loss / n).backward()
    opt.step()
    return cfg, model, opt


def manager(tmp_path, cfg, log=None, **ck):
    return CheckpointManager(str(tmp_path), CheckpointConfig(**ck), cfg.model,
                             log=log or (lambda s: None))


def test_roundtrip_restores_model_optimizer_and_trainer_state(tmp_path):
    cfg, model, opt = make(seed=0)
    manager(tmp_path, cfg).save(5, model, opt, {"step": 5, "tokens": 123})
    _, model2, opt2 = make(seed=1)
    state, path = manager(tmp_path, cfg).restore(model2, opt2, {"step": 0, "tokens": 0})
    assert state == {"step": 5, "tokens": 123} and path.endswith("step_00000005")
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)


def test_latest_and_retention(tmp_path):
    cfg, model, opt = make()
    m = manager(tmp_path, cfg, keep=2)
    for step in (1, 2, 3):
        m.save(step, model, opt, {"step": step})
    assert m.complete_steps() == ["step_00000002", "step_00000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def _corrupt(step_dir):
    data = [f for f in os.listdir(step_dir) if f.endswith(".distcp")][0]
    with open(os.path.join(step_dir, data), "r+b") as f:
        f.truncate(10)


def test_auto_falls_back_past_a_corrupt_latest(tmp_path):
    cfg, model, opt = make()
    m = manager(tmp_path, cfg, keep=3)
    m.save(1, model, opt, {"step": 1})
    m.save(2, model, opt, {"step": 2})
    _corrupt(tmp_path / "checkpoints" / "step_00000002")
    said = []
    state, path = manager(tmp_path, cfg, log=said.append).restore(model, opt, {"step": 0})
    assert state["step"] == 1 and path.endswith("step_00000001")
    assert any("could not be loaded" in s for s in said)


def test_auto_refuses_when_no_checkpoint_loads(tmp_path):
    cfg, model, opt = make()
    m = manager(tmp_path, cfg)
    m.save(1, model, opt, {"step": 1})
    _corrupt(tmp_path / "checkpoints" / "step_00000001")
    with pytest.raises(ConfigError, match="none is loadable"):
        m.restore(model, opt, {"step": 0})


def test_explicit_path_errors(tmp_path):
    cfg, model, opt = make()
    manager(tmp_path, cfg).save(1, model, opt, {"step": 1})
    good = str(tmp_path / "checkpoints" / "step_00000001")
    for bad in (str(tmp_path / "nope"), str(tmp_path / "checkpoints")):
        with pytest.raises(ConfigError, match="not a complete checkpoint"):
            manager(tmp_path / "other", cfg, resume=bad).restore(model, opt, {"step": 0})
    state, _ = manager(tmp_path / "other", cfg, resume=good).restore(model, opt, {"step": 0})
    assert state["step"] == 1
    _corrupt(good)
    with pytest.raises(ConfigError, match="corrupt"):
        manager(tmp_path / "other", cfg, resume=good).restore(model, opt, {"step": 0})


def test_other_model_shape_is_refused_before_loading(tmp_path):
    cfg, model, opt = make()
    manager(tmp_path, cfg).save(1, model, opt, {"step": 1})
    wider = small_config(model={"d_model": 128})
    with pytest.raises(ConfigError, match="d_model=64 \\(this run: 128\\)"):
        manager(tmp_path, wider).restore(model, opt, {"step": 0})


def test_never_refuses_to_overwrite(tmp_path):
    cfg, model, opt = make()
    manager(tmp_path, cfg).save(1, model, opt, {"step": 1})
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        manager(tmp_path, cfg, resume="never").restore(model, opt, {"step": 0})


def test_crash_mid_save_keeps_latest_on_the_previous_checkpoint(tmp_path, small_args):
    """A real process exit between DCP's files and the commit: step 4 never becomes visible."""
    args = small_args + ["train.steps=6", "checkpoint.every=2", "debug.crash_in_save_at_step=4"]
    crashed = run_train(args)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert (ck / ".tmp_step_00000004").is_dir() and not (ck / "step_00000004").exists()
    resumed = run_train(small_args + ["train.steps=6", "checkpoint.every=2"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert not (ck / ".tmp_step_00000004").exists()
    assert is_complete(str(ck / "step_00000006"))
