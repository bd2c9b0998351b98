"""New optimizer settings on resume: the config wins for hyper-parameters, the checkpoint for state.

Before, a rerun with `optim.lr=1e-4` resumed with the checkpoint's lr, betas and weight decay
and said nothing — while the exit-3 message advised exactly that rerun. Also here: the advice
the program prints works when followed literally, with the default run dir.
"""
import os
import re
import shlex

import pytest
import torch

from support.common import SMALL, cpu_dims, run_train, small_config
from ulysses_train.train.optim import lr_factor
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _moments(trainer) -> list:
    return [(k, v.clone()) for s in trainer.optimizer.state.values() for k, v in s.items()]


def test_new_optimizer_settings_win_on_resume_and_are_logged(tmp_path, capsys):
    """Stop at step 3, rerun with optim.lr=1e-4 optim.weight_decay=0 optim.beta2=0.5: the
    optimizer uses the new values from the first resumed step, the log names each change,
    and Adam's moments and step counts are the checkpoint's."""
    first = Trainer(small_config(train={"steps": 6, "exit_after_steps": 3}), str(tmp_path),
                    cpu_dims())
    first.fit()
    saved = _moments(first)
    capsys.readouterr()
    cfg = small_config(train={"steps": 6}, optim={"lr": 1e-4, "weight_decay": 0.0, "beta2": 0.5})
    resumed = Trainer(cfg, str(tmp_path), cpu_dims())
    assert resumed.step == 3
    decay, no_decay = resumed.optimizer.param_groups
    expected_lr = 1e-4 * lr_factor(3, cfg.optim, 6)
    for group in (decay, no_decay):
        assert group["lr"] == expected_lr and tuple(group["betas"]) == (0.9, 0.5)
    assert decay["weight_decay"] == 0.0 and no_decay["weight_decay"] == 0.0
    assert resumed.scheduler.get_last_lr() == [expected_lr, expected_lr]
    moments = _moments(resumed)
    assert [k for k, _ in moments] == [k for k, _ in saved]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(moments, saved))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("resuming with new settings"))
    assert ("optim.lr: 0.001 -> 0.0001, optim.beta2: 0.95 -> 0.5, optim.weight_decay: 0.1 -> 0.0"
            in line and "config wins" in line)
    assert resumed.train_step()["lr"] == expected_lr  # the step after resume runs at it
    # Schedule keys and grad_clip are recorded in meta.json, so their changes are said too.
    cfg.optim.warmup_steps, cfg.train.grad_clip = 0, 0.5
    Trainer(cfg, str(tmp_path), cpu_dims())
    line = next(x for x in capsys.readouterr().out.splitlines() if "new settings" in x)
    assert "optim.warmup_steps: 2 -> 0" in line and "train.grad_clip: 1.0 -> 0.5" in line


def test_an_unchanged_config_resumes_silently_and_bit_exact_lr(tmp_path, capsys):
    Trainer(small_config(train={"steps": 6, "exit_after_steps": 3}), str(tmp_path),
            cpu_dims()).fit()
    straight = Trainer(small_config(train={"steps": 6}), str(tmp_path / "straight"), cpu_dims())
    for _ in range(3):
        straight.train_step()
    resumed = Trainer(small_config(train={"steps": 6}), str(tmp_path), cpu_dims())
    assert "new settings" not in capsys.readouterr().out
    assert [g["lr"] for g in resumed.optimizer.param_groups] == \
        [g["lr"] for g in straight.optimizer.param_groups]


def test_following_the_exit_3_advice_literally_resumes_with_the_lower_lr(tmp_path):
    """The default run dir hashes optim.lr, so "lower optim.lr and rerun" used to start a new run
    at step 1. The message now prints the fragment to add; adding it resumes this run."""
    args = SMALL + ["train.steps=5", f"data.cache_dir={tmp_path / 'cache'}",
                    "debug.nan_at_step=2", "debug.nan_steps=2", "train.max_skipped_steps=2"]
    stopped = run_train(args, cwd=tmp_path)
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    fragment = re.search(r"rerun the same command adding (.+?) \(the config", stopped.stderr)
    assert fragment, stopped.stderr
    (run,) = os.listdir(tmp_path / "runs")
    assert f"hydra.run.dir={tmp_path / 'runs' / run}" in fragment.group(1)
    rerun = run_train(args + shlex.split(fragment.group(1)), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    step3 = tmp_path / "runs" / run / "checkpoints" / "step_00000003"
    assert f"resumed from {step3} at step 3" in rerun.stdout
    assert "optim.lr: 0.001 -> 0.0005" in rerun.stdout
    assert os.listdir(tmp_path / "runs") == [run]
