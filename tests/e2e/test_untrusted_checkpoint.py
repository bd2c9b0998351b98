"""A downloaded checkpoint with a planted pickle, through every command that reads one (issue 19,
item 9): `python -m ulysses_train.export`, `train.py model.init_from=`, `scripts/eval.py
eval.checkpoint=`, and `train.py` resuming (`checkpoint.resume=auto` in the run dir, and
`checkpoint.resume=PATH`). Before, each ran the planted `open(marker, "w")` (the export then
succeeded, exit 0); now each prints one `error: <file>: refuses to unpickle ...` line, exits 1,
runs nothing and writes nothing. The unit tests are tests/checkpoint/test_safe_read.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from support.common import ROOT, SMALL, run_train
from support.planted import plant_in_metadata, plant_in_trainer_state

STEP = os.path.join("checkpoints", "step_00000002")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """One 2-step run (checkpoints at steps 1 and 2), shared: each test plants into a copy."""
    run = str(tmp_path_factory.mktemp("trained") / "run")
    done = run_train(SMALL + ["train.steps=2", "checkpoint.every=1", f"hydra.run.dir={run}"])
    assert done.returncode == 0, done.stderr[-2000:]
    return run


@pytest.fixture(params=["metadata", "trainer-state"])
def planted(request, trained, tmp_path) -> tuple[str, str, str]:
    """(run dir copy, its file holding the planted pickle, the marker that pickle would create)."""
    run = str(tmp_path / "planted")
    shutil.copytree(trained, run)
    marker = str(tmp_path / "ran")
    if request.param == "metadata":
        plant_in_metadata(os.path.join(run, STEP), marker)
        return run, os.path.join(run, STEP, ".metadata"), marker
    plant_in_trainer_state(os.path.join(run, STEP), marker)
    return run, os.path.join(run, STEP, "__0_0.distcp"), marker


def _files(root) -> dict:
    out = {}
    for where, _, names in os.walk(root):
        for n in names:
            path = os.path.join(where, n)
            out[os.path.relpath(path, root)] = os.path.getsize(path), os.path.getmtime(path)
    return out


def _refused(done, file, marker) -> None:
    """Exit 1, one `error: <file>: refuses to unpickle ...` line on stderr, nothing run."""
    lines = done.stderr.strip().splitlines()
    assert not os.path.exists(marker), "the planted pickle ran"
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {file}: refuses to unpickle "), lines


def _python(*args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(env, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("planted", ["metadata"], indirect=True)
def test_export_refuses_and_writes_nothing(planted, tmp_path):
    """Export reads `.metadata` (model tensors only, no trainer state): refused, OUT_DIR not
    left behind (nor its new parent)."""
    run, file, marker = planted
    done = _python("-m", "ulysses_train.export", run, str(tmp_path / "new" / "hf"), cwd=ROOT)
    _refused(done, file, marker)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("planted", ["metadata", "trainer-state"], indirect=True)
def test_init_from_refuses_and_trains_nothing(planted, tmp_path):
    """`model.init_from=<step>`: refused in the pre-check (which reads every pickle of the
    step, the trainer state's too), so the new run dir is never made — no .hydra/, no log, no
    copied tokenizer."""
    run, file, marker = planted
    out = tmp_path / "new_run"
    done = run_train(SMALL + ["train.steps=1", f"model.init_from={os.path.join(run, STEP)}",
                              f"hydra.run.dir={out}"])
    _refused(done, file, marker)
    assert not out.exists()


@pytest.mark.parametrize("planted", ["metadata"], indirect=True)
def test_eval_refuses_and_writes_no_result(planted, tmp_path):
    run, file, marker = planted
    out = tmp_path / "eval_run"
    done = _python(os.path.join(ROOT, "scripts", "eval.py"),
                   *SMALL, f"eval.checkpoint={os.path.join(run, STEP)}", "eval.batches=1",
                   "eval.passkey_lengths=[]", f"hydra.run.dir={out}", cwd=tmp_path)
    _refused(done, file, marker)
    assert not out.exists()  # refused in the pre-check: no .hydra/, no eval.log


@pytest.mark.parametrize("planted,mode", [("metadata", "auto"), ("metadata", "PATH"),
                                          ("trainer-state", "auto")], indirect=["planted"])
def test_resume_refuses_without_falling_back(planted, tmp_path, mode):
    """Resuming the planted run (auto: its `latest`; PATH: the step dir, from a new run dir):
    refused, in both modes, in the pre-check and without falling back to the intact step 1 —
    every file of the run dir (checkpoints, metrics, `latest`, the recorded .hydra/ config)
    stays exactly as it was, nothing is moved to abandoned/, no new run dir is made."""
    run, file, marker = planted
    out = run if mode == "auto" else str(tmp_path / "other_run")
    resume = "auto" if mode == "auto" else os.path.join(run, STEP)
    before = _files(run)
    done = run_train(SMALL + ["train.steps=3", "checkpoint.every=1", f"hydra.run.dir={out}",
                              f"checkpoint.resume={resume}"])
    _refused(done, file, marker)
    assert _files(run) == before
    if mode == "PATH":
        assert not os.path.exists(out)
