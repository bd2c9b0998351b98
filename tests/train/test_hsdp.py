"""Hybrid sharding (`parallel.shard_group`): validation, and checkpoints that move between HSDP,
plain ZeRO and one process.

The HSDP loss curves against one process live with the other layouts in
tests/train/test_trainer_parallel.py (the "hsdp-*" LAYOUTS), the per-rank state bytes in its
test_zero_stages_shard_state_per_rank, and the collective counts in
tests/parallel/test_grad_comm.py.
"""
from __future__ import annotations

import pytest

from support.common import cpu_dims, metrics_rows, run_train, small_config
from support.curves import LOSS_RTOL, curve_config, train_run, train_until
from support.spawn import run_distributed
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.validate import validate

BAD = {  # id: (parallel overrides, world size, words the message must have)
    "not-a-divisor": ({"sp": 2, "zero": 2, "shard_group": 4}, 6, "does not divide the dp x sp"),
    "splits-an-sp-group": ({"sp": 2, "zero": 3, "shard_group": 1}, 4, "multiple of 2"),
    "without-sharding": ({"sp": 2, "zero": 0, "shard_group": 2}, 4, "parallel.zero=2 or 3"),
    "negative": ({"zero": 2, "shard_group": -2}, 4, "0 / -1 for the whole dp x sp group"),
    # the whole group at zero=0: the key would do nothing, silently (a fresh user's case)
    "whole-group-without-sharding": ({"sp": 2, "zero": 0, "shard_group": 4}, 4,
                                     "parallel.zero=2 or 3"),
}


@pytest.mark.parametrize("parallel,world,words", BAD.values(), ids=BAD.keys())
def test_bad_shard_group_is_refused(parallel, world, words):
    with pytest.raises(ConfigError) as info:
        validate(small_config(parallel=parallel, train={"global_batch_size": 12,
                                                         "micro_batch_size": 1}), world)
    assert info.value.key == "parallel.shard_group"
    assert words in info.value.message


@pytest.mark.parametrize("parallel,world", [
    ({"sp": 2, "zero": 2, "shard_group": 2}, 4),  # replicate 2 x shard 2 (one sp group)
    ({"sp": 2, "zero": 3, "shard_group": 4}, 8),  # shard groups of two sp groups
    ({"sp": 2, "zero": 2, "shard_group": 4}, 4),  # the whole dp x sp group: plain ZeRO
    ({"zero": 0, "shard_group": -1}, 4),
])
def test_good_shard_group_is_accepted(parallel, world):
    validate(small_config(parallel=parallel, train={"global_batch_size": 8,
                                                     "micro_batch_size": 1}), world)


def test_bad_shard_group_fails_before_any_process_group(small_args):
    """train.py under a 4-rank launch's WORLD_SIZE (no peers exist: a process group would
    hang until the rendezvous timeout): one error line, exit 2."""
    done = run_train(small_args + ["parallel.sp=2", "parallel.zero=0", "parallel.shard_group=2"],
                     env={"WORLD_SIZE": "4", "RANK": "0"}, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: parallel.shard_group: "), lines
    assert "parallel.zero=2 or 3" in lines[0]


HSDP = {"sp": 2, "dp": 2, "zero": 3, "shard_group": 2}
ZERO2 = {"sp": 2, "dp": 2, "zero": 2}


def test_checkpoints_reshard_between_hsdp_zero_and_one_process(tmp_path):
    """12 steps in four legs, each resuming the previous leg's checkpoint: one process (1-3) ->
    HSDP replicate 2 x shard 2 at ZeRO-3 (4-6) -> plain ZeRO-2 over dp x sp = 4 (7-9) -> one
    process (10-12). The curve equals the uninterrupted one-process curve: every save is loaded
    under another layout (one -> HSDP, HSDP -> ZeRO, ZeRO -> one). Catches a replicated shard
    saved or loaded as if it were distinct, or optimizer moments lost on a move."""
    straight = tmp_path / "straight"
    train_run(curve_config("causal", {}, 2, steps=12), cpu_dims(), str(straight), uneven=False)
    run_dir = str(tmp_path / "moved")
    one_leg = curve_config("causal", {}, 2, {"exit_after_steps": 3}, steps=12)
    train_run(one_leg, cpu_dims(), run_dir, uneven=False)
    run_distributed(train_until, 4, HSDP, 12, 3, run_dir, timeout=300)
    run_distributed(train_until, 4, ZERO2, 12, 3, run_dir, timeout=300)
    train_run(curve_config("causal", {}, 2, steps=12), cpu_dims(), run_dir, uneven=False)
    ref, got = metrics_rows(straight), metrics_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), a["step"]
