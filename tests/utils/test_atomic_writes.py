"""Torn writes: a crash in the middle of writing a file we replace atomically leaves the previous
content intact and readable.

The crash is simulated at the worst moment: the first `write` to a matching file writes half
its bytes, then raises `SimulatedCrash` (a BaseException, so no `except Exception` in the code
under test can swallow it). With a temporary file + `os.replace` the torn bytes land in the
temporary file and the real one keeps its old content; a file written in place is left torn.
Every such site in the package is listed in `ATOMIC_SITES` and has a test here; a new site fails
`test_every_atomic_write_site_has_a_torn_write_test` until it gets one.

Bugs these tests catch (each safety claim of docs/checkpoints.md -> its bug):
- "a crash never leaves `checkpoints/latest` naming a half-written step": `latest` written in
  place (planted by hand once: `test_latest_survives_a_torn_write` fails);
- "a checkpoint directory is complete or absent": meta.json or the manifest written into the
  committed directory, or the directory renamed into place before they are written;
- "resume cuts metrics.jsonl back to the checkpoint": truncation written in place (a crash
  would lose every row);
- "a cache directory with its marker is complete": a marker written into the published directory;
- "<run_dir>/tokenizer/ is whole or absent": its files written into the folder in place, or the
  old folder deleted file by file before the new one is in place.
"""
from __future__ import annotations

import builtins
import contextlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

from support.common import ROOT, metrics_rows, small_config
from ulysses_train.checkpoint import manifest
from ulysses_train.checkpoint import store as files
from ulysses_train.cli import job
from ulysses_train.data.cache import TOKENIZER, open_or_build, read_complete
from ulysses_train.data.tokenizer import open_tokenizer
from ulysses_train.data.tokenizer_files import save_run_tokenizer
from ulysses_train.train.faults import PAUSE_MARKER
from ulysses_train.train.metrics import MetricsFile
from ulysses_train.train.trainer import run

# file -> number of atomic replacements (utils.atomic_write calls, and renames of whole
# directories: os.replace/os.rename), each covered by a test below. utils/atomic.py is the one
# place a file's tmp + os.replace is written out.
ATOMIC_SITES = {
    "utils/atomic.py": 1,  # the helper itself: every atomic_write test below goes through it
    "checkpoint/store.py": 2,  # latest: test_latest_survives_a_torn_write; move to abandoned/:
    #                            test_a_crash_while_moving_checkpoints_aside_loses_none
    "checkpoint/manager.py": 1,  # step dir commit: test_torn_commit_file_keeps_the_previous_
    #                              checkpoint
    "train/faults.py": 1,  # debug pause marker: test_torn_pause_marker_is_never_seen
    "train/metrics.py": 1,  # truncate_after: test_metrics_truncation_survives_a_torn_write
    "data/cache.py": 2,  # marker + directory publish: test_torn_cache_marker_publishes_nothing
    "data/shards.py": 2,  # build plan + a shard's done marker: tests/data/test_cache_build.py
    #                       test_a_helper_killed_mid_shard_leaves_an_identical_cache
    "data/tokenizer_files.py": 2,  # <run_dir>/tokenizer/ moved aside, then the new one in place:
    #                                test_run_tokenizer_folder_is_whole_or_absent
    "evaluate/run.py": 2,  # eval.json and eval.png: test_torn_eval_result_keeps_the_previous_one
    "train/mixture_report.py": 2,  # tokens_by_length.json/.png: test_torn_length_report_keeps_
    #                                the_previous_one
    "cli/job.py": 1,  # .hydra/config.yaml: test_torn_effective_config_keeps_hydras
}


class SimulatedCrash(BaseException):
    """The process 'died' inside a write."""


class _TornFile:
    """A file object whose first write stores half the bytes, then 'crashes'."""

    def __init__(self, f):
        self._f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def write(self, data):
        self._f.write(data[:len(data) // 2])
        self._f.flush()
        self._f.close()
        raise SimulatedCrash(f"simulated crash while writing {self._f.name}")

    def writelines(self, lines):
        self.write("".join(lines))


@contextlib.contextmanager
def torn_writes(matches):
    """Within the block, files opened for writing whose path satisfies `matches(path)` tear."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") \
                and matches(os.path.abspath(os.fspath(file))):
            return _TornFile(f)
        return f

    builtins.open = open_
    try:
        yield
    finally:
        builtins.open = real_open


def _ckpt_config(steps, **debug):
    return small_config(train={"steps": steps}, checkpoint={"every": 1}, debug=debug)


def _two_checkpointed_steps(run_dir):
    assert run(_ckpt_config(2), str(run_dir)) == 0
    return run_dir / "checkpoints"


def test_latest_survives_a_torn_write(tmp_path):
    """A crash while step 3 repoints `latest` leaves it naming step 2, whole; the rerun resumes."""
    ckpts = _two_checkpointed_steps(tmp_path)
    before = (ckpts / "latest").read_bytes()
    assert before == b"step_00000002\n"
    with torn_writes(lambda p: os.path.dirname(p) == str(ckpts)
                     and os.path.basename(p).startswith("latest")):
        with pytest.raises(SimulatedCrash):
            run(_ckpt_config(3), str(tmp_path))
    assert (ckpts / "latest").read_bytes() == before
    assert run(_ckpt_config(3), str(tmp_path)) == 0
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("name", [manifest.META, manifest.MANIFEST])
def test_torn_commit_file_keeps_the_previous_checkpoint(tmp_path, capsys, name):
    """A crash while writing a step's meta.json or manifest: the step never appears complete,
    `latest` still names the previous one, and the rerun resumes from it."""
    ckpts = _two_checkpointed_steps(tmp_path)
    latest = (ckpts / "latest").read_bytes()
    with torn_writes(lambda p: os.path.dirname(os.path.dirname(p)) == str(ckpts)
                     and os.path.basename(p) == name):
        with pytest.raises(SimulatedCrash):
            run(_ckpt_config(3), str(tmp_path))
    assert (ckpts / "latest").read_bytes() == latest
    assert files.CheckpointDir(str(ckpts), print).complete_steps() == ["step_00000001",
                                                                       "step_00000002"]
    capsys.readouterr()
    assert run(_ckpt_config(3), str(tmp_path)) == 0
    assert "step_00000002 at step 2" in capsys.readouterr().out  # resumed from the previous one
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3]


def test_torn_pause_marker_is_never_seen(tmp_path):
    """The debug pause marker (tests poll for it to SIGKILL a save) is whole or absent."""
    with torn_writes(lambda p: os.path.basename(p).startswith(PAUSE_MARKER)):
        with pytest.raises(SimulatedCrash):
            run(_ckpt_config(1, pause_in_save_at_step=1), str(tmp_path))
    assert not (tmp_path / PAUSE_MARKER).exists()


def test_metrics_truncation_survives_a_torn_write(tmp_path):
    """Resume cuts metrics.jsonl back to the checkpoint's step; a crash while doing so keeps
    every row, and a row torn by a crash mid-append is dropped by the next cut."""
    path = tmp_path / "metrics.jsonl"
    file = MetricsFile(str(path))
    for step in range(1, 5):
        file.append({"step": step, "loss": 1.0 / step})
    before = path.read_bytes()
    with torn_writes(lambda p: os.path.basename(p).startswith("metrics.jsonl")):
        with pytest.raises(SimulatedCrash):
            file.truncate_after(2)
    assert path.read_bytes() == before
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # a crash mid-append
    assert file.truncate_after(3) == 2
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3]


def _build(directory: Path) -> dict:
    """A minimal cache: one split of 4 uint16 tokens in one document."""
    np.arange(4, dtype=np.uint16).tofile(directory / "train.bin")
    np.save(directory / "train_offsets.npy", np.array([0, 4], dtype=np.int64))
    (directory / TOKENIZER).write_bytes(b"a stand-in tokenizer model")  # checksummed too
    return {"dtype": "uint16", "n_tokens": {"train": 4}}


def test_torn_cache_marker_publishes_nothing(tmp_path):
    """A crash while writing a cache's marker: no directory of that name appears (readers see
    all of a cache or nothing), an existing cache is untouched, and the next build succeeds."""
    kept, meta, _ = open_or_build(tmp_path, "kept", _build, log=print, is_main=True)
    kept_marker = (kept / "meta.json").read_bytes()
    with torn_writes(lambda p: "torn" in p and "meta.json" in os.path.basename(p)):
        with pytest.raises(SimulatedCrash):
            open_or_build(tmp_path, "torn", _build, log=print, is_main=True)
    assert not (tmp_path / "torn").exists()
    assert (kept / "meta.json").read_bytes() == kept_marker and read_complete(kept) == meta
    path, _, built = open_or_build(tmp_path, "torn", _build, log=print, is_main=True)
    assert built and read_complete(path) is not None


def test_a_crash_while_moving_checkpoints_aside_loses_none(tmp_path, monkeypatch):
    """Resuming from step 1 moves steps 2 and 3 to abandoned/; a crash after the first move
    leaves every checkpoint whole in one of the two places, and the rerun finishes the move.
    Catches: a move done as copy + delete (a crash leaves a partial copy), or a delete."""
    ck = tmp_path / "checkpoints"
    assert run(_ckpt_config(3), str(tmp_path)) == 0
    real_rename, calls = os.rename, []

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise SimulatedCrash(f"simulated crash while moving {src}")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_second)
    ckdir = files.CheckpointDir(str(ck), log=lambda _: None)
    with pytest.raises(SimulatedCrash):
        ckdir.abandon_after(str(ck / "step_00000001"))
    monkeypatch.setattr(os, "rename", real_rename)
    where = {name: [p for p in (ck / name, ck / "abandoned" / name) if p.exists()]
             for name in ("step_00000001", "step_00000002", "step_00000003")}
    assert all(len(paths) == 1 and files.is_complete(str(paths[0]))
               for paths in where.values()), where
    files.CheckpointDir(str(ck), log=lambda _: None).abandon_after(str(ck / "step_00000001"))
    assert sorted(os.listdir(ck / "abandoned")) == ["step_00000002", "step_00000003"]
    assert (ck / "latest").read_text().strip() == "step_00000001"


def _word_tokenizer(folder: Path, words: list[str]):
    """A tiny tokenizer.json (word level; EOS named in tokenizer_config.json)."""
    from tokenizers import Tokenizer, models

    folder.mkdir()
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return open_tokenizer(str(folder / "tokenizer.json"))


def test_run_tokenizer_folder_is_whole_or_absent(tmp_path, monkeypatch):
    """Replacing <run_dir>/tokenizer/: a crash while writing the new files keeps the old folder
    whole; a crash after the old one was moved aside leaves none (never a mix); the next save
    publishes the new one and removes what the crashes left."""
    old, new = _word_tokenizer(tmp_path / "a", ["a"]), _word_tokenizer(tmp_path / "b", ["b"])
    out = tmp_path / "run" / "tokenizer"
    out.parent.mkdir()
    save_run_tokenizer(old, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torn_writes(lambda p: os.path.basename(p) == "tokenizer.json" and "run" in p):
        with pytest.raises(SimulatedCrash):
            save_run_tokenizer(new, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    real_replace = os.replace

    def crash(src, dst):
        raise SimulatedCrash(f"simulated crash before publishing {src}")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SimulatedCrash):
        save_run_tokenizer(new, str(out))
    assert not out.exists()
    monkeypatch.setattr(os, "replace", real_replace)
    assert save_run_tokenizer(new, str(out))
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert os.listdir(out.parent) == ["tokenizer"]


def test_every_atomic_write_site_has_a_torn_write_test():
    """A new atomic_write call or os.replace/os.rename in the package needs a torn-write test
    here (then list it); a tmp file + os.replace written out by hand outside utils/atomic.py
    shows up as a new site too."""
    package = Path(ROOT) / "ulysses_train"
    found = {}
    for path in package.rglob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        n = len(re.findall(r"\bos\.(?:replace|rename)\(|\batomic_write\(", code))
        n -= len(re.findall(r"\bdef atomic_write\(", code))
        if n:
            found[path.relative_to(package).as_posix()] = n
    assert found == ATOMIC_SITES


def test_torn_eval_result_keeps_the_previous_one(tmp_path):
    """scripts/eval.py rewrites eval.json / eval.png in place of a previous result: a crash
    mid-write leaves the previous files whole."""
    from ulysses_train.evaluate.run import write_results

    first = {"loss_by_position": [{"start": 0, "end": 64, "loss": 2.0, "tokens": 8}],
             "passkey": [{"length": 64, "depth": 0.5, "accuracy": 1.0, "trials": 2}]}
    json_path, png_path = write_results(first, str(tmp_path))
    before = {p: Path(p).read_bytes() for p in (json_path, png_path)}
    second = {**first, "passkey": [{**first["passkey"][0], "accuracy": 0.0}]}
    with pytest.raises(SimulatedCrash), torn_writes(lambda p: p.endswith("eval.png.tmp")):
        write_results(second, str(tmp_path))  # the json is replaced first, then the png tears
    assert Path(png_path).read_bytes() == before[png_path]
    assert Path(json_path).read_bytes() != before[json_path]
    write_results(first, str(tmp_path))
    with pytest.raises(SimulatedCrash), torn_writes(lambda p: p.endswith("eval.json.tmp")):
        write_results(second, str(tmp_path))
    assert {p: Path(p).read_bytes() for p in (json_path, png_path)} == before


def test_torn_length_report_keeps_the_previous_one(tmp_path):
    """A resumed mixture run redraws tokens_by_length.json/.png: a crash mid-write leaves the
    previous files whole."""
    from support.data import build
    from support.mixture import mixture_cfg
    from ulysses_train.train.mixture_report import write_length_report

    data = build(mixture_cfg(tmp_path), batch=8)
    png = write_length_report(data, 10, str(tmp_path))
    paths = (png, png[:-4] + ".json")
    before = {p: Path(p).read_bytes() for p in paths}
    with pytest.raises(SimulatedCrash), torn_writes(lambda p: p.endswith(".png.tmp")):
        write_length_report(data, 20, str(tmp_path))  # the json is replaced, then the png tears
    assert Path(png).read_bytes() == before[png]
    assert Path(paths[1]).read_bytes() != before[paths[1]]
    write_length_report(data, 10, str(tmp_path))
    with pytest.raises(SimulatedCrash), torn_writes(lambda p: p.endswith(".json.tmp")):
        write_length_report(data, 20, str(tmp_path))
    assert {p: Path(p).read_bytes() for p in paths} == before


def test_torn_effective_config_keeps_hydras(tmp_path):
    """.hydra/config.yaml rewritten with model.init_from / parallel.auto applied: a crash
    mid-write leaves Hydra's composition whole, never a torn YAML."""
    import dataclasses


    composed = small_config()
    applied = dataclasses.replace(composed, model=dataclasses.replace(
        composed.model, n_layers=5, init_from="/models/src"))
    (tmp_path / "config.yaml").write_text("hydra's composition\n")
    with pytest.raises(SimulatedCrash), torn_writes(lambda p: p.endswith("config.yaml.tmp")):
        job.write_effective_config(str(tmp_path), composed, applied)
    assert (tmp_path / "config.yaml").read_text() == "hydra's composition\n"

