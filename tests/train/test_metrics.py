"""FLOPs, peak table and MFU, and the rule that no metric, log write or wandb call ends a run.

An impossible value (MFU > 1, a non-finite number) is logged as it is with one warning; a failing
write (metrics.jsonl on a full disk, wandb) is one warning and the run goes on.
"""
from __future__ import annotations

import errno
import itertools
import os
import sys
import types

import pytest
import torch

from support.common import cpu_dims, metrics_rows, run_train, small_config
from ulysses_train.config.architecture import head_dim
from ulysses_train.model import flops_per_token, model_config, padded_vocab
from ulysses_train.model.flops import attention_flops, model_flops
from ulysses_train.train.metrics import (
    PEAK_FLOPS,
    MetricsFile,
    Reporter,
    mfu_of,
    peak_flops,
    span_sq_sum,
)
from ulysses_train.train.trainer import Trainer
from ulysses_train.train.wandb_run import wandb_login_source, wandb_mode


def test_mfu_is_achieved_over_peak():
    assert mfu_of(6e9, 50_000, 989e12) == pytest.approx(6e9 * 50_000 / 989e12)


def test_mfu_above_one_is_returned_not_raised():
    """An impossible MFU must not end a run: it is returned (and the Reporter warns)."""
    expected = 6e9 * 200_000 / 989e12
    assert expected > 1 and mfu_of(6e9, 200_000, 989e12) == pytest.approx(expected)


def test_peak_table_prefers_the_specific_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda")) == PEAK_FLOPS["H100 PCIe"] < PEAK_FLOPS["H100"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda")) == PEAK_FLOPS["H100"]
    assert peak_flops(torch.device("cpu")) is None


def test_flops_per_token_is_the_documented_formula():
    """6 N (every matmul weight incl. the head, not the embedding lookup) + 6 L Hq D S
    (Hq D = d for this Llama shape)."""
    cfg = model_config("tinyllama_1b")
    d, f, layers, hd = cfg.d_model, cfg.ffn_hidden, cfg.n_layers, head_dim(cfg)
    per_layer = 2 * d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + 3 * d * f + 2 * d
    n = layers * per_layer + d + d * padded_vocab(cfg.vocab_size)
    assert flops_per_token(cfg, 8192) == 6 * n + 6 * layers * cfg.n_heads * hd * 8192
    # attention grows linearly with S per token (causal triangle counted once)
    grow = flops_per_token(cfg, 16384) - flops_per_token(cfg, 8192)
    assert grow == 6 * layers * d * 8192


def test_document_masked_attention_counts_each_document():
    """Per document of n tokens the attention costs 6 L d n^2: 64 documents of 2k tokens in a
    128k row cost 1/64 of the row's causal attention (the old formula overcounted that)."""
    cfg = model_config("tinyllama_1b")
    seq, doc = 131072, 2048
    row = model_flops(cfg, seq, seq**2)
    docs = model_flops(cfg, seq, (seq // doc) * doc**2)
    assert row - docs == attention_flops(cfg, seq**2) * (1 - doc / seq)
    assert attention_flops(cfg, (seq // doc) * doc**2) * 64 == attention_flops(cfg, seq**2)
    assert row == flops_per_token(cfg, seq) * seq


def _squared_lengths(ids: torch.Tensor) -> int:
    """Sum of squared lengths of the runs of equal ids in each row (written out, not vectorised)."""
    return sum(len(list(run)) ** 2 for row in ids.tolist() for _, run in itertools.groupby(row))


def test_span_sq_sum_counts_runs_per_row():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    assert int(span_sq_sum(ids)) == 9 + 4 + 1 + 36 + 1 + 25 == _squared_lengths(ids)
    # A row's last document and the next row's first (both id 0 here) stay two documents.
    assert int(span_sq_sum(torch.zeros(2, 6, dtype=torch.int64))) == 2 * 36


def test_impossible_mfu_on_a_document_masked_run_is_logged_with_one_warning(tmp_path, capsys):
    """debug.peak_flops=1 FLOP/s drives MFU far above 1 on every step: the run completes, each
    row holds the MFU computed from the batch's documents, one warning says it is impossible."""
    cfg = small_config(data={"document_mask": True}, debug={"peak_flops": 1.0},
                       train={"steps": 3}, checkpoint={"every": 0})
    trainer = Trainer(cfg, str(tmp_path), cpu_dims())
    assert trainer.fit() == 0
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    seq, n_tokens = cfg.data.seq_len, cfg.train.global_batch_size * cfg.data.seq_len
    for r in rows:
        ids = trainer.data.global_batch(r["step"] - 1, "train").document_ids
        assert _squared_lengths(ids) < ids.shape[0] * seq**2  # several documents per row
        flops = model_flops(cfg.model, n_tokens, _squared_lengths(ids))
        assert r["mfu"] == pytest.approx(flops / n_tokens * r["tokens_per_s"] / 1.0, rel=1e-9)
    assert capsys.readouterr().err.count("is impossible") == 1


def test_a_sliding_window_step_counts_the_visible_pairs_of_each_layer():
    """A mixed model (sliding, sliding, full) under data.document_mask: the step's FLOPs price
    each layer's visible pairs, counted here by brute force from the kernels' dense masks
    (same document x causal x window), not the full causal count of every layer."""
    from ulysses_train.config.architecture import layer_windows
    from ulysses_train.model.masking import DocumentMask

    types_ = ["sliding_attention", "sliding_attention", "full_attention"]
    cfg = small_config(model={"n_layers": 3, "sliding_window": 4, "layer_types": types_},
                       data={"document_mask": True}, train={"steps": 1})
    trainer = Trainer(cfg, "/nonexistent-run-dir", cpu_dims())
    ids = trainer.data.global_batch(0, "train").document_ids  # (G, S): step 0, every row
    masks = DocumentMask(ids)
    pairs = [2 * int(masks.dense(w).sum()) - ids.numel() for w in layer_windows(cfg.model)]
    assert pairs[0] < _squared_lengths(ids) == pairs[2]  # the window hides pairs here
    n_tokens = ids.numel()
    weights = model_flops(cfg.model, n_tokens, {0: 0, 4: 0})  # the 6 N part alone
    assert trainer.train_step()["flops"] == weights + 6 * cfg.model.d_model * sum(pairs)


class _FailingWandb(types.ModuleType):
    """A stand-in `wandb` module whose init works (or not) and whose run's log/finish raise."""

    def __init__(self, init_fails: bool):
        super().__init__("wandb")
        self.init_fails = init_fails

    def init(self, **kwargs):
        if self.init_fails:
            raise RuntimeError("wandb.init: no network")
        run = types.SimpleNamespace()
        run.log = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("wandb.log: gone"))
        run.finish = lambda *a, **k: (_ for _ in ()).throw(ValueError("wandb.finish: gone"))
        return run


def _disk_full_after_first_row(monkeypatch):
    real_append, calls = MetricsFile.append, []

    def append(self, row):
        calls.append(row["step"])
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        real_append(self, row)
    monkeypatch.setattr(MetricsFile, "append", append)


def test_failing_writes_and_wandb_are_one_warning_each_and_the_run_completes(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", _FailingWandb(init_fails=False))
    _disk_full_after_first_row(monkeypatch)
    cfg = small_config(train={"steps": 4}, checkpoint={"every": 0})
    cfg.logging.wandb.mode = "offline"
    assert Trainer(cfg, str(tmp_path), cpu_dims()).fit() == 0
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1]  # then the disk was full
    err = capsys.readouterr().err
    for what in ("metrics.jsonl failed (OSError", "wandb.log failed (ConnectionError",
                 "wandb.finish failed (ValueError"):
        assert err.count(what) == 1, err
    assert "Traceback" not in err and "step 4/4" in err  # the log lines went on


def test_wandb_init_failure_and_non_finite_values_are_warnings(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", _FailingWandb(init_fails=True))
    reporter = Reporter(str(tmp_path), True, 3, 0, progress=False,
                        wandb_cfg=types.SimpleNamespace(mode="offline", project="p", name=""))
    assert reporter.wandb is None
    for step in (1, 2):
        reporter.log({"step": step, "loss": 1.0, "tokens_per_s": float("inf"), "skipped": False})
    reporter.log({"step": 3, "loss": float("nan"), "skipped": True})  # the guard warned already
    reporter.close()
    err = capsys.readouterr().err
    assert err.count("wandb failed (RuntimeError: wandb.init: no network)") == 1
    assert err.count("tokens_per_s is inf") == 1 and "loss is nan" not in err
    rows = [(r.get("tokens_per_s"), r["loss"]) for r in metrics_rows(tmp_path)]
    assert rows == [(None, 1.0), (None, 1.0), (None, None)]  # strict JSON: null


def _netrc(path, host="api.wandb.ai", password="k" * 40) -> str:
    path.write_text(f"machine {host}\n  login user\n  password {password}\n")
    path.chmod(0o600)  # netrc refuses a password in a file others can read
    return str(path)


def test_wandb_login_is_found_where_wandb_looks(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert wandb_login_source(home) is None
    assert wandb_login_source({**home, "WANDB_API_KEY": "x" * 40}) == "WANDB_API_KEY"
    netrc_path = _netrc(tmp_path / ".netrc")
    assert wandb_login_source(home) == netrc_path
    # An entry for another host is no login for the host wandb will talk to.
    assert wandb_login_source({**home, "WANDB_BASE_URL": "https://wandb.example.com"}) is None
    other = _netrc(tmp_path / "other_netrc", host="wandb.example.com")
    assert wandb_login_source({"NETRC": other, "WANDB_BASE_URL": "https://wandb.example.com",
                               "HOME": str(tmp_path / "nowhere")}) == other
    assert wandb_mode("online", "run", home) == ("online", None)
    assert wandb_mode("offline", "run", {}) == ("offline", None)


def test_wandb_online_without_login_logs_offline_and_says_how_to_sync(tmp_path, monkeypatch,
                                                                      small_args):
    """The run a new user starts: no login, mode online. One warning line before the data and
    model are built, exit 0, the offline run on disk; never a network call (HOME is empty, the
    base URL a closed local port, so even a mistaken online start could not reach anything)."""
    for name in [n for n in os.environ if n.startswith("WANDB_") or n == "NETRC"]:
        monkeypatch.delenv(name)
    run_dir = tmp_path / "run"
    args = [a for a in small_args if not a.startswith("logging.wandb.mode")]
    out = run_train([*args, "logging.wandb.mode=online", "train.steps=1"],
                    env={"HOME": str(tmp_path), "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert out.returncode == 0, out.stderr
    where = os.path.join(run_dir, "wandb")
    assert (f"warning: logging.wandb.mode=online but no wandb login was found (WANDB_API_KEY or "
            f"a netrc entry): logging offline to {where}; upload it later with `wandb sync "
            f"{where}/offline-run-*`") in out.stderr
    assert "Traceback" not in out.stderr
    assert any(n.startswith("offline-run-") for n in os.listdir(where))
