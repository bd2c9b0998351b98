"""The four console scripts exist after `pip install -e .` (scripts/setup.sh does it) and answer
--help with exit 0; the module forms keep working."""
import os
import shutil
import subprocess
import sys

import pytest
import tomllib

from support.common import ROOT

SCRIPTS = {"ulysses-train": "ulysses_train.cli.train:main",
           "ulysses-eval": "ulysses_train.cli.eval:main",
           "ulysses-export": "ulysses_train.cli.export:main",
           "ulysses-plan": "ulysses_train.cli.plan:main"}
HELP_SAYS = {"ulysses-train": "train is powered by Hydra", "ulysses-eval": "eval is powered by Hydra",
             "ulysses-export": "checkpoint out_dir", "ulysses-plan": "plan.gpus=N"}


def test_pyproject_declares_the_console_scripts():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"] == SCRIPTS


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_console_script_help_exits_0(name, tmp_path):
    path = shutil.which(name)
    assert path, f"{name} is not on PATH: run scripts/setup.sh (pip install -e .)"
    out = subprocess.run([path, "--help"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert HELP_SAYS[name] in out.stdout, out.stdout
    assert not list(tmp_path.iterdir()), "--help must not create a run dir"


@pytest.mark.parametrize("argv", [["-m", "ulysses_train.plan", "--help"],
                                  ["-m", "ulysses_train.export", "--help"]])
def test_module_forms_still_work(argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m ulysses_train."), out


def test_a_flag_after_the_overrides_is_hydras(tmp_path):
    """`train.py train.steps=3 --cfg job`: Hydra's own order (overrides, then flags) works; the
    job-name override the entry point adds once came last and broke its parser."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "train.steps=3",
                          "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "steps: 3" in out.stdout and not list(tmp_path.iterdir())


def test_a_second_ctrl_c_inside_a_save_is_an_abort():
    """DCP wraps an interrupt raised inside a save in a CheckpointException (its `failures`):
    still the second Ctrl-C, exit 130, not a traceback."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from ulysses_train.cli.job import interrupted

    wrapped = CheckpointException("save failed", {0: (KeyboardInterrupt(),
                                                      traceback.StackSummary())})
    assert interrupted(wrapped) and interrupted(KeyboardInterrupt())
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("while saving") from exc
    except RuntimeError as chained:
        assert interrupted(chained)
    assert not interrupted(CheckpointException("disk full", {0: (OSError(28, "full"),
                                                                 traceback.StackSummary())}))
    assert not interrupted(ValueError("x"))


@pytest.mark.parametrize("args,key", [(["--cfg", "job", "train.stpes=3"], "train.stpes"),
                                      (["--cfg", "job", "model=gpt5"], "model")])
def test_cfg_job_with_a_bad_override_is_one_line(args, key, tmp_path):
    """The one-line error advises `python train.py --cfg job`; with a bad override that command
    itself printed Hydra's multi-line message and exited 1."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith(f"error: {key}: "), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
