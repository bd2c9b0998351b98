"""The planner honours parallel.shard_group (hybrid sharding, HSDP).

Memory: ZeRO divides parameters, gradients and AdamW state by the shard group n, not dp x sp, so
an HSDP rank holds what a plain-ZeRO rank of an n-rank job holds. Time: replicas > 1 adds the
all-reduce of each rank's fp32 gradient shard across the replicas. Search: the user's value is
fixed, shown, and when it suits no layout the error names it. Pure arithmetic and in-process CLI
calls (no process group): well under a second each.
"""
import json

import pytest

from support.common import SMALL, small_config
from ulysses_train.cli import plan as plan_cli
from ulysses_train.config.validate import validate
from ulysses_train.plan.memory import (
    FP32,
    grad_bytes,
    optimizer_bytes,
    param_bytes,
    predict,
)
from ulysses_train.plan.shapes import shapes_of
from ulysses_train.plan.timing import Links, step_time

MODEL = {"n_layers": 4, "d_model": 128, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 352,
         "vocab_size": 256}


def _cfg(sp: int, zero: int, shard_group: int = 0, rows: int = 4, seq: int = 64):
    return small_config(model=MODEL, data={"seq_len": seq},
                        parallel={"sp": sp, "zero": zero, "shard_group": shard_group},
                        train={"micro_batch_size": 1, "global_batch_size": rows})


def test_hsdp_rank_holds_the_state_of_a_plain_zero_rank_of_the_group_size():
    """sp=2 x dp=4 with shard_group=4 (replicas 2) predicts exactly what sp=2 x dp=2 plain ZeRO-3
    on 4 ranks predicts: same tokens per rank, same 4-way shards."""
    hsdp = shapes_of(_cfg(2, 3, shard_group=4, rows=4), 8, "cpu")
    plain = shapes_of(_cfg(2, 3, rows=2), 4, "cpu")
    assert (hsdp.n_shard, hsdp.replicas, plain.n_shard, plain.replicas) == (4, 2, 4, 1)
    assert predict(hsdp, "cpu") == predict(plain, "cpu")


def test_hsdp_adds_exactly_the_unsharded_half_of_the_model_state():
    """shard_group = dp x sp / 2 doubles each rank's share of the fp32 master weights (4 B/param),
    gradients (4) and AdamW moments (8) (ZeRO, Rajbhandari et al. 2020). At a peak where every
    gradient exists (the backward of block 0, the last), the predicted per-rank peak grows by
    exactly 16 B x N x (1/4 - 1/8); nothing that is not sharded changes."""
    plain, hsdp = (shapes_of(_cfg(2, 3, shard_group=g, rows=4, seq=16), 8, "cpu") for g in (0, 4))
    N = plain.params()
    for nbytes, fn in ((FP32, param_bytes), (2 * FP32, optimizer_bytes),
                       (FP32, lambda sh: grad_bytes(sh, sh.L, True))):
        assert fn(hsdp) - fn(plain) == nbytes * N // 4 - nbytes * N // 8
    a, b = predict(plain, "cpu"), predict(hsdp, "cpu")
    assert a.phase == b.phase == "backward, block 0"
    assert b.total - a.total == 16 * N // 4 - 16 * N // 8 > 0


def test_replica_all_reduce_only_with_replicas_and_at_its_ring_cost():
    """Replicas r = 2: 4 B x N / n per rank at 2 (r - 1) / r over the inter-node link (4 GPUs a
    node: the shard group of 4 is one node, the replicas are two). No term at r = 1."""
    links = Links(gpus_per_node=4, intra_gbps=7200.0, inter_gbps=400.0)
    plain_cfg, hsdp_cfg = _cfg(2, 3, rows=4), _cfg(2, 3, shard_group=4, rows=4)
    plain = step_time(plain_cfg, shapes_of(plain_cfg, 8), 8, 360.0, links).comm
    sh = shapes_of(hsdp_cfg, 8)
    hsdp = step_time(hsdp_cfg, sh, 8, 360.0, links).comm
    assert not any(k.startswith("hsdp") for k in plain)
    r, n = 2, 4
    expected = FP32 * sh.params() / n * 2 * (r - 1) / r / (400.0e9 / 8)
    total = hsdp["hsdp replica all-reduce"][0] + hsdp["hsdp replica hidden"][0]
    assert total == pytest.approx(expected, rel=1e-12)
    # the in-group collectives now stay on the node's link: faster than over all 8 ranks
    in_group = sum(hsdp[k][0] for k in ("zero all-gather + reduce-scatter", "zero hidden"))
    assert in_group < sum(plain[k][0] for k in ("zero all-gather + reduce-scatter", "zero hidden"))


PLAN = SMALL + ["plan.gpus=8", "plan.gpu_mem_gib=80", "plan.format=json"]


def test_user_shard_group_is_fixed_shown_and_in_the_command(capsys):
    assert plan_cli.main(PLAN + ["parallel.shard_group=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    valid = [x for x in out["layouts"] if "peak_gib" in x]
    assert valid and all(x["shard_group"] == 4 for x in out["layouts"])
    assert all((x["dp"] * x["sp"]) % 4 == 0 and 4 % x["sp"] == 0 for x in valid)
    best = out["best"]
    cfg = small_config(parallel={k: best[k] for k in ("tp", "sp", "ring", "dp", "zero")
                                 } | {"shard_group": 4},
                       train={"micro_batch_size": best["micro_batch_size"]})
    validate(cfg, 8)
    assert best["command"].split().count("parallel.shard_group=4") == 1


def test_shard_group_no_layout_takes_is_one_line_naming_it(capsys):
    with pytest.raises(SystemExit) as info:
        plan_cli.main(PLAN + ["parallel.shard_group=3"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: parallel.shard_group: 3 suits no layout of 8 GPUs"), err
    sizes = [int(k) for k in err.split("sizes these layouts take: ")[1].split(", ")]
    for k in sizes:  # each size the line suggests is one the plan then accepts
        assert plan_cli.main(PLAN + [f"parallel.shard_group={k}"]) == 0


def test_a_shard_group_no_layout_could_take_is_refused_as_a_value(capsys):
    """-2 is invalid for every layout: train.py's own line, not "suits no layout (e.g. ...)"."""
    with pytest.raises(SystemExit) as info:
        plan_cli.main(PLAN + ["parallel.shard_group=-2"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err == ("error: parallel.shard_group: must be a positive group size, or 0 / -1 for "
                   "the whole dp x sp group, got -2"), err  # no group size: none is chosen yet


def test_parallel_auto_logs_the_shard_group():
    from ulysses_train.cli import compose as cli
    from ulysses_train.plan.auto import resolve

    args = SMALL + ["parallel.auto=true", "plan.gpu_mem_gib=1", "parallel.shard_group=2"]
    cfg, line = resolve(cli.compose(args), args, 4)
    assert "parallel.shard_group=2" in line and cfg.parallel.shard_group == 2
    validate(cfg, 4)


def test_a_shard_group_that_is_the_whole_group_is_pointed_out(capsys):
    """tp=2 on 4 GPUs leaves dp x sp = 2: shard_group=2 is then one group, plain ZeRO, which a
    user asking for hybrid sharding would not expect (a fresh user's case)."""
    args = [a for a in PLAN if a not in ("plan.gpus=8", "plan.format=json")
            and not a.startswith("train.micro_batch_size")] + ["train.micro_batch_size=1"]
    assert plan_cli.main(args + ["plan.gpus=4", "parallel.tp=2", "parallel.shard_group=2"]) == 0
    out = capsys.readouterr().out
    assert "note: parallel.shard_group=2 is this layout's whole dp x sp group" in out, out
    assert plan_cli.main(args + ["plan.gpus=4", "parallel.shard_group=2", "parallel.sp=1",
                                 "parallel.tp=1"]) == 0  # dp=4: two groups of 2, replicas
    assert "note: parallel.shard_group" not in capsys.readouterr().out
