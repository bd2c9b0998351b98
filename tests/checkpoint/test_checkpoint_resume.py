"""Every checkpoint we write can be resumed, whatever step it was written at, in every layout.

The bug these guard against: AdamW creates its state lazily in its first `step()`, so a
checkpoint saved before any optimizer step ran (every step so far skipped as non-finite) held no
`optim.state.*`, and the rerun refused it ("none is loadable"). Resuming from such a checkpoint
must also be exact: the same losses as the run that was never interrupted (a state with
`step` = 1, as torch's own `_init_optim_state` would make, changes Adam's bias correction).
"""
from __future__ import annotations

import os

import pytest
import torch

from support.common import ROOT, cpu_dims, metrics_rows, run_train, small_config
from support.spawn import run_distributed
from ulysses_train.checkpoint.state import init_optimizer_state
from ulysses_train.config.errors import RunStopped
from ulysses_train.parallel import ParallelDims
from ulysses_train.parallel.parallelize import build_model
from ulysses_train.train.optim import build_optimizer
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# The edge-case runs as reported (issue 10, part 7): a tiny model, the default run-dir layout.
REPORTED = ["model.n_layers=2", "model.d_model=64", "model.n_heads=8", "model.n_kv_heads=2",
            "model.ffn_hidden=128", "logging.wandb.mode=disabled", "logging.progress=false",
            "data=synthetic", "train.steps=4", "debug.nan_at_step=1"]


def test_eager_optimizer_state_is_the_lazy_state(tmp_path):
    """A step after `init_optimizer_state` equals a step on a fresh optimizer, bit for bit; the
    init itself changes no parameter and no gradient (here NaN, as after a skipped step)."""
    cfg = small_config()
    model_a, model_b = build_model(cfg, cpu_dims()), build_model(cfg, cpu_dims())
    opt_a, opt_b = build_optimizer(model_a, cfg.optim), build_optimizer(model_b, cfg.optim)
    for p in model_b.parameters():
        p.grad = torch.full_like(p, float("nan"))
    before = [p.detach().clone() for p in model_b.parameters()]
    assert init_optimizer_state(opt_b) == len(before)
    assert all(torch.equal(a, p) for a, p in zip(before, model_b.parameters()))
    assert all(p.grad.isnan().all() for p in model_b.parameters())
    assert all(float(s["step"]) == 0 for s in opt_b.state.values())
    for model in (model_a, model_b):
        for i, p in enumerate(model.parameters()):
            p.grad = torch.full_like(p, 0.01 * (i + 1))
    opt_a.step()
    opt_b.step()
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
    assert init_optimizer_state(opt_b) == 0  # existing state is left alone


def _rows_after(run_dir, cfg, dims) -> list[dict]:
    """Train `cfg` (stopping with its checkpoint), then rerun it to the end; return the rows."""
    try:
        Trainer(cfg, run_dir, dims).fit()
    except RunStopped:  # the non-finite guard gave up: exit 3, with a checkpoint
        pass
    cfg.train.exit_after_steps, cfg.train.max_skipped_steps = 0, 5
    Trainer(cfg, run_dir, dims).fit()  # old code: ConfigError "none is loadable"
    return metrics_rows(run_dir) if dims.is_main else None


def _curves(root, parallel, dims) -> dict:
    """For both reported stops: (uninterrupted rows, stopped-and-resumed rows)."""
    out = {}
    for name, debug, train in (("exit_after", {"nan_steps": 1}, {"exit_after_steps": 1}),
                               ("exit_3", {"nan_steps": 2}, {"max_skipped_steps": 2})):
        def config(debug=debug, train=train, **extra):
            return small_config(parallel=parallel, checkpoint={"every": 0},
                                debug={"nan_at_step": 1, **debug},
                                train={"steps": 4, **train, **extra})
        straight = os.path.join(root, name, "straight")
        Trainer(config(exit_after_steps=0, max_skipped_steps=5), straight, dims).fit()
        resumed = _rows_after(os.path.join(root, name, "resumed"), config(), dims)
        out[name] = (metrics_rows(straight) if dims.is_main else None, resumed)
    return out


def _layouts_rank(rank, world, root):
    results = {}
    for name, parallel in (("dp2-zero0", {"zero": 0}), ("dp2-zero3", {"zero": 3}),
                           ("tp2", {"tp": 2})):
        cfg = small_config(parallel=parallel)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        dims.build_mesh()
        results[name] = _curves(os.path.join(root, name), parallel, dims)
    return results


def _assert_exact(curves):
    for name, (straight, resumed) in curves.items():
        assert [r["step"] for r in resumed] == [1, 2, 3, 4], name
        for a, b in zip(straight, resumed):  # the weights moved at steps 2-4 (3-4 for exit_3)
            assert (a["loss"], a["grad_norm"], a["skipped"]) == \
                (b["loss"], b["grad_norm"], b["skipped"]), (name, a["step"])


def test_checkpoint_before_any_optimizer_step_resumes_exactly_one_process(tmp_path):
    _assert_exact(_curves(str(tmp_path), {}, cpu_dims()))


def test_checkpoint_before_any_optimizer_step_resumes_exactly_in_every_layout(tmp_path):
    results = run_distributed(_layouts_rank, 2, str(tmp_path), timeout=240)
    for layout, curves in results[0].items():
        _assert_exact({f"{layout}/{k}": v for k, v in curves.items()})


@pytest.mark.parametrize("stop", [
    ["debug.nan_steps=1", "train.exit_after_steps=1"],  # exit 0 after 1 step, all skipped
    ["debug.nan_steps=2", "train.max_skipped_steps=2"],  # exit 3: the guard gives up
], ids=["exit_after_steps", "exit_3"])
def test_reported_rerun_of_the_same_command_resumes(tmp_path, stop):
    """The reported command, run twice as a user would: the rerun resumes and trains on."""
    args = REPORTED + stop + [f"hydra.run.dir={tmp_path / 'run'}",
                              f"data.cache_dir={tmp_path / 'cache'}"]
    first = run_train(args)
    assert first.returncode == (3 if "max_skipped" in stop[1] else 0), first.stderr[-2000:]
    saved = max(n for n in os.listdir(tmp_path / "run" / "checkpoints") if n.startswith("step_"))
    again = run_train(args, cwd=ROOT)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / saved}" in again.stdout
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest > saved, (latest, saved)  # it trained on and saved a newer step
