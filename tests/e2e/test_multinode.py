"""Two "nodes" on one machine: two torchrun launchers joined by a c10d rendezvous.

Each launcher is docs/fault-tolerance.md's multi-node command (`torchrun --nnodes=2 --nproc-per-node=2
--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT --rdzv-id=ID --max-restarts=1 train.py ...`;
torchrun reads `--nproc_per_node` and `--nproc-per-node` alike, and this is the spelling of
scripts/slurm_train.sh), started twice; sequence parallel
sp=2 inside each node (ranks 2n, 2n+1) and HSDP across the nodes (parallel.shard_group=2:
ZeRO-2 shards within a node, replicas across).
- The 8-step curve equals one process (<= 1e-4 relative), and the run dir holds one metrics row
  per step and one checkpoint per save although two launchers (and 4 ranks) share it.
- Then the same job again, and once step 3 is logged both workers of one "node" are SIGKILLed:
  both launchers restart (--max-restarts=1), the job resumes from `latest` and its curve equals
  the uninterrupted multi-node one bit for bit (the launcher's shared store must be off:
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, cli/job.py restart_warning).
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

from support.common import ROOT, SMALL, cpu_dims, metrics_rows, small_config
from support.curves import train_run

STEPS = 8
# seq_len 128 (4 x SMALL's) so that a step outlasts the kill's polling by a wide margin
ARGS = SMALL + [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=4",
                "data.seq_len=128", "parallel.sp=2", "parallel.zero=2", "parallel.shard_group=2"]
CURVE_RTOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_flags(port: int, run_id: str) -> list[str]:
    return ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}", "--max-restarts=1"]


def _launch(port: int, run_id: str, run_dir, log_path) -> subprocess.Popen:
    """One "node": docs/fault-tolerance.md's command with this machine as the rendezvous host."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", *_launcher_flags(port, run_id),
           os.path.join(ROOT, "train.py"), *ARGS, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a launcher's workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: ppid
                found.append(int(entry))
    return found


def _logged_steps(run_dir) -> list[int]:
    """Steps in metrics.jsonl so far ([] before it exists or while a line is half written)."""
    try:
        return [r["step"] for r in metrics_rows(run_dir)]
    except (OSError, ValueError):
        return []


def _run_two_nodes(tmp_path, name: str, kill_after_step: int = 0):
    """Start both launchers; if asked, SIGKILL the second one's workers once a metrics row of
    `kill_after_step` exists. Returns (run_dir, combined log text)."""
    run_dir, port = tmp_path / name, _free_port()
    logs = [tmp_path / f"{name}-node{i}.log" for i in (0, 1)]
    nodes = [_launch(port, f"{name}-{port}", run_dir, log) for log in logs]
    killed = []
    try:
        deadline = time.monotonic() + 240
        while kill_after_step and not killed and time.monotonic() < deadline:
            steps = _logged_steps(run_dir)
            if steps and steps[-1] >= kill_after_step:
                killed = _children(nodes[1].pid)
                for pid in killed:  # real SIGKILLs of one node's workers, by pid
                    os.kill(pid, signal.SIGKILL)
                assert steps[-1] < STEPS, "the job ended before the kill"
            assert nodes[0].poll() is None or killed, "a launcher ended before the kill"
            time.sleep(0.02)
        codes = [node.wait(timeout=max(1, deadline - time.monotonic())) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # its own session: launcher and workers
    text = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0], text[-4000:]
    assert not kill_after_step or len(killed) == 2, killed
    return run_dir, text


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted two-node run (the restart test's reference) and its log."""
    return _run_two_nodes(tmp_path_factory.mktemp("multinode"), "straight")


def test_two_nodes_train_like_one_process(straight, tmp_path):
    run_dir, text = straight
    assert "layout: dp=2 sp=2 tp=1 zero=2 shard_group=2 (4 ranks, gloo)" in text  # HSDP on
    # The same config as ARGS without parallel.*, in this process (no second start-up)
    one = small_config(train={"steps": STEPS}, data={"seq_len": 128},
                       checkpoint={"every": 0})
    ref = train_run(one, cpu_dims(), str(tmp_path / "one"), uneven=False)
    got = metrics_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one row per step: rank 0's
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=CURVE_RTOL), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=CURVE_RTOL), a["step"]
    worst = max(abs(b[k] / a[k] - 1) for a, b in zip(ref, got) for k in ("loss", "grad_norm"))
    print(f"two nodes vs one process: largest relative difference {worst:.1e}")
    saves = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name != "latest")
    assert saves == [f"step_{s:08d}" for s in range(2, STEPS + 1, 2)]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert text.count("run dir: ") == 1  # only rank 0 speaks (and writes .hydra/, metrics)


def test_a_killed_node_restarts_and_resumes_bit_exactly(straight, tmp_path):
    run_dir, text = _run_two_nodes(tmp_path, "killed", kill_after_step=3)
    assert "resumed from" in text, text[-4000:]
    ref, got = metrics_rows(straight[0]), metrics_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"]) for r in got] == \
        [(r["loss"], r["grad_norm"]) for r in ref]  # bit-exact across the restart


def test_slurm_script_launches_with_the_tested_flags():
    """scripts/slurm_train.sh passes every launcher flag this test runs (its own values)."""
    text = open(os.path.join(ROOT, "scripts", "slurm_train.sh")).read()
    launch = text[text.index("torchrun \\"):text.index('train.py "$@"')]
    tested = {flag.split("=")[0] for flag in _launcher_flags(0, "x")}
    assert tested <= set(re.findall(r"(--[\w-]+)=", launch)), launch
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text
