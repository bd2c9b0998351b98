"""scripts/eval.py as a user runs it, its config errors, and the data=passkey source."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from support.common import ROOT, SMALL, flip_byte, run_train
from ulysses_train.cli import compose as cli
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import DataConfig
from ulysses_train.data import IGNORE_INDEX, build_data
from ulysses_train.data.passkey import (
    KEY_DIGITS,
    WordTokenizer,
    min_length,
    passkey_window,
)

PASSKEY = [a for a in SMALL if not a.startswith(("data=", "data.seq_len"))] + [
    "data=passkey", "data.seq_len=96"]
EVAL = ["eval.passkey_lengths=[72,96]", "eval.passkey_depths=[0.0,1.0]", "eval.passkey_trials=2",
        "eval.batches=1"]


def run_eval(args, cwd, nproc=0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc else [sys.executable])
    return subprocess.run([*launcher, os.path.join(ROOT, "scripts", "eval.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_eval_script_writes_json_and_png_and_sp2_agrees(tmp_path):
    """Train 2 steps, evaluate the run dir (its latest) in one process and under torchrun sp=2:
    eval.json has the documented fields, eval.png is a PNG, and both layouts agree."""
    trained = run_train(PASSKEY + ["train.steps=2", "hydra.run.dir=run"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    one = run_eval(PASSKEY + EVAL + ["eval.checkpoint=run", "hydra.run.dir=e1"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "eval: positions [0, 64)" in one.stdout and "eval: passkey length 96" in one.stdout
    result = json.loads((tmp_path / "e1" / "eval.json").read_text())
    assert result["checkpoint"].endswith(os.path.join("checkpoints", "step_00000002"))
    assert [(r["start"], r["end"]) for r in result["loss_by_position"]] == [(0, 64), (64, 96)]
    assert all(set(r) == {"start", "end", "loss", "tokens"} for r in result["loss_by_position"])
    assert [(r["length"], r["depth"], r["trials"]) for r in result["passkey"]] == [
        (72, 0.0, 2), (72, 1.0, 2), (96, 0.0, 2), (96, 1.0, 2)]
    assert (tmp_path / "e1" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two = run_eval(PASSKEY + EVAL + ["eval.checkpoint=run", "hydra.run.dir=e2",
                                     "parallel.sp=2"], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr[:4000]  # the ranks' own lines come before torchrun's summary
    other = json.loads((tmp_path / "e2" / "eval.json").read_text())
    for a, b in zip(result["loss_by_position"], other["loss_by_position"]):
        assert b["tokens"] == a["tokens"] and b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert other["passkey"] == result["passkey"]
    # an override the evaluated checkpoint contradicts: named with the key the user gave
    bad = run_eval(PASSKEY + EVAL + ["eval.checkpoint=run", "model.n_layers=3"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: model.n_layers: "), bad.stderr
    assert "eval.checkpoint=run says 2" in bad.stderr and "init_from" not in bad.stderr
    shutil.copytree(tmp_path / "run", tmp_path / "flipped")  # sizes intact: only hashes tell
    flip_byte(tmp_path / "flipped" / "checkpoints" / "step_00000002" / "__0_0.distcp")
    flipped = run_eval(PASSKEY + EVAL + ["eval.checkpoint=flipped", "hydra.run.dir=e3"], tmp_path)
    lines = flipped.stderr.strip().splitlines()
    assert flipped.returncode == 2 and len(lines) == 1, flipped.stderr[-2000:]
    assert lines[0].startswith("error: eval.checkpoint: ") and "__0_0.distcp: content differs " \
        "from the manifest's hash" in lines[0], lines[0]


@pytest.mark.parametrize("args,key", [
    ([], "eval.checkpoint"),
    (["eval.checkpoint=nowhere"], "eval.checkpoint"),  # init_from's check, named as given
    (["eval.checkpoint=.", "model.init_from=elsewhere"], "model.init_from"),
])
def test_eval_script_bad_input_is_one_line(tmp_path, args, key):
    done = run_eval(PASSKEY + args, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), done.stderr


@pytest.mark.parametrize("override,key", [
    ("eval.every=-1", "eval.every"), ("eval.batches=0", "eval.batches"),
    ("eval.passkey_depths=[0.5,1.5]", "eval.passkey_depths"),
    ("eval.passkey_lengths=[0]", "eval.passkey_lengths"),
    ("eval.passkey_trials=-1", "eval.passkey_trials"),
    ("eval.buckets=[10]", "eval.buckets"),
])
def test_bad_eval_keys_name_themselves(override, key):
    with pytest.raises(ConfigError) as info:
        cli.precheck(SMALL + [override])
    assert info.value.key == key


def test_passkey_rows_hide_the_key_and_answer_it():
    tok = WordTokenizer()
    window, n_answer = passkey_window(tok, 100, 0.5, "40719")
    assert window.numel() == 101 and n_answer == KEY_DIGITS
    digits = [tok.ids[d] for d in "40719"]
    assert window[-KEY_DIGITS:].tolist() == digits  # the answer ends the window
    hits = [i for i in range(len(window) - KEY_DIGITS) if window[i:i + 5].tolist() == digits]
    assert len(hits) == 2 and 0.3 < hits[0] / 100 < 0.7  # the key line, near the middle
    cfg = DataConfig(name="passkey", seq_len=96)
    data = build_data(cfg, seed=0, global_batch_size=4, model_vocab_size=128)
    train, again = data.global_batch(3, "train"), data.global_batch(3, "train", rows=slice(2, 4))
    assert torch.equal(train.input_ids[2:], again.input_ids)  # a row is a function of its index
    assert not torch.equal(train.input_ids, data.global_batch(3, "val").input_ids)
    for row in range(4):  # labels: the key's second mention and the answer, nothing else
        window = torch.cat([train.input_ids[row], train.labels[row, -1:]])
        key = window[-KEY_DIGITS:]
        labelled = train.labels[row][train.labels[row] != IGNORE_INDEX]
        assert torch.equal(labelled, torch.cat([key, key]))
        assert torch.equal(train.labels[row, -KEY_DIGITS:], key)  # the answer ends the row
    with pytest.raises(ConfigError, match="data.seq_len"):
        build_data(DataConfig(name="passkey", seq_len=min_length(tok) - 1), seed=0,
                   global_batch_size=4, model_vocab_size=128)


@pytest.mark.parametrize("args,key", [(["eval.chekpoint=/runs/a"], "eval.chekpoint"),
                                      (["eval.checkpoint=/runs/a", "eval.batchez=2"],
                                       "eval.batchez")])
def test_a_misspelt_key_is_named_before_a_missing_one(args, key, tmp_path):
    """Issue 19, item 7: `eval.chekpoint=...` was reported as 'eval.checkpoint is required',
    never naming the typo; unknown keys are now reported first."""
    out = run_eval(args, tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: {key}: unknown key"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
