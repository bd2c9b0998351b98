"""`parallel.ulysses_chunks` G > 1 trains the one-process model (issue 22).

The curves and tolerances of test_trainer_parallel.py (uneven labels, init_std 0.2, eps 1e-3),
on a model with enough heads to group: 16 query and 4 kv heads, so at sp=4 each rank holds 4
query heads and one replicated kv head (G = 4 keeps it resident), and at tp=2 x sp=2 the same.
The layouts also run activation checkpointing, selective (the pipeline's collectives and
kernels are what the policy keeps) and full (the pipeline's saved tensors go through the
checkpoint's hooks), and ZeRO-3. G is not part of a checkpoint: a run moves from G = 4 to G = 2
mid-way and stays on the one-process curve.
"""
from __future__ import annotations

import os

import pytest

from support.common import cpu_dims, metrics_rows
from support.curves import LOSS_RTOL, NORM_RTOL, STEPS, curve_config, train_run
from support.spawn import run_distributed
from ulysses_train.parallel import ParallelDims

HEADS = {"n_heads": 16, "n_kv_heads": 4}  # d_model 64: head_dim 4


def _config(curve, parallel, train=None, steps=STEPS):
    cfg = curve_config(curve, parallel, 2, train, steps=steps)
    cfg.model.n_heads, cfg.model.n_kv_heads = HEADS["n_heads"], HEADS["n_kv_heads"]
    return cfg


def _rank(rank, world, parallel, train, curves, run_dir, steps=STEPS):
    out = {}
    for curve in curves:
        cfg = _config(curve, parallel, train, steps)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        dims.build_mesh()
        out[curve] = train_run(cfg, dims, os.path.join(run_dir, curve))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("reference"), {}

    def curve_of(curve):
        if curve not in cache:
            cache[curve] = train_run(_config(curve, {}), cpu_dims(), str(root / curve))
        return cache[curve]
    return curve_of


LAYOUTS = {  # id: (parallel, train, curves)
    "sp4-G4": ({"sp": 4, "ulysses_chunks": 4}, None, ("causal", "documents")),
    "tp2xsp2-G2-selective": ({"tp": 2, "sp": 2, "ulysses_chunks": 2},
                             {"activation_checkpointing": "selective"}, ("documents",)),
    "sp4-G4-zero3-full": ({"sp": 4, "zero": 3, "ulysses_chunks": 4},
                          {"activation_checkpointing": "full"}, ("causal",)),
}


@pytest.mark.parametrize("case", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_head_groups_train_the_one_process_curve(reference, tmp_path, case):
    parallel, train, curves = case
    results = run_distributed(_rank, 4, parallel, train, curves, str(tmp_path), timeout=300)
    for curve in curves:
        ref, got = reference(curve), results[0][curve]
        assert [r["step"] for r in got] == list(range(1, STEPS + 1))
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=LOSS_RTOL), curve
        assert [r["grad_norm"] for r in got] == pytest.approx(
            [r["grad_norm"] for r in ref], rel=NORM_RTOL), curve
        worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(got, ref))
        print(f"{curve}: worst relative loss deviation {worst:.2e}")


def test_checkpoint_moves_between_head_group_counts(reference, tmp_path):
    """8 steps: 4 at sp=4 G=4, then resumed at sp=4 G=2: the one-process curve throughout."""
    run_dir = str(tmp_path / "moved")
    first = {"sp": 4, "ulysses_chunks": 4}
    run_distributed(_moved, 4, first, {"exit_after_steps": 4}, run_dir, timeout=300)
    run_distributed(_moved, 4, {"sp": 4, "ulysses_chunks": 2}, None, run_dir, timeout=300)
    ref, got = reference("causal"), metrics_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=LOSS_RTOL)


def _moved(rank, world, parallel, train, run_dir):
    cfg = _config("causal", parallel, train)  # exit_after_steps saves a checkpoint
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    train_run(cfg, dims, run_dir)
