"""Nothing the program does on its own deletes a user's checkpoint.

- `resume=auto` falls back only past *verified* corruption; any other error while reading or
  loading (an I/O error, out of memory) stops the run with exit 1 and one line, touching nothing
  (the old code fell back on any exception and then deleted every newer step directory).
- Resuming from an older step moves the newer ones to `checkpoints/abandoned/`, never deletes.
- `checkpoint.keep` removes only complete, older checkpoints of the current line.
- Each rank hashes the files it wrote; rank 0 alone never reads every shard.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch

from support.common import ROOT, SMALL, cpu_dims, files_under, flip_byte, run_train, small_config
from support.spawn import run_distributed
from ulysses_train.checkpoint import manifest, store
from ulysses_train.checkpoint.manager import CheckpointManager
from ulysses_train.config.errors import InputUnreadable
from ulysses_train.config.schema import CheckpointConfig
from ulysses_train.parallel import ParallelDims
from ulysses_train.parallel.parallelize import build_model
from ulysses_train.train.optim import build_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model():
    cfg = small_config()
    model = build_model(cfg, cpu_dims())
    return cfg, model, build_optimizer(model, cfg.optim)


def _manager(root, cfg, log=None, **ck):
    return CheckpointManager(str(root), CheckpointConfig(**ck), cfg.model,
                             log=log if log is not None else (lambda s: None))



def _saved(tmp_path, steps=(1, 2, 3), **ck):
    cfg, model, opt = _model()
    m = _manager(tmp_path, cfg, **ck)
    for step in steps:
        m.save(step, model, opt, {"step": step})
    return cfg, model, opt


def _eio(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error")


def _oom(*args, **kwargs):
    raise MemoryError("cannot allocate")


@pytest.mark.parametrize("where,fault", [
    ("load", _eio), ("load", _oom),  # inside DCP's read of a verified checkpoint
    ("hash", _eio),  # while verifying: a read error is no evidence of corruption
], ids=["load-EIO", "load-MemoryError", "verify-EIO"])
def test_a_read_error_that_is_not_corruption_stops_and_keeps_everything(tmp_path, monkeypatch,
                                                                          where, fault):
    cfg, model, opt = _saved(tmp_path)
    before = files_under(tmp_path)
    if where == "load":
        monkeypatch.setattr(torch.distributed.checkpoint.filesystem.FileSystemReader,
                            "read_data", fault)
    else:
        monkeypatch.setattr(manifest, "hash_file", fault)
    said = []
    with pytest.raises(InputUnreadable) as caught:
        _manager(tmp_path, cfg, log=said.append).restore(model, opt, {"step": 0})
    assert caught.value.exit_code == 1
    assert "step_00000003 could not be read" in str(caught.value)
    assert ("Input/output error" if fault is _eio else "MemoryError") in str(caught.value)
    assert files_under(tmp_path) == before  # no fallback, nothing moved or deleted
    assert not any("trying the next newest" in s for s in said), said


def test_a_load_error_through_train_py_is_one_line_exit_1(tmp_path):
    """The user's view: exit 1, one `error:` line and no traceback; every step dir intact."""
    args = SMALL + ["train.steps=4", "checkpoint.every=2", f"hydra.run.dir={tmp_path / 'run'}",
                    f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_train(args).returncode == 0
    ck = tmp_path / "run" / "checkpoints"
    before = files_under(ck)
    wrapper = tmp_path / "broken_disk.py"  # train.py with DCP's file read failing (EIO)
    wrapper.write_text(
        "import errno, runpy, sys\n"
        "from torch.distributed.checkpoint.filesystem import FileSystemReader\n"
        "def eio(*a, **k):\n"
        "    raise OSError(errno.EIO, 'Input/output error')\n"
        "FileSystemReader.read_data = eio\n"
        f"sys.argv = [{os.path.join(ROOT, 'train.py')!r}] + sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, str(wrapper), *args, "train.steps=6"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip() == done.stderr.strip().splitlines()[0]
    assert done.stderr.startswith(f"error: checkpoint.resume: {ck / 'step_00000004'} could not "
                                  "be read (loading it failed: rank 0: OSError: [Errno 5] Input/output "
                                  "error); nothing shows it is corrupt")
    assert "Traceback" not in done.stdout + done.stderr
    assert files_under(ck) == before


def test_corruption_still_falls_back_and_moves_the_corrupt_one_aside(tmp_path):
    cfg, model, opt = _saved(tmp_path)
    ck = tmp_path / "checkpoints"
    flip_byte(ck / "step_00000003" / "__0_0.distcp")
    said = []
    state, path = _manager(tmp_path, cfg, log=said.append).restore(model, opt, {"step": 0})
    assert state["step"] == 2 and path == str(ck / "step_00000002")
    assert any("step_00000003 is corrupt" in s and "trying the next newest" in s for s in said)
    moved = ck / "abandoned" / "step_00000003"
    assert any(f"aside to {moved}" in s for s in said), said
    assert (moved / "__0_0.distcp").exists()  # kept (corrupt, but the user's to judge)
    assert sorted(os.listdir(ck)) == ["abandoned", "latest", "step_00000001", "step_00000002"]


def test_explicit_older_path_moves_newer_steps_aside_even_twice(tmp_path):
    """checkpoint.resume=PATH to an older step: newer steps are moved aside, not deleted; when
    a name is taken in abandoned/ (a second go-back, here to the new line's step 2), it gets a
    numbered suffix."""
    cfg, model, opt = _saved(tmp_path)
    ck = tmp_path / "checkpoints"
    for older, moved in (("step_00000001", 2), ("step_00000002", 1)):
        said = []
        m = _manager(tmp_path, cfg, log=said.append, resume=str(ck / older))
        state, _ = m.restore(model, opt, {"step": 0})
        assert m.ckdir.latest_name() == older and state["step"] == int(older[-1])
        for step in range(int(older[-1]) + 1, 4):  # the new line's steps
            m.save(step, model, opt, {"step": step})
        assert sum("aside to" in s for s in said) == moved, said
    assert sorted(os.listdir(ck / "abandoned")) == [
        "step_00000002", "step_00000003", "step_00000003.1"]
    for name in os.listdir(ck / "abandoned"):
        assert store.is_complete(str(ck / "abandoned" / name))


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same-dir", "other-run-dir"])
def test_rerunning_an_explicit_path_continues_its_line(tmp_path, elsewhere):
    """Rerunning the same command with checkpoint.resume=PATH (by hand, a torchrun restart or
    a SLURM requeue) continues from the line PATH started, instead of going back to PATH each
    time and moving the progress aside (found by a fresh-user run: an endless loop that also
    piled up abandoned copies). Catches: PATH honoured on every run."""
    cfg, model, opt = _saved(tmp_path / "a")
    path = str(tmp_path / "a" / "checkpoints" / "step_00000001")
    run_dir = tmp_path / ("b" if elsewhere else "a")
    m = _manager(run_dir, cfg, resume=path)
    assert m.restore(model, opt, {"step": 0})[0]["step"] == 1
    m.save(2, model, opt, {"step": 2})  # this line's progress after PATH
    said = []
    again = _manager(run_dir, cfg, log=said.append, resume=path)  # the same command again
    state, resumed = again.restore(model, opt, {"step": 0})
    assert state["step"] == 2 and resumed.endswith("step_00000002"), said
    assert any("was applied already" in s for s in said), said
    abandoned = run_dir / "checkpoints" / "abandoned"
    kept = sorted(os.listdir(abandoned)) if abandoned.exists() else []
    assert kept == ([] if elsewhere else ["step_00000002", "step_00000003"])
    again.save(3, model, opt, {"step": 3})  # the line goes on; its origin is kept
    assert store.read_meta(str(run_dir / "checkpoints" / "step_00000003"))[
        "origin"] == os.path.realpath(path)


def test_keep_removes_only_older_checkpoints_of_the_current_line(tmp_path):
    cfg, model, opt = _saved(tmp_path, steps=(1, 2, 3, 4), keep=10)
    ck = tmp_path / "checkpoints"
    # Resume from step 2 with keep=1: 3 and 4 are abandoned, and survive every later save; the
    # step resumed from is kept too; older ones of this line go.
    m = _manager(tmp_path, cfg, keep=1, resume=str(ck / "step_00000002"))
    m.restore(model, opt, {"step": 0})
    for step in (3, 4, 5):
        m.save(step, model, opt, {"step": step})
    assert m.ckdir.complete_steps() == ["step_00000002", "step_00000005"]  # 2: resumed from
    assert sorted(os.listdir(ck / "abandoned")) == ["step_00000003", "step_00000004"]
    # A checkpoint newer than the one just saved is never removed by retention.
    m.ckdir.prune(1, "step_00000001")
    assert "step_00000005" in m.ckdir.complete_steps()


def test_keep_leaves_this_dirs_own_steps_when_resumed_from_elsewhere(tmp_path):
    cfg, model, opt = _saved(tmp_path / "a", steps=(1, 2))
    _saved(tmp_path / "b", steps=(5,))
    m = _manager(tmp_path / "a", cfg, keep=1,
                 resume=str(tmp_path / "b" / "checkpoints" / "step_00000005"))
    m.restore(model, opt, {"step": 0})
    for step in (6, 7):
        m.save(step, model, opt, {"step": step})
    # Steps 1-2 are another line's (this dir's earlier run): keep never removes them.
    assert m.ckdir.complete_steps() == ["step_00000001", "step_00000002", "step_00000007"]


def _hashing_rank(rank, world, root):
    """Save at zero=3 on 2 ranks, sync then async (the hashing then runs in the background
    thread, on the checkpoint's gloo group); record which files each rank hashed; verify."""
    cfg = small_config(parallel={"zero": 3})
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    from ulysses_train.parallel.parallelize import build_model as build

    model = build(cfg, dims)
    opt = build_optimizer(model, cfg.optim)
    hashed = []
    real = manifest.hash_file
    manifest.hash_file = lambda path, alg: hashed.append(os.path.basename(path)) or \
        real(path, alg)
    m = CheckpointManager(root, CheckpointConfig(), cfg.model, is_main=dims.is_main,
                          distributed=True)
    m.save(1, model, opt, {"step": 1})
    on_save, hashed[:] = sorted(hashed), []
    problems = m.resume.verify(os.path.join(root, "checkpoints", "step_00000001"))
    on_verify, hashed[:] = sorted(hashed), []
    background = CheckpointManager(root, CheckpointConfig(async_save=True), cfg.model,
                                   is_main=dims.is_main, distributed=True)
    background.save(2, model, opt, {"step": 2})
    background.wait()
    background.close()
    on_async_save = sorted(hashed)
    problems += m.resume.verify(os.path.join(root, "checkpoints", "step_00000002"))
    return on_save, on_verify, problems, on_async_save


def test_each_rank_hashes_the_files_it_wrote(tmp_path):
    results = run_distributed(_hashing_rank, 2, str(tmp_path), timeout=120)
    (save0, verify0, problems0, async0), (save1, verify1, problems1, async1) = results
    assert save0 == async0 == [".metadata", "__0_0.distcp", "meta.json"]  # + what it alone wrote
    assert save1 == async1 == ["__1_0.distcp"]
    listed = manifest.read_manifest(str(tmp_path / "checkpoints" / "step_00000001"))[0]
    assert sorted(listed["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                         "meta.json"]
    assert problems0 == problems1 == []
    assert sorted(verify0 + verify1) == sorted(["meta.json", "meta.json", ".metadata",
                                                "__0_0.distcp", "__1_0.distcp"])
