"""Numerical guards: a non-finite step changes no weight; K of them in a row stop the run, saved.

NaN is injected with `debug.nan_at_step` / `debug.nan_steps` (the loss, hence every gradient).
"""
import math

import pytest
import torch

from support.common import cpu_dims, metrics_rows, small_config
from ulysses_train.cli import job
from ulysses_train.config.errors import RunStopped
from ulysses_train.train.trainer import Trainer, run


def _snapshot(trainer) -> dict:
    """Copies of every parameter and every optimizer state tensor."""
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    optim = {(i, k): v.clone() for i, s in enumerate(trainer.optimizer.state.values())
             for k, v in s.items() if isinstance(v, torch.Tensor)}
    return {**params, **optim}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _trainer(run_dir, **debug):
    cfg = small_config(train={"steps": 8, "max_skipped_steps": 2},
                       checkpoint={"every": 0}, debug=debug)
    return Trainer(cfg, str(run_dir), cpu_dims())


def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(tmp_path):
    trainer = _trainer(tmp_path, nan_at_step=3)
    for _ in range(2):
        assert not trainer.train_step()["skipped"]
    before, lr_before = _snapshot(trainer), trainer.scheduler.get_last_lr()[0]
    out = trainer.train_step()
    assert out["skipped"] and math.isnan(out["loss"]) and math.isnan(out["grad_norm"])
    _assert_equal(_snapshot(trainer), before)  # bit for bit, Adam's moments and step included
    # The data position and the schedule moved on: the bad batch is not retried.
    assert trainer.step == 3 and trainer.scheduler.get_last_lr()[0] != lr_before
    out = trainer.train_step()
    assert not out["skipped"] and math.isfinite(out["loss"])
    assert not torch.equal(next(trainer.model.parameters()), next(iter(before.values())))


def test_skips_are_counted_in_metrics(tmp_path):
    cfg = small_config(train={"steps": 5}, checkpoint={"every": 0}, logging={"every": 2},
                       debug={"nan_at_step": 3})
    assert run(cfg, str(tmp_path)) == 0
    rows = {r["step"]: r for r in metrics_rows(tmp_path)}
    assert sorted(rows) == [2, 3, 4, 5]  # a skipped step is always logged
    assert [(rows[s]["skipped"], rows[s]["skipped_steps"]) for s in (2, 3, 4, 5)] == [
        (False, 0), (True, 1), (False, 1), (False, 1)]
    # strict JSON: the NaN loss and norm are written as null
    assert rows[3]["loss"] is None and rows[3]["grad_norm"] is None
    assert math.isfinite(rows[5]["loss"])


def test_k_skips_in_a_row_stop_with_the_last_good_weights_saved(tmp_path):
    clean = _trainer(tmp_path / "clean")
    for _ in range(2):
        clean.train_step()
    good = _snapshot(clean)

    bad = _trainer(tmp_path / "bad", nan_at_step=3, nan_steps=10)
    with pytest.raises(RunStopped) as info:
        bad.fit()
    assert info.value.key == "train.max_skipped_steps" and info.value.exit_code == 3
    assert "2 steps in a row (3-4)" in info.value.message
    ck = tmp_path / "bad" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"
    assert [r["skipped_steps"] for r in metrics_rows(tmp_path / "bad")] == [0, 0, 1, 2]
    # The saved checkpoint holds step 2's weights and optimizer state at data position 4.
    resumed = _trainer(tmp_path / "bad")
    assert resumed.step == 4 and resumed.guard.total == 2
    _assert_equal(_snapshot(resumed), good)


def test_run_stopped_is_one_line_with_exit_code_3(capsys):
    with pytest.raises(SystemExit) as info:
        job.fail(RunStopped("train.max_skipped_steps", "2 steps in a row\nhad NaN"), rank=0)
    assert info.value.code == 3
    assert capsys.readouterr().err == "error: train.max_skipped_steps: 2 steps in a row had NaN\n"


def test_skips_read_a_step_late_still_stop_the_run(tmp_path):
    """Without logging steps, a step's skip is read one step later (train/step_stats.py): two
    bad steps followed by a good one must still stop (a good step observed after the limit
    reset the count and the run trained on with exit 0: seen with debug.nan_steps=2,
    train.max_skipped_steps=2, logging.every=10)."""
    bad = _trainer(tmp_path / "bad", nan_at_step=1, nan_steps=2)
    bad.cfg.logging.every = 100
    with pytest.raises(RunStopped) as info:
        bad.fit()
    assert "2 steps in a row (1-2)" in info.value.message
    assert bad.guard.total == 2
