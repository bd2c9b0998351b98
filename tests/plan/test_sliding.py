"""The planner prices sliding-window layers by what runs: the visible pairs of each layer's
attention (a brute-force count of the mask here), and under a ring the halo exchange's bytes
(the counted figures of docs/attention.md)."""
import json

import pytest

from support.common import small_config
from ulysses_train.cli import plan as plan_cli
from ulysses_train.model.masking import sliding_dense
from ulysses_train.plan.shapes import shapes_of
from ulysses_train.plan.timing import PEAK_TFLOPS, Links, mfu, ring_layer_bytes, step_time

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


def test_a_sliding_model_is_planned_faster_and_may_use_a_ring(capsys):
    """Mistral's meaning (a window, no layer_types: every layer sliding) at S = 32 W: the best
    layout's step is shorter than the all-full model's in the same layout, and ring layouts are
    offered (the halo exchange runs them)."""
    assert plan_cli.main(_plan(["model.sliding_window=4096"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert any(x["fits"] for x in out["layouts"] if x["ring"] > 1)
    best = out["best"]
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


# Bytes one rank sends per layer under sp=4 ring=4 (S = 1024, 4 kv heads x 64, batch 1, fp32),
# counted from the collectives by tests/parallel/test_ring_window.py (docs/attention.md's table).
COUNTED = {0: (1_572_864, 3_670_016), 16: (61_440, 122_880), 64: (258_048, 516_096),
           128: (520_192, 1_040_384)}


@pytest.mark.parametrize("window", sorted(COUNTED))
def test_ring_bytes_of_a_layer_are_the_counted_ones(window):
    """The planner's ring traffic per layer (full: the K/V block R-1 times; sliding: the halo)
    equals what the ring sends, counted; at S = 16 W a sliding layer moves <= 1/4 of a full one."""
    cfg = small_config(model={"n_layers": 1, "d_model": 1024, "n_heads": 16, "n_kv_heads": 4,
                              "sliding_window": window},
                       data={"seq_len": 1024}, parallel={"sp": 4, "ring": 4},
                       train={"micro_batch_size": 1, "global_batch_size": 1})
    assert ring_layer_bytes(shapes_of(cfg, 4), 0) == COUNTED[window]
    if window == 64:
        assert sum(COUNTED[64]) <= sum(COUNTED[0]) / 4


def test_the_planned_command_quotes_a_list_override(capsys):
    """Found by a fresh-user pass: `model.layer_types=[...]` came back unquoted, which zsh
    rejects ("no matches found"); the line must paste into a shell as it is."""
    types = "model.layer_types=[sliding_attention,full_attention]"
    assert plan_cli.main(["model.n_layers=2", "model.sliding_window=64", types,
                          "data.seq_len=1024", "plan.gpus=2", "plan.gpu_mem_gib=80",
                          "plan.format=json"]) == 0
    command = json.loads(capsys.readouterr().out)["best"]["command"]
    assert f"'{types}'" in command and " model.sliding_window=64 " in command
