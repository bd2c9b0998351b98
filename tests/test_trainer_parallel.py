"""Whole training runs under dp x sp layouts equal the one-process loss curve (DESIGN §2 parity).

Every layout trains 8 steps twice in one spawn — on plain synthetic data and on data whose valid
label counts differ between rows, ranks and micro-batches (helpers.UnevenLabels), where a mean of
per-rank or per-micro-batch means would visibly disagree with the one-process curve.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from distributed import run_distributed
from helpers import UnevenLabels, cpu_dims, metrics_rows, run_torchrun, small_config
from ulysses_train.parallel import ParallelDims
from ulysses_train.trainer import Trainer

STEPS = 8


def _config(parallel: dict, micro: int, train: dict | None = None):
    return small_config(parallel=parallel, data={"seq_len": 64}, checkpoint={"every": 0},
                        train={"steps": STEPS, "micro_batch_size": micro, **(train or {})})


def _train(cfg, dims, run_dir, uneven: bool):
    trainer = Trainer(cfg, run_dir, dims)
    if uneven:
        trainer.data = UnevenLabels(trainer.data)
    trainer.fit()
    return metrics_rows(run_dir) if dims.is_main else None


def _layout_rank(rank, world, parallel, micro, train, run_dir):
    cfg = _config(parallel, micro, train)
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    # With memory options only the uneven data (the stricter check): the plain curve of the
    # same layout adds nothing those options could break, and a spawn costs ~20 s here.
    return {uneven: _train(cfg, dims, os.path.join(run_dir, str(uneven)), uneven)
            for uneven in ((True,) if train else (False, True))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process curves, computed once for every layout test."""
    root = tmp_path_factory.mktemp("reference")
    return {uneven: _train(_config({}, 2), cpu_dims(), str(root / str(uneven)), uneven)
            for uneven in (False, True)}


# Memory options (checkpointing, offload, tiles of 8 of the 16-32 local tokens) change what is
# kept, never the function: under parallelism too they must give the plain reference curve.
SELECTIVE_TILED = {"activation_checkpointing": "selective", "loss_chunk": 8, "mlp_chunk": 8}
FULL_OFFLOAD = {"activation_checkpointing": "full", "activation_offload": True,
                "loss_chunk": 8, "mlp_chunk": 8}
LAYOUTS = {  # id: (world, parallel overrides, micro-batch size, train overrides)
    "sp4": (4, {"sp": 4}, 2, None),
    "sp2xdp2": (4, {"sp": 2, "dp": 2}, 2, None),
    "sp2-micro1": (2, {"sp": 2}, 1, None),  # another micro-batching than the reference's 2
    "tp2": (2, {"tp": 2}, 2, None),
    "tp2xdp2-zero2-micro1": (4, {"tp": 2, "dp": 2, "zero": 2}, 1, None),  # params kept across micro
    # The two layouts below carry the memory options (the plain paths of sp, tp and ZeRO-3 are
    # covered above); tp2xsp2 has 1 local kv head per tp rank, replicated over sp.
    "tp2xsp2-selective-tiled": (4, {"tp": 2, "sp": 2}, 2, SELECTIVE_TILED),
    "sp2xdp2-zero3-full-offload": (4, {"sp": 2, "dp": 2, "zero": 3}, 2, FULL_OFFLOAD),
}


@pytest.mark.parametrize("world,parallel,micro,train", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_loss_curve_equals_one_process(reference, tmp_path, world, parallel, micro, train):
    results = run_distributed(_layout_rank, world, parallel, micro, train, str(tmp_path),
                              timeout=180)
    for uneven in results[0]:
        ref, got = reference[uneven], results[0][uneven]
        assert [r["step"] for r in got] == list(range(1, STEPS + 1))
        for a, b in zip(ref, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (uneven, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
            assert b["tokens"] == a["tokens"]  # each token counted once, not once per sp rank
            assert len(b["peak_mem_gib_per_rank"]) == world
            assert b["peak_mem_gib"] == max(b["peak_mem_gib_per_rank"])
    # The uneven data is not a no-op: its curve differs from the plain one.
    assert reference[True][0]["loss"] != pytest.approx(reference[False][0]["loss"], rel=1e-3)


def _train_until(rank, world, parallel, steps, exit_after, run_dir):
    cfg = small_config(parallel=parallel, data={"seq_len": 64}, checkpoint={"every": 0},
                       train={"steps": steps, "exit_after_steps": exit_after})
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    Trainer(cfg, run_dir, dims).fit()


def test_checkpoint_reshards_across_layouts(tmp_path):
    """Saved under sp=4 at step 6 of 12, resumed as tp=2 x dp=2 with ZeRO-3 to step 12: the
    curve is the uninterrupted one-process 12-step curve (DCP reshards on load)."""
    straight = tmp_path / "straight"
    Trainer(small_config(data={"seq_len": 64}, checkpoint={"every": 0}, train={"steps": 12}),
            str(straight), cpu_dims()).fit()
    run_dir = str(tmp_path / "moved")
    run_distributed(_train_until, 4, {"sp": 4}, 12, 6, run_dir, timeout=180)
    run_distributed(_train_until, 4, {"tp": 2, "dp": 2, "zero": 3}, 12, 0, run_dir, timeout=180)
    ref, got = metrics_rows(straight), metrics_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]


def _state_bytes_by_zero(rank, world):
    return {zero: _state_bytes(rank, world, zero) for zero in (0, 2, 3)}


def _state_bytes(rank, world, zero):
    """Per-rank bytes of parameters, gradients and optimizer state after one step."""
    cfg = small_config(parallel={"dp": world, "zero": zero}, data={"seq_len": 64},
                       train={"steps": 1, "micro_batch_size": 1}, checkpoint={"resume": "never"})
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    trainer = Trainer(cfg, "/nonexistent-run-dir", dims)
    trainer.train_step()

    def local_bytes(tensors):
        return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)

    params = list(trainer.model.parameters())
    optim = [v for state in trainer.optimizer.state.values() for v in state.values()
             if isinstance(v, torch.Tensor) and v.ndim > 0]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "optim": local_bytes(optim)}


def test_zero_stages_shard_state_per_rank():
    """ZeRO-2 shards gradients and optimizer state ~1/dp_sp; ZeRO-3 the parameters too."""
    by_zero = run_distributed(_state_bytes_by_zero, 4)[0]
    print("per-rank bytes at dp_sp=4:", by_zero)
    full = by_zero[0]
    for zero in (2, 3):
        assert by_zero[zero]["optim"] <= 0.3 * full["optim"]
    # FSDP2 frees the unsharded parameters after backward in both stages; the gradients it
    # leaves are the reduce-scattered shards.
    assert by_zero[3]["params"] <= 0.3 * full["params"]
    assert by_zero[3]["grads"] <= 0.3 * full["grads"]


def test_torchrun_sp2_trains_and_resumes(tmp_path, small_args):
    """The user's command line: torchrun, Ulysses over 2 ranks, stopped and resumed."""
    args = small_args + ["parallel.sp=2", "train.steps=4"]
    first = run_torchrun(2, args + ["train.exit_after_steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "layout: dp=1 sp=2 tp=1 (2 ranks, gloo)" in first.stdout
    second = run_torchrun(2, args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert [r["step"] for r in metrics_rows(tmp_path / "run")] == [1, 2, 3, 4]


def test_torchrun_bad_layout_is_one_clean_line(small_args):
    """Every rank fails validation; rank 0 reports first (the others wait, cli.fail), so the
    launcher cannot stop it before its line is out."""
    done = run_torchrun(2, small_args + ["parallel.sp=4"])
    assert done.returncode == 1  # the launcher's own exit code and summary (DESIGN §2)
    assert re.search(r"exitcode\s*:\s*2\b", done.stderr)  # rank 0, the root cause: exit 2
    # torchrun may route worker stderr through its own streams: look at both.
    output = (done.stdout + done.stderr).splitlines()
    errors = [line for line in output if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: parallel.sp: "), output
    # No worker traceback: the only one allowed is torchrun's, after its failure summary.
    assert "ulysses_train" not in "\n".join(line for line in output if "File " in line)


def _masked_config(parallel: dict):
    return small_config(parallel=parallel, data={"seq_len": 64, "document_mask": True},
                        checkpoint={"every": 0}, train={"steps": 4})


def _masked_rank(rank, world, run_dir):
    cfg = _masked_config({"tp": 2, "sp": 2})
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    Trainer(cfg, run_dir, dims).fit()


def test_document_mask_curve_equals_one_process(tmp_path):
    """The trainer's mask wiring: global document ids per micro-batch, restarting positions;
    tp=2 x Ulysses sp=2 gives the one-process masked curve, which differs from the unmasked."""
    Trainer(_masked_config({}), str(tmp_path / "one"), cpu_dims()).fit()
    run_distributed(_masked_rank, 4, str(tmp_path / "tp2xsp2"), timeout=180)
    plain = tmp_path / "plain"
    Trainer(small_config(data={"seq_len": 64}, checkpoint={"every": 0}, train={"steps": 4}),
            str(plain), cpu_dims()).fit()
    ref, got = metrics_rows(tmp_path / "one"), metrics_rows(tmp_path / "tp2xsp2")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    assert metrics_rows(plain)[-1]["loss"] != pytest.approx(ref[-1]["loss"], rel=1e-4)
