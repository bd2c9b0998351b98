"""train.py end to end, as a user runs it: the run dir contract and the bad-input contract."""
import os

import pytest

from helpers import SMALL, metrics_rows, run_train


def test_trains_and_writes_the_run_dir(tmp_path, small_args):
    done = run_train(small_args + ["train.steps=4", "checkpoint.every=2"])
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    assert f"run dir: {run}" in done.stdout
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]
    assert (run / ".hydra" / "config.yaml").exists()


@pytest.mark.parametrize("override,key", [
    ("train.steps=abc", "train.steps"),
    ("train.stpes=5", "train.stpes"),
    ("model=gpt5", "model"),
    ("parallel.zero=7", "parallel.zero"),
    ("parallel.sp=4", "parallel.sp"),
    ("optim.lr=nan", "optim.lr"),
    ("train.micro_batch_size=3", "train.global_batch_size"),
    ("data.seq_len=-1", "data.seq_len"),
    ("checkpoint.resume=/no/such/step_00000001", "checkpoint.resume"),
])
def test_bad_input_is_one_line_and_exit_2(small_args, override, key):
    done = run_train(small_args + [override])
    assert done.returncode == 2, (done.stdout[-1000:], done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_missing_data_file(small_args, tmp_path):
    args = [a for a in small_args if a != "data=synthetic"]
    done = run_train(args + ["data=files", f"data.paths=[{tmp_path / 'missing.jsonl'}]"])
    assert done.returncode == 2
    assert done.stderr.startswith("error: data.paths: ") and "missing.jsonl" in done.stderr
    assert "Traceback" not in done.stderr


def test_default_run_dir_is_derived_from_the_overrides(tmp_path):
    """Same command -> same run dir (so rerunning resumes); other overrides -> another dir."""
    base = SMALL + ["train.steps=2", f"data.cache_dir={tmp_path / 'cache'}"]
    first = run_train(base, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_train(base + ["train.exit_after_steps=1"], cwd=tmp_path)
    assert "already finished at step 2" in again.stdout
    other = run_train(base + ["train.seed=1"], cwd=tmp_path)
    assert other.returncode == 0
    assert len(os.listdir(tmp_path / "runs")) == 2
