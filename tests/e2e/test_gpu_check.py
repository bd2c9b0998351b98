"""scripts/gpu_check.sh: the one-call GPU check runs end to end in its CPU miniature
(`--cpu-dry-run`), so the script cannot rot before a GPU comes; its records survive a stage that
is killed; bad arguments and a machine without a GPU get one line and exit 2.

The dry run (one module-scoped run, ~40 s on 2 idle cores) is the same script and the same
stage modules as the GPU run, at tiny shapes on 2 gloo ranks; only the gpu-marked tests skip.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from support.common import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from gpu_check import finish, summary  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = ("install", "gpu_tests", "bf16_curve", "parity", "speed")
PROBE = "gpu_check_probe"  # a wheel no machine has: the install stage must install it


def _probe_wheel(folder) -> str:
    """A minimal valid wheel (PEP 427) of a one-module distribution, built without a network."""
    dist_info = f"{PROBE}-0.1.dist-info"
    files = {f"{PROBE}/__init__.py": "VALUE = 42\n",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 0.1\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    path = os.path.join(folder, f"{PROBE}-0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def _run(args, tmp_path, timeout=480):
    env = {**os.environ, "GPU_CHECK_SITE": str(tmp_path / "site"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    wheels = tmp / "wheels"
    wheels.mkdir()
    _probe_wheel(str(wheels))
    out = tmp / "out"
    proc = _run([str(out), "--cpu-dry-run", "--wheels", str(wheels)], tmp)
    records = {}
    for name in (*STAGES, "summary"):
        path = out / f"{name}.json"
        records[name] = json.loads(path.read_text()) if path.exists() else None
    return proc, out, tmp, records


def test_dry_run_passes_with_every_stage_recorded(dry_run):
    proc, out, _, records = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    missing = [name for name, rec in records.items() if rec is None]
    assert not missing, missing
    for name in STAGES:
        rec = records[name]
        want = "skipped" if name == "gpu_tests" else "passed"
        assert rec["status"] == want and rec["mode"] == "dry", (name, rec.get("reason"))
    assert records["summary"]["ok"] is True
    assert set(records["summary"]["stages"]) == set(STAGES)
    assert "GPU check (dry): PASSED" in proc.stdout
    # The device returns at most 8 files from OUT: the check writes no more than that.
    assert sorted(os.listdir(out)) == sorted([f"{n}.json" for n in (*STAGES, "summary")]
                                             + ["log.txt"])


def test_install_installs_only_what_is_missing(dry_run):
    _, _, tmp, records = dry_run
    rec = records["install"]
    assert rec["installed"] == [f"{PROBE}-0.1-py3-none-any.whl"]
    assert (tmp / "site" / PROBE / "__init__.py").exists()
    # A second pass finds it installed (the site is on PYTHONPATH) and installs nothing.
    env = {**os.environ, "GPU_CHECK_MODE": "dry", "GPU_CHECK_WHEELS": str(tmp / "wheels"),
           "GPU_CHECK_SITE": str(tmp / "site"),
           "PYTHONPATH": os.pathsep.join([str(tmp / "site"), os.path.join(ROOT, "scripts"),
                                          ROOT])}
    again = tmp / "again"
    again.mkdir()
    proc = subprocess.run([sys.executable, "-m", "gpu_check.install", str(again)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    second = json.loads((again / "install.json").read_text())
    assert proc.returncode == 0 and second["status"] == "passed", proc.stderr
    assert second["to_install"] == [] and PROBE + "-0.1-py3-none-any.whl" in second["present"]


def test_gpu_tests_stage_ran_the_marked_tests_and_says_why_they_skipped(dry_run):
    rec = dry_run[3]["gpu_tests"]
    assert rec["reason"] == "skipped: no GPU"
    assert "tests/parallel/test_ring_kernels.py" in rec["files"]
    assert rec["tests"] and all(t["outcome"] == "skipped" for t in rec["tests"])


def test_bf16_curve_really_ran_bf16_and_stayed_within_the_derived_tolerance(dry_run):
    rec = dry_run[3]["bf16_curve"]
    assert set(rec["curves"]) == {"causal", "documents"}
    for curve in rec["curves"].values():
        devs = curve["loss"]["rel_dev_by_step"]
        assert len(devs) == 8 and curve["loss"]["ok"]
        assert max(devs) > 0  # an fp32 run in bf16's place would match the reference exactly


def test_parity_cases_equal_one_rank_and_the_ring_used_the_host_staging(dry_run):
    cases = dry_run[3]["parity"]["cases"]
    assert set(cases) == {"sp2", "head_groups_sp2_G2", "sp2_ring2", "sliding_sp2_ring2"}
    for name, case in cases.items():
        assert case["ok"] and case["curves"], (name, case)
    # the dry run stages every P2P transfer through host copies, as the GPU run does CUDA ones
    assert cases["sp2_ring2"]["staged_p2p_ops"] > 0
    assert cases["sliding_sp2_ring2"]["staged_p2p_ops"] > 0
    assert cases["sp2"]["staged_p2p_ops"] == 0  # Ulysses alone: all-to-alls, no send/recv


def test_speed_rows_pair_both_implementations_with_a_planner_prediction(dry_run):
    rec = dry_run[3]["speed"]
    assert [t["seq_len"] for t in rec["table"]] == rec["lengths"]
    for row in rec["table"]:
        assert row["ours"]["tokens_per_s"] > 0 and row["hf"]["tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours"]["tokens_per_s"]
                                             / row["hf"]["tokens_per_s"], rel=1e-2)
    assert [p["seq_len"] for p in rec["planner"]] == rec["lengths"]
    assert all(p["predicted_gib"] > 0 for p in rec["planner"])


def test_a_stage_killed_by_its_time_box_keeps_its_results(tmp_path):
    """What the shell does after `timeout` ends a stage mid-way (exit 124), and the summary."""
    partial = {"stage": "parity", "mode": "full", "status": "running", "cases": {"sp4": {}}}
    (tmp_path / "parity.json").write_text(json.dumps(partial))
    log = tmp_path / "log"
    log.write_text("rank 2 waiting\n")
    closed = finish.close(str(tmp_path), "parity", 124, 130.0, str(log))
    assert closed["status"] == "timeout" and closed["cases"] == {"sp4": {}}
    assert closed["log_tail"] == ["rank 2 waiting"]
    # a stage that died before writing anything
    crashed = finish.close(str(tmp_path), "speed", -11, 3.0, str(log))
    assert crashed["status"] == "error" and "exited -11" in crashed["reason"]
    result, lines = summary.summarise(str(tmp_path))
    assert result["ok"] is False
    assert result["stages"]["install"]["status"] == "missing"
    assert result["stages"]["parity"]["status"] == "timeout"
    assert summary.main([str(tmp_path)]) == 1


@pytest.mark.parametrize("args, fragment", [
    ([], "error: OUT: missing"),
    (["out", "--fast"], "error: --fast: unknown option"),
    (["out", "out2"], "error: out2: a second OUT folder"),
])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, args, fragment):
    proc = _run([str(tmp_path / a) if not a.startswith("-") else a for a in args], tmp_path,
                timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith(fragment.split(": ")[0])
    assert fragment.split(": ", 1)[1] in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without GPU")
def test_without_a_gpu_and_without_dry_run_it_stops_with_one_line(tmp_path):
    proc = _run([str(tmp_path / "out")], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: scripts/gpu_check.sh: no CUDA GPU here; use --cpu-dry-run for the CPU miniature"]
    install = json.loads((tmp_path / "out" / "install.json").read_text())
    assert install["status"] == "failed" and install["abort"] is True
    assert not (tmp_path / "out" / "parity.json").exists()
