"""What a step reports is the same in every layout: the float64 gradient norm and the FLOPs.

The bug this guards against: `torch.linalg.vector_norm` accumulates fp32 on CPU, so on a
multi-million-element gradient (here a tied 8192 x 256 embedding/head) the logged norm was off
by ~1e-5 relative, and by a different amount per layout, since each shard rounded on its own.
The norm is also what clipping divides by. One spawn of 2 ranks runs one real training step
(`Trainer.train_step`, clipping off so the gradients stay as computed) in each layout and
returns the logged norm next to the float64 norm of that layout's full gradients.

The same step counts the model FLOPs of MFU with `data.document_mask=true`: attention per
document, summed over the whole global batch. dp ranks read different rows and sp ranks the same
rows, so a per-rank count, or one summed over sp too, would differ from the one-process value.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from support.common import cpu_dims, small_config
from support.spawn import run_distributed
from ulysses_train.model.flops import model_flops
from ulysses_train.parallel import ParallelDims
from ulysses_train.train.trainer import Trainer

# Big enough for fp32 accumulation to show (asserted below), small enough for a ~1 s step.
BIG_TIED = {"vocab_size": 8192, "d_model": 256, "n_heads": 4, "n_kv_heads": 2,
            "ffn_hidden": 256, "n_layers": 1, "tie_embeddings": True}
LAYOUTS = {"zero0-dp2": {"dp": 2, "zero": 0}, "zero3-dp2": {"dp": 2, "zero": 3},
           "tp2": {"tp": 2}, "sp2": {"sp": 2}}


def _config(parallel: dict):
    return small_config(model=BIG_TIED, parallel=parallel, checkpoint={"resume": "never"},
                        train={"steps": 1, "grad_clip": 0.0}, data={"document_mask": True})


def _one_step(cfg, dims) -> tuple[float, float, float, int]:
    """(logged norm, float64 norm of the full gradients, the old fp32 per-tensor norm, FLOPs)."""
    trainer = Trainer(cfg, "/nonexistent-run-dir", dims)  # resume=never: the dir is not read
    out = trainer.train_step()
    logged = out["grad_norm"]
    full = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for p in trainer.model.parameters()]  # collective under zero=3 and tp
    exact = math.sqrt(sum(float(g.double().square().sum()) for g in full))
    fp32 = math.sqrt(sum(float(torch.linalg.vector_norm(g)) ** 2 for g in full))
    return logged, exact, fp32, out["flops"]


def _layouts(rank, world) -> dict:
    out = {}
    for name, parallel in LAYOUTS.items():
        cfg = _config(parallel)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        dims.build_mesh()
        out[name] = _one_step(cfg, dims)
    return out


@pytest.fixture(scope="module")
def layouts():
    return run_distributed(_layouts, 2, timeout=120)


def test_grad_norm_is_the_float64_norm_in_every_layout(layouts):
    logged, exact, fp32, _ = _one_step(_config({}), cpu_dims())
    # The test can see the bug: fp32 accumulation is visibly off on this model's gradients.
    assert abs(fp32 - exact) / exact > 1e-6
    assert logged == pytest.approx(exact, rel=1e-12)
    for rank_out in layouts:
        for name, (got, got_exact, _, _) in rank_out.items():
            # Each layout logs the float64 norm of its own gradients (all but the last rounding
            # of a float64 sum is exact: fp32 squares fit in float64's mantissa) ...
            assert got == pytest.approx(got_exact, rel=1e-12), name
            # ... and that is the one-process value up to the fp32 rounding of the gradients
            # themselves, which differ between layouts by their summation order (measured: 4e-9).
            assert got == pytest.approx(exact, rel=1e-7), name


def test_document_masked_flops_count_the_whole_global_batch_once(layouts):
    cfg = _config({})
    trainer = Trainer(cfg, "/nonexistent-run-dir", cpu_dims())
    ids = trainer.data.global_batch(0, "train").document_ids  # (G, S): step 0, every row
    span_sq = sum(len(list(run)) ** 2 for row in ids.tolist() for _, run in itertools.groupby(row))
    assert span_sq < ids.numel() * ids.shape[1]  # several documents: a per-row count differs
    expected = model_flops(cfg.model, ids.numel(), span_sq)
    assert trainer.train_step()["flops"] == expected
    for rank_out in layouts:
        assert {name: out[3] for name, out in rank_out.items()} == dict.fromkeys(LAYOUTS, expected)
