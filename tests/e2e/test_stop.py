"""Polite stop and torchrun restarts.

- In-process: the stop signals set a flag (no exception mid-step), a second Ctrl-C aborts, and
  the previous handlers come back.
- Two gloo ranks, one spawn: only rank 1 receives SIGUSR1, during step 3; both agree, stop after
  step 3 with a checkpoint and return 0; the rerun lands on the uninterrupted 2-rank curve bit
  for bit. That uninterrupted curve is also the reference of the restart test. The same spawn
  checks that a NaN loss on rank 1 alone skips the step on both ranks (guards.py).
- `torchrun --max-restarts=1`: rank 1 dies after step 3 (`debug.crash_at_step`, first attempt
  only); torchrun restarts both ranks, which resume from `latest` (step 2) on the same curve.
- scripts/slurm_train.sh parses, and every torchrun flag it uses exists in this torch.
The single-process SIGTERM of a real `python train.py` is in test_faults.py.
"""
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from support.common import ROOT, SMALL, metrics_rows, run_torchrun, small_config
from support.spawn import run_distributed
from ulysses_train.parallel import ParallelDims
from ulysses_train.train.stop import StopSignals
from ulysses_train.train.trainer import Trainer

STEPS = 6


def _deliver(sig):
    """Send `sig` to this process and give Python a moment to run its handler."""
    os.kill(os.getpid(), sig)
    for _ in range(100):
        time.sleep(0.001)


def test_signals_set_a_flag_and_handlers_come_back():
    cpu = torch.device("cpu")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with StopSignals() as stop:
        assert stop.agree(False, cpu) is None
        _deliver(signal.SIGTERM)
        assert stop.agree(False, cpu) == "SIGTERM"
        _deliver(signal.SIGUSR1)  # a repeated request changes nothing
        assert stop.agree(False, cpu) == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C aborts at once
            _deliver(signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def _config(**checkpoint):
    return small_config(train={"steps": STEPS}, checkpoint={"every": 0, **checkpoint})


def _two_ranks(rank, world, root):
    """The uninterrupted run, then a run stopped by a signal on rank 1 only, then its rerun."""
    cfg = _config()
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    Trainer(cfg, os.path.join(root, "straight"), dims).fit()

    stopped = Trainer(cfg, os.path.join(root, "stopped"), dims)
    if rank == 1:  # the signal lands in step 3, on this rank only
        step = stopped.train_step

        def step_then_signal():
            out = step()
            if stopped.step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            return out

        stopped.train_step = step_then_signal
    code = stopped.fit()
    steps_before_rerun = stopped.step
    Trainer(cfg, os.path.join(root, "stopped"), dims).fit()

    # The non-finite guard decides alike on every rank: a NaN on rank 1 alone skips step 2 on both.
    nan_cfg = _config()
    nan_cfg.debug.nan_at_step = 2 if rank == 1 else 0
    guarded = Trainer(nan_cfg, os.path.join(root, "nan"), dims)
    guarded.fit()
    weights = torch.cat([p.detach().flatten() for p in guarded.model.parameters()])
    return code, steps_before_rerun, guarded.guard.total, weights


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_ranks")
    results = run_distributed(_two_ranks, 2, str(root), timeout=180)
    return root, results


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(two_ranks):
    root, results = two_ranks
    # exit code 0 and stopped after step 4 on both ranks: the agreement on a request made in
    # step 3 is read one step later (train/stop.py: no rank waits for it)
    assert [(code, step) for code, step, _, _ in results] == [(0, 4), (0, 4)]
    ck = root / "stopped" / "checkpoints"
    assert (ck / "step_00000004" / "manifest.json").exists()
    straight, rerun = metrics_rows(root / "straight"), metrics_rows(root / "stopped")
    assert [r["step"] for r in rerun] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"]) for r in rerun] == \
        [(r["loss"], r["grad_norm"]) for r in straight]  # bit-exact


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    root, results = two_ranks
    assert [skipped for _, _, skipped, _ in results] == [1, 1]
    assert torch.equal(results[0][3], results[1][3])  # the replicas stayed identical
    rows = metrics_rows(root / "nan")
    assert [r["skipped"] for r in rows] == [False, True] + [False] * (STEPS - 2)


def test_torchrun_restarts_a_crashed_worker_and_resumes(tmp_path, two_ranks):
    run_dir = tmp_path / "run"
    args = SMALL + [f"train.steps={STEPS}", "checkpoint.every=2", "debug.crash_at_step=3",
                    f"hydra.run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]
    # torch >= 2.5 shares the launcher's store with the workers and keeps it across restarts, so
    # restarted workers would read the dead ones' addresses: a restart needs this (docs/fault-tolerance.md).
    done = run_torchrun(2, args, launcher_args=["--max-restarts=1"],
                        env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "debug: crashing rank 1 after step 3" in output
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in output
    straight = metrics_rows(two_ranks[0] / "straight")
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"]) for r in rows] == \
        [(r["loss"], r["grad_norm"]) for r in straight]  # bit-exact across the restart


def test_slurm_script_parses_and_torchrun_knows_its_flags():
    script = os.path.join(ROOT, "scripts", "slurm_train.sh")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    launch = text[text.index("torchrun \\"):text.index('train.py "$@"')]
    flags = set(re.findall(r"(--[\w-]+)=", launch))
    from torch.distributed.run import get_args_parser

    known = {opt for action in get_args_parser()._actions for opt in action.option_strings}
    assert flags <= known, flags - known
    assert {"--max-restarts", "--signals-to-handle", "--shutdown-timeout", "--rdzv-backend",
            "--rdzv-endpoint"} <= flags
    for needed in ("--signal=B:USR1@120", "scontrol requeue",
                   "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        assert needed in text
