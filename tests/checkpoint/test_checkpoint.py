"""Checkpoints: atomic commit, retention, and every resume decision of docs/architecture.md §2."""
import json
import os

import pytest
import torch

from support.common import cpu_dims, flip_byte, run_train, small_config
from ulysses_train.checkpoint import manifest
from ulysses_train.checkpoint.manager import (
    CheckpointManager,
    CheckpointSaveError,
    is_complete,
)
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import CheckpointConfig
from ulysses_train.parallel.parallelize import build_model
from ulysses_train.train.optim import build_optimizer

# DCP's note that it runs without a process group: a single process is what these tests mean.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


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
    assert m.ckdir.complete_steps() == ["step_00000002", "step_00000003"]
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
    assert any("step_00000002 is corrupt" in s and ".distcp" in s for s in said), said


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


DAMAGE = {
    "truncated": lambda p: open(p, "r+b").truncate(10),
    "bit-flipped": flip_byte,
    "missing": os.remove,
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_manifest_reports_the_damaged_file_by_path(tmp_path, damage):
    cfg, model, opt = make()
    m = manager(tmp_path, cfg)
    step_dir = m.save(1, model, opt, {"step": 1})
    assert m.resume.verify(step_dir) == []
    victim = os.path.join(step_dir, [f for f in os.listdir(step_dir) if f.endswith(".distcp")][0])
    DAMAGE[damage](victim)
    problems = m.resume.verify(step_dir)
    assert len(problems) == 1 and problems[0].startswith(victim + ": "), problems


def test_manifest_covers_every_file_and_meta_is_checked_first(tmp_path):
    cfg, model, opt = make()
    step_dir = manager(tmp_path, cfg).save(1, model, opt, {"step": 1})
    manifest = json.loads(open(os.path.join(step_dir, "manifest.json")).read())
    assert set(manifest["files"]) == set(os.listdir(step_dir)) - {"manifest.json"}
    # A flipped byte in meta.json is corruption, not "another model shape".
    flip_byte(os.path.join(step_dir, "meta.json"))
    problems = manager(tmp_path, cfg).resume.verify(step_dir)
    assert problems and "meta.json" in problems[0]


def test_partial_saves_are_ignored_and_removed_with_a_log_line(tmp_path):
    cfg, model, opt = make()
    m = manager(tmp_path, cfg)
    m.save(1, model, opt, {"step": 1})
    ck = tmp_path / "checkpoints"
    (ck / ".tmp_step_00000002").mkdir()
    (ck / ".tmp_step_00000002" / "__0_0.distcp").write_bytes(b"half")
    (ck / "latest.tmp").write_text("step_000")  # a crash while replacing `latest`
    said = []
    state, _ = manager(tmp_path, cfg, log=said.append).restore(model, opt, {"step": 0})
    assert state["step"] == 1
    assert any("removing incomplete checkpoint" in s and ".tmp_step_00000002" in s for s in said)
    assert sorted(os.listdir(ck)) == ["latest", "step_00000001"]


def test_async_save_stages_a_copy_and_commits_in_the_background(tmp_path):
    cfg, model, opt = make()
    m = manager(tmp_path, cfg, async_save=True)
    saved = [p.detach().clone() for p in model.parameters()]
    m.save(1, model, opt, {"step": 1})
    with torch.no_grad():  # training goes on while the files are written
        for p in model.parameters():
            p.add_(1.0)
    m.wait()
    m.close()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    _, model2, opt2 = make(seed=1)
    manager(tmp_path, cfg).restore(model2, opt2, {"step": 0})
    assert all(torch.equal(a, b) for a, b in zip(saved, model2.parameters()))


def test_failed_async_save_is_raised_and_never_marked_latest(tmp_path, monkeypatch):
    cfg, model, opt = make()
    said = []
    m = manager(tmp_path, cfg, log=said.append, async_save=True)
    m.save(1, model, opt, {"step": 1})
    m.wait()

    def disk_full(path, *hashed):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manifest, "write_manifest", disk_full)
    m.save(2, model, opt, {"step": 2})
    with pytest.raises(CheckpointSaveError, match="step 2 was not saved.*No space left"):
        m.wait()
    m.close()
    assert any(s.startswith("error: background save of checkpoint step 2") for s in said)
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000001"
    assert not (ck / "step_00000002").exists()


def test_resume_abandons_checkpoints_newer_than_the_resumed_step(tmp_path):
    """A kill between a commit and the `latest` update leaves a newer step dir: resume follows
    `latest` and moves it aside (never deletes it), as metrics.jsonl drops its rows after the
    resumed step."""
    cfg, model, opt = make()
    m = manager(tmp_path, cfg)
    for step in (1, 2, 3):
        m.save(step, model, opt, {"step": step})
    (tmp_path / "checkpoints" / "latest").write_text("step_00000001\n")
    said = []
    state, _ = manager(tmp_path, cfg, log=said.append).restore(model, opt, {"step": 0})
    assert state["step"] == 1
    assert sum("newer than the step resumed from (1)" in s for s in said) == 2
    assert m.ckdir.complete_steps() == ["step_00000001"]
    assert m.ckdir.latest_name() == "step_00000001"
    abandoned = tmp_path / "checkpoints" / "abandoned"
    assert sorted(os.listdir(abandoned)) == ["step_00000002", "step_00000003"]
    assert all(is_complete(str(abandoned / n)) for n in os.listdir(abandoned))


def test_sha256_without_xxhash_and_sizes_only_where_the_hash_is_unknown(tmp_path, monkeypatch):
    cfg, model, opt = make()
    monkeypatch.setattr(manifest, "default_algorithm", lambda: "sha256")
    step_dir = manager(tmp_path, cfg).save(1, model, opt, {"step": 1})
    assert json.load(open(os.path.join(step_dir, "manifest.json")))["algorithm"] == "sha256"
    flip_byte(os.path.join(step_dir, "__0_0.distcp"))
    assert "content differs" in manager(tmp_path, cfg).resume.verify(step_dir)[0]
    monkeypatch.setattr(manifest, "can_hash", lambda algorithm: False)
    said = []
    assert manager(tmp_path, cfg, log=said.append).resume.verify(step_dir) == []  # sizes still match
    assert "checking file sizes only" in said[0]
