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
