"""scripts/bench.py: the contract command line works on CPU in seconds at tiny sizes, prints one
JSON line per length with the documented fields, and measures what it says."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.common import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench  # noqa: E402

TINY = ["--model", "tiny", "--n-layers", "2", "--d-model", "64", "--n-heads", "4",
        "--n-kv-heads", "2", "--ffn-hidden", "128", "--vocab-size", "512", "--steps", "1",
        "--device", "cpu"]
FIELDS = {"seq_len", "tokens_per_s", "model_tflops", "mfu", "peak_mem_gib"}


def _bench(*extra) -> list[dict]:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), *TINY, *extra],
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_contract_command_prints_one_json_line_per_length():
    """Two lengths: each in its own fresh process (CPU peak RSS only grows)."""
    rows = _bench("--seq-lens", "128,256", "--loss-chunk", "64", "--mlp-chunk", "64")
    assert [r["seq_len"] for r in rows] == [128, 256]
    for row in rows:
        assert FIELDS <= set(row), row
        assert row["tokens_per_s"] > 0 and row["peak_mem_gib"] > row["setup_mem_gib"] > 0
        assert row["mfu"] is None  # no peak FLOP/s for CPUs: unknown, not made up
        assert row["ac"] == "full" and row["mlp_chunk"] == 64  # CPU auto: the least memory
        # model TFLOP/s is the documented formula times the measured rate
        from ulysses_train.model import flops_per_token, model_config
        cfg = model_config("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                           ffn_hidden=128, vocab_size=512)
        expected = flops_per_token(cfg, row["seq_len"]) * row["tokens_per_s"] / 1e12
        assert row["model_tflops"] == pytest.approx(expected, rel=0.02, abs=1e-3)


def test_explicit_options_are_used():
    (row,) = _bench("--seq-lens", "96", "--ac", "selective", "--dtype", "fp32")
    assert row["ac"] == "selective" and row["dtype"] == "float32" and row["mlp_chunk"] == 0


def test_parse_args_keeps_the_documented_flags():
    args = bench.parse_args(["--model", "tinyllama_1b", "--seq-lens", "8192,16384", "--ac", "none",
                             "--dtype", "bf16", "--compile", "--device", "cpu"])
    assert args.seq_lens == [8192, 16384] and args.compile and args.ac == "none"
    assert bench.model_overrides(args) == {}
    assert bench.ladder(args) == [("none", False, False)]
    args = bench.parse_args(["--device", "cuda", "--n-layers", "2"])
    assert bench.model_overrides(args) == {"n_layers": 2}
    assert bench.ladder(args)[0] == ("none", False, False)  # GPU auto: fastest first
    assert bench.ladder(args)[-1] == ("full", True, True)  # ... most frugal last
