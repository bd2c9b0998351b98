"""train.py end to end, as a user runs it: the run dir contract and the bad-input contract.

The bad-input cases run the real command line, one process each (the pre-check runs before
torch is imported, about a second per case); the in-process validator tests are test_config.py.
"""
import dataclasses
import hashlib
import json
import os

import pytest

from support.common import SMALL, metrics_rows, run_train, small_config
from ulysses_train.checkpoint import manifest


def test_trains_and_writes_the_run_dir(tmp_path, small_args):
    done = run_train(small_args + ["train.steps=4", "checkpoint.every=2"])
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    assert f"run dir: {run}" in done.stdout
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]
    assert (run / ".hydra" / "config.yaml").exists()


def _fake_checkpoint(step_dir, drop=(), **model):
    """A committed-looking step dir whose meta.json records `model` (no tensors needed: the
    pre-check reads meta.json only); `drop`: keys an older version did not record."""
    step_dir.mkdir(parents=True)
    (step_dir / ".metadata").write_bytes(b"")
    shape = {**dataclasses.asdict(small_config().model), **model}
    shape = {k: v for k, v in shape.items() if k not in drop}
    (step_dir / "meta.json").write_text(json.dumps({"step": 1, "model": shape}))
    manifest.write_manifest(str(step_dir))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad inputs on disk, made once for every case below."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty.txt").write_bytes(b"")  # a corpus with no text
    # Unreadable: we run as root, so `chmod 000` would still be readable; a directory where a
    # file is expected is what stands in for an unreadable input.
    (root / "folder.jsonl").mkdir()
    (root / "broken.parquet").write_bytes(b"not a parquet file")  # unreadable content
    _fake_checkpoint(root / "other_shape" / "step_00000001", n_layers=3)
    _fake_checkpoint(root / "qkv_bias" / "step_00000001", qkv_bias=True)
    _fake_checkpoint(root / "before_qkv_bias" / "step_00000001", drop=("qkv_bias",))
    _fake_checkpoint(root / "yarn2" / "step_00000001", rope_scaling="yarn", rope_factor=2.0)
    (root / "partial" / "step_00000001").mkdir(parents=True)  # a save that never committed
    return root


# One case per way a user can get it wrong: (overrides, WORLD_SIZE, key named, message part).
# Layouts use WORLD_SIZE, as torchrun sets it, so the pre-check sees the launch's world size.
BAD_INPUT = {
    "tp*sp-vs-world": (["parallel.sp=4"], 2, "parallel.sp", "does not divide the world size 2"),
    "dp-vs-world": (["parallel.dp=3"], 2, "parallel.dp", "but 2 processes were launched"),
    "heads-vs-tp*sp": (["parallel.sp=3"], 3, "model.n_heads", "cannot be split over tp x sp = 3"),
    "kv-heads-vs-sp": (["model.n_heads=12", "model.n_kv_heads=3", "model.d_model=96",
                        "parallel.sp=4"], 4, "model.n_kv_heads", "one must divide the other"),
    "kv-heads-vs-tp": (["model.n_kv_heads=1", "parallel.tp=2"], 2, "model.n_kv_heads",
                       "not divisible by parallel.tp=2"),
    "vocab-vs-tp": (["model.n_heads=6", "model.n_kv_heads=3", "model.d_model=96",
                     "parallel.tp=3"], 3, "model.vocab_size", "padded vocabulary (256 rows"),
    "ring-vs-sp": (["parallel.sp=2", "parallel.ring=3"], 2, "parallel.ring",
                   "3 does not divide parallel.sp=2"),
    "heads-vs-ring": (["parallel.sp=16", "parallel.ring=2"], 16, "parallel.ring",
                      "cannot be split over tp x sp/ring = 1 x 16/2 = 8 ranks"),
    "batch-vs-micro": (["train.micro_batch_size=3"], 1, "train.global_batch_size",
                       "micro_batch_size x dp = 3 x 1"),
    "batch-vs-dp": (["train.global_batch_size=6"], 2, "train.global_batch_size",
                    "micro_batch_size x dp = 2 x 2"),
    "zero-steps": (["train.steps=0"], 1, "train.steps", "must be a positive number, got 0"),
    "negative-seq-len": (["data.seq_len=-1"], 1, "data.seq_len", "got -1"),
    "nan-lr": (["optim.lr=nan"], 1, "optim.lr", "got nan"),
    "inf-grad-clip": (["train.grad_clip=inf"], 1, "train.grad_clip", "finite"),
    "zero-max-skipped": (["train.max_skipped_steps=0"], 1, "train.max_skipped_steps", "got 0"),
    "unknown-key": (["train.stpes=5"], 1, "train.stpes", "unknown key"),
    "unknown-added-key": (["+train.foo=1"], 1, "train.foo", "unknown key"),
    "unknown-preset": (["model=gpt5"], 1, "model", "unknown preset 'gpt5'; choose one of"),
    "unknown-choice": (["parallel.zero=7"], 1, "parallel.zero", "7 is not one of 0, 2, 3"),
    "wrong-type-int": (["train.steps=abc"], 1, "train.steps", "'abc' is not a valid int"),
    "wrong-type-bool": (["train.deterministic=maybe"], 1, "train.deterministic",
                        "'maybe' is not a valid bool"),
    "no-value": (["train.steps"], 1, "train.steps", "write key=value"),
    "unquoted-tilde": (["model.init_from=~/ut_tmp/a"], 1, "model.init_from",
                       """quote it: 'model.init_from="~/ut_tmp/a"'"""),
    "missing-data-file": (["data=files", "data.paths=[{inputs}/missing.jsonl]"], 1,
                          "data.paths", "file not found: {inputs}/missing.jsonl"),
    "unreadable-data-file": (["data=files", "data.paths=[{inputs}/folder.jsonl]"], 1,
                             "data.paths", "{inputs}/folder.jsonl is a directory"),
    "corrupt-data-file": (["data=files", "data.paths=[{inputs}/broken.parquet]"], 1,
                          "data.paths", "cannot read {inputs}/broken.parquet: Parquet magic"),
    "empty-corpus": (["data=files", "data.paths=[{inputs}/empty.txt]"], 1,
                     "data.paths", "files: no text in 1 input ({inputs}/empty.txt: empty file)"),
    "missing-checkpoint": (["checkpoint.resume={inputs}/nowhere/step_00000001"], 1,
                           "checkpoint.resume", "does not exist"),
    "partial-checkpoint": (["checkpoint.resume={inputs}/partial/step_00000001"], 1,
                           "checkpoint.resume", "is not a complete checkpoint"),
    "other-model-checkpoint": (["checkpoint.resume={inputs}/other_shape/step_00000001"], 1,
                               "checkpoint.resume", "holds a different model shape: n_layers=3 "
                               "(this run: 2)"),
    # Every architecture key is checked (config/architecture.py), qkv_bias too (it was missed:
    # the resume then failed inside DCP's load). The same dimensions with another flag name the
    # flag, which is what to change.
    "other-flag-checkpoint": (["checkpoint.resume={inputs}/qkv_bias/step_00000001"], 1,
                              "model.qkv_bias", "was trained with qkv_bias=True (this run: "
                              "False); set model.qkv_bias=true to resume it"),
    "flag-older-checkpoint": (["checkpoint.resume={inputs}/before_qkv_bias/step_00000001",
                               "model.qkv_bias=true"], 1, "model.qkv_bias",
                              "was trained with qkv_bias=False (this run: True)"),
    # A key that changes what the weights compute (RoPE, norm_eps) is refused on resume: the
    # next stage with it is a new run from the checkpoint (issue 19 item 5).
    "function-changed-checkpoint": (["checkpoint.resume={inputs}/yarn2/step_00000001",
                                     "model.rope_scaling=yarn", "model.rope_factor=4"], 1,
                                    "model.rope_factor", "was trained with rope_factor=2.0 "
                                    "(this run: 4.0), which changes what its weights compute"),
    # A bit-flipped checkpoint as PATH needs real tensors: test_faults.py
    # test_corrupt_checkpoint_as_path_is_a_one_line_error, beside the SIGKILL tests.
}


@pytest.mark.parametrize("overrides,world,key,fragment", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_and_exit_2(small_args, inputs, overrides, world, key, fragment):
    if "data=files" in overrides:
        small_args = [a for a in small_args if a != "data=synthetic"]
    done = run_train(small_args + [o.format(inputs=inputs) for o in overrides],
                     env={"WORLD_SIZE": str(world)})
    assert done.returncode == 2, (done.stdout[-1000:], done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), done.stderr
    assert fragment.format(inputs=inputs) in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert "error:" not in done.stdout


def test_non_utf8_bytes_are_counted_not_an_error(small_args, tmp_path):
    """Text files are decoded with replacement; the bytes replaced are counted and reported."""
    text = tmp_path / "latin1.txt"
    text.write_bytes(("Gr\xfc\xdfe aus K\xf6ln. " * 40).encode("latin-1"))  # ü ß ö: 3 bad/copy
    clean = tmp_path / "clean.txt"
    clean.write_text("Plain text, nothing to replace here. " * 40)
    args = [a for a in small_args if a != "data=synthetic"]
    done = run_train(args + ["data=files", f"data.paths=[{text},{clean}]", "train.steps=1",
                             "data.val_fraction=0", "model.vocab_size=512"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data: files: 2 documents (1 with non-UTF-8 bytes, 120 bytes replaced)" in done.stdout


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


def _files(run) -> dict:
    """Every file under `run` -> (sha256 of its bytes, mtime): what a refused run must leave."""
    out = {}
    for root, _, names in os.walk(run):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run)] = (hashlib.sha256(f.read()).hexdigest(),
                                                   os.stat(path).st_mtime_ns)
    return out


def test_resume_with_another_rope_is_refused_and_a_new_run_starts_from_it(tmp_path, small_args):
    """Issue 19 item 5 as reported: rerunning a run dir with model.rope_factor 2 -> 4, or another
    model.rope_theta, resumed (exit 0), trained another function and rewrote meta.json. Now: one
    line naming the key and the next stage's command, nothing in the run dir touched (meta.json,
    metrics.jsonl, latest, .hydra/), for resume=auto and for checkpoint.resume=PATH. The next
    stage itself, a new run dir with model.init_from=<that step> and the new factor, trains, and
    rerunning that resumes it."""
    yarn = ["model.rope_scaling=yarn", "model.rope_original_seq_len=16"]
    first = run_train(small_args + yarn + ["model.rope_factor=2", "train.steps=1"])
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000001"
    before = _files(run)
    assert {"checkpoints/latest", "metrics.jsonl", ".hydra/config.yaml"} <= set(before)
    for change, key in [(["model.rope_factor=4"], "model.rope_factor"),
                        (["model.rope_factor=2", "model.rope_theta=500000"], "model.rope_theta"),
                        (["model.rope_factor=4", f"checkpoint.resume={step}"],
                         "model.rope_factor")]:
        again = run_train(small_args + yarn + change + ["train.steps=2"])
        assert again.returncode == 2, (change, again.stdout[-1000:], again.stderr[-2000:])
        lines = again.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}: {step} was trained with")
        assert f"model.init_from={step} hydra.run.dir=NEW_DIR" in lines[0]
        assert again.stdout == ""  # refused by the pre-check, before Hydra writes anything
        assert _files(run) == before, change
    stage2 = [a for a in small_args if not a.startswith("hydra.run.dir=")] + yarn + [
        f"hydra.run.dir={tmp_path / 'stage2'}", f"model.init_from={step}", "model.rope_factor=4"]
    new_run = run_train(stage2 + ["train.steps=1"])
    assert new_run.returncode == 0, new_run.stderr[-2000:]
    assert "model.init_from: loaded" in new_run.stdout
    resumed = run_train(stage2 + ["train.steps=2"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'stage2' / 'checkpoints' / 'step_00000001'}" in \
        resumed.stdout
