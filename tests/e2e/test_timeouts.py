"""A rank that stalls or dies must not leave its peers hanging (parallel.timeout_s).

Two `python train.py` processes are started by hand with RANK/WORLD_SIZE/MASTER_* set, as a
cluster scheduler would, NOT under torchrun: torchrun's agent kills every worker as soon as one
exits, so a test under it would pass without the feature. Rank 1 is stopped (SIGSTOP: alive but
silent, like a hung GPU or a swapped-out node) or killed mid-run; rank 0 must exit non-zero on
its own, within parallel.timeout_s + 10 s (stall) or 10 s (death), with one error line and no
traceback. What each test catches is said in its docstring.

Also here: the torch version check at import (an older torch fails with one line).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from support.common import ROOT

TIMEOUT_S = 5
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=8", "model.n_kv_heads=2",
        "model.ffn_hidden=128", "model.vocab_size=256", "data=synthetic", "data.seq_len=64",
        "train.global_batch_size=2", "train.micro_batch_size=1", "train.precision=fp32",
        "train.steps=100000", "train.val_every=0", "checkpoint.every=0", "logging.every=1",
        "logging.progress=false", "logging.wandb.mode=disabled",
        f"parallel.timeout_s={TIMEOUT_S}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(tmp_path) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = []
    for rank in range(2):
        out = open(tmp_path / f"rank{rank}.out", "w")
        err = open(tmp_path / f"rank{rank}.err", "w")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), *TINY,
             f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=ROOT, stdout=out, stderr=err,
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
    return procs


def _read(tmp_path, name) -> str:
    return (tmp_path / name).read_text()


def _wait_for_training(procs, tmp_path, deadline_s=120.0) -> None:
    """Until rank 0 has logged step 2: both ranks are then in the training loop."""
    deadline = time.monotonic() + deadline_s
    while "step 2/" not in _read(tmp_path, "rank0.err"):  # the log goes to stderr
        for rank, proc in enumerate(procs):
            assert proc.poll() is None, (f"rank {rank} exited early ({proc.returncode}):\n"
                                         + _read(tmp_path, f"rank{rank}.err"))
        assert time.monotonic() < deadline, "training did not start:\n" + _read(tmp_path, "rank0.err")
        time.sleep(0.05)


def _signal_rank1_and_wait_rank0(tmp_path, sig, limit_s) -> tuple[int, str]:
    """Send `sig` to rank 1 mid-run; return rank 0's exit code and stderr.

    Rank 0 must exit within `limit_s` of the signal: the test's own deadline, so a missing
    timeout fails in seconds instead of hanging for torch's default. Both processes are gone
    afterwards, whatever happens.
    """
    procs = _start_ranks(tmp_path)
    try:
        _wait_for_training(procs, tmp_path)
        os.kill(procs[1].pid, sig)
        try:
            code = procs[0].wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {limit_s} s after rank 1 got {sig.name}:\n"
                        + _read(tmp_path, "rank0.err")[-2000:])
        return code, _read(tmp_path, "rank0.err")
    finally:
        for proc in procs:  # our own children, by handle: wake a stopped one so it can die
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=30)


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines


def test_stalled_rank_ends_its_peer_within_the_timeout(tmp_path):
    """Catches: parallel.timeout_s not reaching the process group (rank 0 would wait torch's
    10-30 min default: the deadline fails the test), and a timeout surfacing as a traceback."""
    # Only an upper bound: rank 0 may already have been waiting in the collective when rank 1
    # stopped, and the timeout counts from the start of that wait.
    code, stderr = _signal_rank1_and_wait_rank0(tmp_path, signal.SIGSTOP, TIMEOUT_S + 10)
    assert code != 0, stderr[-3000:]
    (line,) = _error_lines(stderr)
    # Which collective rank 0 was in when rank 1 stopped depends on timing (DDP's gradient
    # all-reduce in backward, the loss all-reduce, or the log line's peak-memory all-gather):
    # the message must name one, never our calling function (CI once saw "train_step").
    assert re.match(r"error: parallel\.timeout_s: collective (all_reduce|all_gather|"
                    r"reduce_scatter|broadcast|barrier|wait_tensor)\w* ", line), line
    assert f"waited {TIMEOUT_S} s for rank 1, which stalled or died" in line, line


def test_killed_rank_ends_its_peer_at_once(tmp_path):
    """Catches: a lost peer surfacing as a traceback (or a hang) instead of one line."""
    code, stderr = _signal_rank1_and_wait_rank0(tmp_path, signal.SIGKILL, 10)
    assert code != 0, stderr[-3000:]
    (line,) = _error_lines(stderr)
    assert "lost its connection to rank 1" in line and "that rank died" in line, line


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_old_torch_fails_at_import_with_one_line():
    """Catches: an old torch getting past import and failing later, deep in a traceback."""
    fake = "import torch; torch.__version__ = '2.7.1+cu126'; "
    result = _python(fake + "import ulysses_train")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: ulysses_train needs torch>=2.8, found 2.7.1+cu126: pip install 'torch>=2.8'")
    # train.py turns it into the one line, without a traceback.
    result = _python(fake + "import runpy, sys; sys.argv = ['train.py']; "
                     "runpy.run_path('train.py', run_name='__main__')")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: ulysses_train needs torch>=2.8, found 2.7.1+cu126: "
                                     "pip install 'torch>=2.8'")


@pytest.mark.parametrize("version,ok", [("2.7.1", False), ("1.13.1", False), ("2.8.0", True),
                                        ("2.8.0a0+git1234", True), ("2.13.0+cpu", True),
                                        ("10.0.0", True)])
def test_torch_version_check(version, ok):
    from ulysses_train import check_torch

    if ok:
        check_torch(version)
    else:
        with pytest.raises(ImportError, match=r"needs torch>=2\.8"):
            check_torch(version)


def test_bad_timeout_is_refused_in_one_line():
    from support.common import run_train

    result = run_train(["parallel.timeout_s=0"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: parallel.timeout_s: must be a positive number, got 0.0"
