"""A mixture trains the same stream in every layout, and resumes across layouts (issue 23).

The global batches (token ids) of a two-source 0.25/0.75 mixture are reassembled from every
rank's micro-batches at sp=2, tp=2 (each x dp=2), sp=4 and dp=4 and compared with the one
process; then a run trains 4 steps at sp=2 and resumes at dp=2, on the one-process loss curve.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from support.common import cpu_dims, metrics_rows, run_train, small_config
from support.curves import LOSS_RTOL
from support.data import build
from support.mixture import mixture_cfg, write_corpora
from support.spawn import run_distributed
from ulysses_train.config.schema import ParallelConfig
from ulysses_train.parallel import ParallelDims
from ulysses_train.parallel.batching import dp_rows, shard_batch
from ulysses_train.train.trainer import Trainer

BATCH, STEPS, SEQ = 8, 6, 64
LAYOUTS = ({"sp": 2}, {"tp": 2}, {"sp": 4}, {})  # at 4 ranks: dp 2, 2, 1, 4


def _pieces(rank, world, data_cfg):
    """Per layout and step: this rank's (rows, columns, input ids) of the global batch."""
    data = build(data_cfg, batch=BATCH)
    out = []
    for parallel in LAYOUTS:
        dims = ParallelDims.from_config(ParallelConfig(**parallel), world, rank)
        dims.build_mesh()
        layout = dims.sequence_layout(SEQ)
        steps = []
        for step in range(STEPS):
            rows = dp_rows(dims, BATCH)
            batch = data.global_batch(step, rows=rows)
            cols = layout.rank_positions(dims.local_rank("sp"))
            ids = torch.cat([mb.input_ids for mb in shard_batch(batch, dims, layout, 2)])
            steps.append((rows.start, cols, ids))
        out.append(steps)
    return out


def test_global_batches_are_identical_in_every_layout(tmp_path):
    cfg = mixture_cfg(tmp_path, seq_len=SEQ)
    reference = build(cfg, batch=BATCH)  # builds the caches the ranks then read
    results = run_distributed(_pieces, 4, cfg, timeout=120)
    for i, parallel in enumerate(LAYOUTS):
        for step in range(STEPS):
            want = reference.global_batch(step).input_ids
            got = torch.full_like(want, -1)
            for rank_result in results:
                start, cols, ids = rank_result[i][step]
                keep = cols < SEQ  # padding columns are the layout's, not the data's
                got[start:start + ids.shape[0]][:, cols[keep]] = ids[:, keep]
            assert torch.equal(got, want), (parallel, step)


def _config(data_cfg, parallel, steps=8, **train):
    cfg = small_config(parallel=parallel, checkpoint={"every": 0},
                       train={"steps": steps, "global_batch_size": BATCH, "val_every": 4,
                              "val_batches": 1, **train})
    cfg.data = dataclasses.replace(data_cfg)
    cfg.model.vocab_size = 1024
    return cfg


def _train(rank, world, data_cfg, parallel, run_dir, train):
    cfg = _config(data_cfg, parallel, **train)
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    Trainer(cfg, run_dir, dims).fit()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    data_cfg = mixture_cfg(root, seq_len=SEQ)
    run_dir = str(root / "one")
    Trainer(_config(data_cfg, {}), run_dir, cpu_dims()).fit()
    return data_cfg, metrics_rows(run_dir)


def test_metrics_carry_tokens_and_validation_per_source(reference_run):
    _, rows = reference_run
    for row in rows:
        assert row["tokens/short"] + row["tokens/long"] == row["tokens"]
    last = rows[-1]
    assert {"val_loss/short", "val_loss/long"} <= set(last)
    assert last["val_loss/short"] != last["val_loss/long"]


def test_resume_after_a_layout_change_continues_the_same_stream(reference_run, tmp_path):
    data_cfg, ref = reference_run
    run_dir = str(tmp_path / "moved")
    run_distributed(_train, 2, data_cfg, {"sp": 2}, run_dir, {"exit_after_steps": 4},
                    timeout=300)
    run_distributed(_train, 2, data_cfg, {}, run_dir, {}, timeout=300)  # dp=2
    got = metrics_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=LOSS_RTOL)
    assert [r["tokens/short"] for r in got] == [r["tokens/short"] for r in ref]


def test_the_cli_trains_a_mixture_and_draws_its_lengths(tmp_path):
    short, long = write_corpora(tmp_path)
    sources = (f"data.sources=[{{name:short,kind:files,paths:[{short}],weight:0.25}},"
               f"{{name:long,kind:files,paths:[{long}],weight:0.75,min_tokens:100}}]")
    run_dir = tmp_path / "run"
    done = run_train([sources, f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=64",
                      "model.vocab_size=1024", "data.tokenizer_sample_bytes=100000",
                      "train.steps=4", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mixture of 2: short (weight 0.25" in done.stdout
    assert (run_dir / "tokens_by_length.png").stat().st_size > 10_000
    assert os.path.exists(run_dir / "tokens_by_length.json")
    bad = run_train([sources.replace("weight:0.25", "weight:0"),
                     f"data.cache_dir={tmp_path / 'cache2'}", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip().splitlines()[-1]]
    assert bad.stderr.startswith("error: data.sources[0].weight:")
    assert not (tmp_path / "cache2").exists()


def test_a_pretokenized_and_a_text_source_train_together(tmp_path):
    import numpy as np

    from support.megatron_writer import write_megatron
    from ulysses_train.config.schema import SourceConfig

    text = mixture_cfg(tmp_path, seq_len=SEQ)
    first = build(dataclasses.replace(text, sources=[text.sources[0]]), batch=BATCH)
    rng = np.random.default_rng(0)
    docs = [[np.append(rng.integers(2, 300, size=rng.integers(5, 90)), first.eos_id).tolist()]
            for _ in range(80)]
    write_megatron(tmp_path / "books", docs)
    data_cfg = dataclasses.replace(text, tokenizer_path=str(first.cache_path / "tokenizer.model"),
                                   sources=[text.sources[0], SourceConfig(
                                       name="books", kind="megatron",
                                       paths=[str(tmp_path / "books")], weight=0.6)])
    run_dir = str(tmp_path / "run")
    Trainer(_config(data_cfg, {}, steps=3), run_dir, cpu_dims()).fit()
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["tokens/books"] > 0
    assert all(np.isfinite(r["loss"]) for r in rows)
