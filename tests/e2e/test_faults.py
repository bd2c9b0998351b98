"""Fault injection: real training processes, real SIGKILLs, resumed on the same curve.

Every kill is a SIGKILL of a real `python train.py` process: mid-training before any checkpoint
and after a resume (as soon as a metrics row shows the loop running), inside a save before its
commit and between the commit and the `latest` update (a `debug.pause_in_save_*` key parks the
process there and drops a marker file), and inside an async save while training goes on. After
each kill the same command is rerun; every metrics row must equal the uninterrupted run's bit for
bit (CPU, fp32), and the last rerun also falls back past a corrupted `latest`. Corrupt and
incompatible checkpoints given as PATH are refused in the contract's one-line format. A SIGTERM
(polite stop) saves after the current step even with periodic saves off, and exits 0.

Kills and exact resumptions are tallied and printed by the last test.
"""
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from support.common import ROOT, SMALL, flip_byte, metrics_rows, run_train

STEPS = 12
BASE = SMALL + [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=3"]
TALLY = {"kills": 0, "exact_resumes": 0, "polite_stops": 0, "stop_latency_s": None}


def args_for(run_dir, cache, *extra):
    return BASE + [f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


class Reference:
    """The uninterrupted run, started in the background (it overlaps the first kills; there
    are 2 cores) and waited for when its rows or checkpoints are first needed."""

    def __init__(self, run_dir, cache):
        self.run_dir = run_dir
        self.proc = start(run_dir, cache)

    @functools.cached_property
    def rows(self) -> list[dict]:
        finish(self.proc)
        rows = metrics_rows(self.run_dir)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run", cache)
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()


# ---- driving a process ---------------------------------------------------------------------
def start(run_dir, cache, *extra):
    """`python train.py` in the background; output goes to files in the run dir's parent."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    os.makedirs(run_dir.parent, exist_ok=True)
    n = len([f for f in os.listdir(run_dir.parent) if f.startswith("out")])
    out = open(run_dir.parent / f"out{n}.txt", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                             *args_for(run_dir, cache, *extra)],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = out.name
    return proc


def wait_until(proc, ready, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited ({proc.returncode}) too early:\n{output(proc)}"
        assert time.monotonic() < deadline, f"timed out:\n{output(proc)}"
        time.sleep(0.005)


def sigkill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"was not killed:\n{output(proc)}"
    TALLY["kills"] += 1


def finish(proc):
    assert proc.wait(timeout=300) == 0, output(proc)


def output(proc) -> str:
    with open(proc.log_path) as f:
        return f.read()


def logged_steps(run_dir) -> list[int]:
    """Steps of the complete rows of metrics.jsonl so far (a row torn by a kill is skipped)."""
    try:
        with open(run_dir / "metrics.jsonl") as f:
            lines = f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines]


def paused(run_dir):
    return lambda: (run_dir / "debug_paused").exists()


def latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def assert_on_reference(run_dir, reference, proc=None, resumed_from=None):
    """Every row so far equals the reference's, bit for bit; count an exact resumption."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.endswith("\n")]
    ref = {r["step"]: r for r in reference.rows}
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        assert (row["loss"], row["grad_norm"], row["lr"]) == (
            ref[row["step"]]["loss"], ref[row["step"]]["grad_norm"], ref[row["step"]]["lr"])
    if resumed_from is not None:  # "": this rerun started over (no checkpoint yet)
        resumed = f"resumed from {run_dir / 'checkpoints' / resumed_from} at step"
        assert (resumed in output(proc)) if resumed_from else ("resumed from" not in output(proc))
        TALLY["exact_resumes"] += 1
    return rows


# ---- the tests ------------------------------------------------------------------------------
def test_sync_kills_mid_save_before_latest_and_mid_step(tmp_path, cache, reference):
    run_dir, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 0. Mid-training, before the first checkpoint: the rerun starts over on a clean curve.
    p = start(run_dir, cache, "checkpoint.every=0")
    wait_until(p, lambda: logged_steps(run_dir) != [])
    sigkill(p)
    assert not ck.exists()

    # 1. Start over; kill inside the save of step 4: DCP files written, not yet committed.
    p = start(run_dir, cache, "debug.pause_in_save_at_step=4", "debug.pause_in_save_before=commit")
    wait_until(p, paused(run_dir))
    sigkill(p)
    assert latest(run_dir) == "step_00000002"
    assert (ck / ".tmp_step_00000004").is_dir() and not (ck / "step_00000004").exists()
    assert_on_reference(run_dir, reference, p, resumed_from="")
    os.remove(run_dir / "debug_paused")

    # 2. Resume; kill between the commit of step 6 and the `latest` update.
    p = start(run_dir, cache, "debug.pause_in_save_at_step=6", "debug.pause_in_save_before=latest")
    wait_until(p, paused(run_dir))
    sigkill(p)
    assert "removing incomplete checkpoint" in output(p) and "resumed from" in output(p)
    assert not (ck / ".tmp_step_00000004").exists()
    assert latest(run_dir) == "step_00000004" and (ck / "step_00000006" / "manifest.json").exists()
    assert_on_reference(run_dir, reference, p, resumed_from="step_00000002")

    # 3. Resume (from `latest`, one step behind the newest commit); kill mid-training.
    p = start(run_dir, cache)
    wait_until(p, lambda: f"step 5/{STEPS} |" in output(p))
    sigkill(p)
    assert f"moved checkpoint {ck / 'step_00000006'} aside to {ck / 'abandoned' / 'step_00000006'}" \
           f": newer than the step resumed from (4)" in output(p)
    assert_on_reference(run_dir, reference, p, resumed_from="step_00000004")

    # 4. Corrupt the checkpoint `latest` names (one flipped byte): auto warns, names the file,
    # falls back to an older one — and the curve is still the uninterrupted one.
    bad = ck / latest(run_dir) / "__0_0.distcp"
    fallback = max(n for n in os.listdir(ck) if n.startswith("step_") and n != latest(run_dir))
    flip_byte(bad)
    p = start(run_dir, cache)
    finish(p)
    assert f"is corrupt ({bad}: content differs" in output(p)
    assert len(assert_on_reference(run_dir, reference, p, resumed_from=fallback)) == STEPS


def test_async_save_killed_in_flight_never_moves_latest(tmp_path, cache, reference):
    run_dir, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 1. The background save of step 4 is stuck before its commit while training goes on.
    p = start(run_dir, cache, "checkpoint.async_save=true", "debug.pause_in_save_at_step=4")
    wait_until(p, lambda: paused(run_dir)() and max(logged_steps(run_dir)) >= 6)
    sigkill(p)
    assert latest(run_dir) == "step_00000002" and not (ck / "step_00000004").exists()
    assert_on_reference(run_dir, reference)
    os.remove(run_dir / "debug_paused")

    # 2. Resume to the end, async: the same curve as the synchronous uninterrupted run.
    p = start(run_dir, cache, "checkpoint.async_save=true")
    finish(p)
    assert "removing incomplete checkpoint" in output(p)
    assert len(assert_on_reference(run_dir, reference, p, resumed_from="step_00000002")) == STEPS
    assert latest(run_dir) == f"step_{STEPS:08d}"


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path, cache, reference):
    """Polite stop: SIGTERM finishes the step, saves (periodic saves are off) and exits 0."""
    run_dir = tmp_path / "run"
    p = start(run_dir, cache, "checkpoint.every=0")
    wait_until(p, lambda: logged_steps(run_dir) != [])
    os.kill(p.pid, signal.SIGSTOP)  # freeze it mid-run, so the signal surely lands before the end
    os.kill(p.pid, signal.SIGTERM)  # pending until it runs again
    sent = time.monotonic()
    os.kill(p.pid, signal.SIGCONT)
    assert p.wait(timeout=60) == 0, output(p)
    TALLY["stop_latency_s"] = round(time.monotonic() - sent, 2)
    step = max(logged_steps(run_dir))
    assert step < STEPS
    assert f"stopped by SIGTERM after step {step}/{STEPS}, with a checkpoint" in output(p)
    assert latest(run_dir) == f"step_{step:08d}"
    assert len(assert_on_reference(run_dir, reference)) == step  # the curve so far, bit for bit
    TALLY["polite_stops"] += 1
    # Resuming from it is resuming from any checkpoint (above); after a stop signal on one rank
    # of two: tests/e2e/test_stop.py.


def test_corrupt_checkpoint_as_path_is_a_one_line_error(tmp_path, cache, reference):
    step_dir = tmp_path / f"step_{STEPS:08d}"
    assert reference.rows
    shutil.copytree(reference.run_dir / "checkpoints" / step_dir.name, step_dir)
    flip_byte(step_dir / "__0_0.distcp")
    done = run_train(args_for(tmp_path / "run", cache, f"checkpoint.resume={step_dir}"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: checkpoint.resume: {step_dir} is corrupt: "
                                  f"{step_dir / '__0_0.distcp'}: content differs")
    assert "Traceback" not in done.stdout + done.stderr


def test_other_model_shape_is_a_one_line_error(tmp_path, cache, reference):
    assert reference.rows
    step_dir = reference.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    done = run_train(args_for(tmp_path / "run", cache, f"checkpoint.resume={step_dir}",
                              "model.d_model=128", "model.n_layers=3"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == (
        f"error: checkpoint.resume: {step_dir} holds a different model shape: n_layers=2 "
        "(this run: 3), d_model=64 (this run: 128); resume with the same model settings")
    assert "Traceback" not in done.stdout


def test_fault_tally(capsys):
    """Runs last: print what the kills above amounted to (the closing note reports it)."""
    if TALLY["kills"] == 0:
        pytest.skip("no fault test ran")
    with capsys.disabled():
        print(f"\nfault injection: {TALLY['kills']} SIGKILLs and {TALLY['polite_stops']} "
              f"SIGTERMs (exit 0 {TALLY['stop_latency_s']} s after the signal); "
              f"{TALLY['exact_resumes']} resumptions reproduced the uninterrupted losses "
              "bit-exactly")
    assert TALLY["exact_resumes"] >= TALLY["kills"]
