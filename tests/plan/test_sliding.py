"""The planner prices sliding-window layers by what runs: the visible pairs of each layer's
attention (a brute-force count of the mask here), and no ring layout (refused for them)."""
import json

import pytest

from support.common import small_config
from ulysses_train.cli import plan as plan_cli
from ulysses_train.model.masking import sliding_dense
from ulysses_train.plan.shapes import shapes_of
from ulysses_train.plan.timing import PEAK_TFLOPS, Links, mfu, step_time

LINKS = Links(gpus_per_node=8, intra_gbps=7200.0, inter_gbps=400.0)
TYPES = ["sliding_attention", "sliding_attention", "full_attention"]


def _compute_s(model: dict, seq: int, ac: str) -> float:
    cfg = small_config(model={"n_layers": 3, **model}, data={"seq_len": seq}, parallel={"sp": 2},
                       train={"micro_batch_size": 1, "global_batch_size": 2,
                              "activation_checkpointing": ac})
    return step_time(cfg, shapes_of(cfg, 4), 4, 1.0, LINKS).compute_s, cfg


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_a_sliding_layer_costs_the_visible_pairs_of_its_window(ac):
    """Compute saved by two sliding layers = their hidden pairs (counted on the dense mask),
    at 12 d FLOPs a pair, x 4/3 under full recompute (the attention forward runs twice)."""
    seq, window, rows, world = 256, 16, 2, 4
    full, cfg = _compute_s({}, seq, ac)
    sliding, _ = _compute_s({"sliding_window": window, "layer_types": TYPES}, seq, ac)
    visible = int(sliding_dense(seq, window, "cpu").sum())
    hidden = seq * (seq + 1) // 2 - visible  # pairs of a causal row the window hides
    saved = 2 * 12 * cfg.model.d_model * hidden * rows / world / 1e12  # 2 sliding layers
    assert full - sliding == pytest.approx(saved * (4 / 3 if ac == "full" else 1), rel=1e-9)


def _plan(extra: list) -> dict:
    args = ["model=llama3_8b", "data.seq_len=131072", "train.global_batch_size=1",
            "train.micro_batch_size=1", "plan.gpus=8", "plan.gpu_mem_gib=80",
            "plan.format=json"]
    return args + extra


def test_a_sliding_model_is_planned_faster_and_without_a_ring(capsys):
    """Mistral's meaning (a window, no layer_types: every layer sliding) at S = 32 W: the best
    layout's step is shorter than the all-full model's in the same layout, and no ring layout is
    offered (config/validate.py refuses sliding layers under parallel.ring > 1)."""
    assert plan_cli.main(_plan(["model.sliding_window=4096"])) == 0
    out = json.loads(capsys.readouterr().out)
    rings = [x for x in out["layouts"] if x["ring"] > 1]
    assert rings and not any(x["fits"] for x in rings)
    assert all("model.layer_types" in x["why"] for x in rings)
    best = out["best"]
    assert best["ring"] == 1
    knobs = [f"parallel.{k}={best[k]}" for k in ("tp", "sp", "zero", "ring")] + [
        f"train.{k}={str(best[k]).lower()}" for k in (
            "activation_checkpointing", "activation_offload", "mlp_chunk", "loss_chunk")]
    assert plan_cli.main(_plan(knobs)) == 0
    full = json.loads(capsys.readouterr().out)["best"]
    assert best["step_s"] < 0.6 * full["step_s"]  # at 128k, attention is most of a full step


def test_mfu_of_a_sliding_model_counts_its_visible_pairs():
    """The plan's MFU is the model FLOPs of the pairs computed: at the same step time, a model
    with two sliding layers has 2 x 12 d FLOPs per hidden pair (counted on the mask) less."""
    seq, window = 256, 16
    full = small_config(model={"n_layers": 3}, data={"seq_len": seq},
                        train={"global_batch_size": 1})
    cfg = small_config(model={"n_layers": 3, "sliding_window": window, "layer_types": TYPES},
                       data={"seq_len": seq}, train={"global_batch_size": 1})
    hidden = seq * (seq + 1) // 2 - int(sliding_dense(seq, window, "cpu").sum())
    saved = 2 * 12 * cfg.model.d_model * hidden / (PEAK_TFLOPS * 1e12)  # one step of 1 s
    assert mfu(full, 1.0, 1) - mfu(cfg, 1.0, 1) == pytest.approx(saved, rel=1e-9)
