"""The LR schedule (a pure function of the step) and optimizer parameter groups."""
import math

import pytest
import torch

from ulysses_train.config.schema import OptimConfig
from ulysses_train.train.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_is_linear_and_reaches_peak():
    cfg = OptimConfig(warmup_steps=4)
    assert [lr_factor(s, cfg, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_ends_at_min_ratio(schedule):
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule=schedule)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    mid = lr_factor(60, cfg, 110)
    assert mid == pytest.approx(0.55)  # half way: cosine and linear agree at the midpoint
    values = [lr_factor(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_shape():
    cfg = OptimConfig(warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(25, cfg, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_constant():
    cfg = OptimConfig(warmup_steps=2, schedule="constant")
    assert lr_factor(50, cfg, 100) == 1.0


def test_scheduler_follows_lr_factor_and_norms_skip_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = OptimConfig(lr=0.1, warmup_steps=3)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    seen = []
    for _ in range(5):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(s, cfg, 10) for s in range(5)])
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model[0].weight) in decayed and id(model[1].weight) not in decayed
    assert opt.param_groups[1]["weight_decay"] == 0.0
