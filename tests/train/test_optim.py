"""The LR schedule (a pure function of the step) and optimizer parameter groups."""
import math

import pytest
import torch

from ulysses_train.config.schema import OptimConfig
from ulysses_train.train.optim import build_optimizer, build_scheduler, lr_factor, step_unless


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


def _adamw_run(make, steps=6, skip_at=()):
    """Weights and optimizer state after `steps` steps of seeded gradients on a tiny model (a
    matrix decayed, a gain not), stepping through `step_unless` with the skip flag set at
    `skip_at` (their gradients are NaN there, as a bad batch's)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.LayerNorm(8))
    opt = make(model)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        bad = step in skip_at
        for p in model.parameters():
            p.grad = torch.full_like(p, math.nan) if bad else torch.randn(p.shape, generator=gen)
        step_unless(opt, torch.tensor(bad))
    state = {(i, k): v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()}
    return [p.detach().clone() for p in model.parameters()], state


def _per_parameter(model):
    """Today's CPU optimizer before the for-each switch: torch's per-parameter loop."""
    opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.1))
    for group in opt.param_groups:
        group["foreach"] = False
    return opt


def _fused(model):
    opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.1))
    for group in opt.param_groups:
        group["foreach"], group["fused"] = False, True
    opt.defaults["fused"] = True
    return opt


def _assert_same(a, b):
    assert len(a[0]) == len(b[0]) and a[1].keys() == b[1].keys()
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_cpu_optimizer_is_foreach_and_bit_equal_to_the_per_parameter_loop():
    model = torch.nn.Linear(2, 2)
    assert build_optimizer(model, OptimConfig()).defaults["foreach"] is True
    foreach = _adamw_run(lambda m: build_optimizer(m, OptimConfig(lr=3e-3, weight_decay=0.1)))
    _assert_same(foreach, _adamw_run(_per_parameter))


@pytest.mark.parametrize("make", [_per_parameter, _fused], ids=["foreach", "fused"])
def test_a_skipped_step_is_a_no_op_on_the_device(make):
    """step_unless(skip=True) leaves weights, moments and step counts as if the step had not
    been taken at all (also on the first step, before any state exists): a run with skipped
    steps equals one without those steps, bit for bit."""
    if make is _per_parameter:  # the path build_optimizer takes on the CPU
        make = lambda m: build_optimizer(m, OptimConfig(lr=3e-3, weight_decay=0.1))  # noqa: E731
    clean = _adamw_run(make, steps=4)
    _assert_same(_adamw_run(make, steps=6, skip_at=(0, 3)), clean)
