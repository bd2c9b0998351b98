"""Stage gpu_tests: the `gpu`-marked pytest tests (pyproject.toml's marker), one outcome per test.

    python -m gpu_check.gpu_tests OUT

The files are found by their text (`mark.gpu` under tests/), so a new GPU test is picked up
without collecting the whole suite; pytest then selects `-m gpu` in them and reports through
JUnit XML. Without CUDA (the dry run) the same command runs and every test skips itself: the
stage is then `skipped: no GPU`, with the tests it would have run listed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

from gpu_check.common import ROOT, dry, run_stage

PYTEST_TIMEOUT_S = 600  # the shell's time box is the real limit


def marked_files() -> list[str]:
    """tests/**/test_*.py files that mention the gpu marker, relative to the repo."""
    found = []
    for base, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in sorted(files):
            if name.startswith("test_") and name.endswith(".py"):
                path = os.path.join(base, name)
                with open(path, encoding="utf-8") as f:
                    if "mark.gpu" in f.read():
                        found.append(os.path.relpath(path, ROOT))
    return sorted(found)


def outcomes(junit_path: str) -> list[dict]:
    """[{test, outcome (passed | failed | error | skipped), seconds, message}] from JUnit XML."""
    out = []
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "")[:300]
                break
        out.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                    "seconds": round(float(case.get("time", 0)), 2), "message": message})
    return out


def body(stage) -> None:
    files = marked_files()
    stage.set(files=files)
    if not files:
        stage.finish("failed", "no test under tests/ carries the gpu marker")
        return
    with tempfile.TemporaryDirectory(prefix="gpu_check_tests_") as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *files]
        stage.set(command=" ".join(cmd[1:]))
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=PYTEST_TIMEOUT_S)
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        tests = outcomes(junit) if os.path.exists(junit) else []
    counts = {k: sum(t["outcome"] == k for t in tests)
              for k in ("passed", "failed", "error", "skipped")}
    stage.set(tests=tests, counts=counts, pytest_exit=proc.returncode)
    if not tests:
        stage.set(pytest_tail=(proc.stdout + proc.stderr).splitlines()[-15:])
        stage.finish("error", f"pytest exit {proc.returncode} and no test result")
    elif counts["failed"] or counts["error"]:
        stage.finish("failed", f"{counts['failed']} failed, {counts['error']} errors "
                     f"of {len(tests)}")
    elif counts["skipped"] == len(tests) and dry():
        stage.finish("skipped", "skipped: no GPU")
    elif counts["skipped"] == len(tests):  # on the GPU machine nothing ran: that is no pass
        reasons = sorted({t["message"] for t in tests})
        stage.finish("failed", f"every gpu test skipped itself: {'; '.join(reasons)}"[:400])
    else:
        stage.finish("passed")


if __name__ == "__main__":
    raise SystemExit(run_stage("gpu_tests", body))
