"""Stage speed: tokens/s of the trainer's step against transformers' LlamaForCausalLM, one row per
length, and the planner's predicted peak for each of our rows against the measured one.

    python -m gpu_check.speed OUT     (GPU_CHECK_MODE=quick: 8k and 32k; dry: a tiny CPU model)

Each measurement is one process of scripts/bench.py or scripts/bench_hf.py at one length (their
`--ac auto` / `--gc auto` ladders, bf16, batch 1: docs/benchmarks.md's H200 table), ours then
transformers' per length, shortest first, so a deadline leaves whole pairs. Each process gets
its row's time box, cut to what the stage has left (GPU_CHECK_STAGE_DEADLINE, a time.time()).
The planner (ulysses_train.plan: memory.predict on shapes_of) gets the configuration the ladder
chose (checkpointing, offload, MLP tiles, loss tiles); on CUDA the measured peak is the
allocator's max_memory_allocated, so both the planner's total (1 GiB + 5 % runtime reserve
included, what it fits layouts with) and its tensor bytes alone are compared.

Pass: every row measured. The speed and planner targets of issue 24 are reported, not gated.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from gpu_check.common import ROOT, dry, mode, run_stage

LENGTHS = {"full": [8192, 32768, 65536, 131072], "quick": [8192, 32768], "dry": [256]}
# Measured steps per length (1 warmup first on CUDA), and each process's time box in seconds:
# the H200 step times (0.2-19 s) x (warmup + steps) + model build, doubled.
STEPS = {8192: 3, 32768: 3, 65536: 1, 131072: 1}
ROW_TIMEOUT_S = {8192: 60, 32768: 75, 65536: 90, 131072: 130}
TARGET_RATIO = {8192: 1.3, 32768: 1.3, 65536: 1.5, 131072: 1.5}  # issue 24, Part 2
DRY_MODEL = ["--model", "tiny", "--n-layers", "2", "--d-model", "64", "--n-heads", "4",
             "--n-kv-heads", "2", "--ffn-hidden", "128", "--vocab-size", "512",
             "--device", "cpu", "--loss-chunk", "64", "--mlp-chunk", "64"]
SCRIPTS = {"ulysses_train": "bench.py", "transformers": "bench_hf.py"}


def model_args() -> list[str]:
    return DRY_MODEL if dry() else ["--model", "tinyllama_1b"]


def deadline() -> float:
    return float(os.environ.get("GPU_CHECK_STAGE_DEADLINE", time.time() + 3600))


def measure(impl: str, seq: int) -> dict:
    """One bench process at one length: its JSON row, or {error} (with its stderr's tail)."""
    left = deadline() - time.time() - 3
    limit = min(ROW_TIMEOUT_S.get(seq, 60), left)
    if limit < 10:
        return {"impl": impl, "seq_len": seq, "error": "skipped: the stage's time is spent"}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", SCRIPTS[impl]), *model_args(),
           "--seq-lens", str(seq), "--steps", str(STEPS.get(seq, 1))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "seq_len": seq, "error": f"timeout after {limit:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr)
        return {"impl": impl, "seq_len": seq, "error": f"exit {proc.returncode}",
                "stderr_tail": proc.stderr.splitlines()[-6:]}
    return json.loads(lines[-1])


def planner_config(row: dict):
    """The Config of an ulysses_train row: the model, length and the ladder's choices."""
    from ulysses_train.config.schema import Config
    from ulysses_train.config.validate import TrainConfig
    from ulysses_train.model import model_config

    flags = dict(zip(model_args()[::2], model_args()[1::2]))
    overrides = {k[2:].replace("-", "_"): int(v) for k, v in flags.items()
                 if k[2:].replace("-", "_") in ("n_layers", "d_model", "n_heads", "n_kv_heads",
                                                 "ffn_hidden", "vocab_size")}
    mcfg = model_config(flags["--model"], **overrides)
    train = TrainConfig(precision="bf16" if row["dtype"] == "bfloat16" else "fp32",
                        activation_checkpointing=row["ac"], activation_offload=row["offload"],
                        loss_chunk=row["loss_chunk"], mlp_chunk=row["mlp_chunk"],
                        micro_batch_size=1, global_batch_size=1)
    cfg = Config(model=mcfg, train=train)
    cfg.data.seq_len = row["seq_len"]
    return cfg


def planner_row(row: dict) -> dict:
    """The planner's predicted peak for `row` next to the measured one (GiB, error in %)."""
    from ulysses_train.plan.memory import predict
    from ulysses_train.plan.shapes import shapes_of

    dev = "cpu" if dry() else "cuda"
    peak = predict(shapes_of(planner_config(row), 1, dev), dev)
    total, tensors = peak.total / 2**30, (peak.total - peak.overhead) / 2**30
    measured = row["peak_mem_gib"]
    return {"seq_len": row["seq_len"], "config": config_name(row), "phase": peak.phase,
            "measured_gib": measured, "predicted_gib": round(total, 3),
            "predicted_tensors_gib": round(tensors, 3),
            "error_pct": round(100 * (total / measured - 1), 1),
            "tensors_error_pct": round(100 * (tensors / measured - 1), 1),
            "within_10pct": abs(total / measured - 1) <= 0.10,
            "measured_is": "peak RSS of the process (CPU)" if dev == "cpu"
            else "torch.cuda.max_memory_allocated"}


def config_name(row: dict) -> str:
    if row["impl"] == "transformers":
        return "GC" if row.get("gradient_checkpointing") else "no GC"
    parts = [{"none": "no AC"}.get(row["ac"], row["ac"])]
    parts += ["offload"] * bool(row.get("offload")) + ["tiled MLP"] * bool(row.get("mlp_chunk"))
    return " + ".join(parts)


def table_row(seq: int, ours: dict, hf: dict) -> dict:
    """One line of the speed table: both rates, configs and peaks, the ratio and its target."""
    out = {"seq_len": seq, "target_ratio": TARGET_RATIO.get(seq)}
    for key, row in (("ours", ours), ("hf", hf)):
        if "error" in row:
            out[key] = {"error": row["error"]}
            continue
        out[key] = {"tokens_per_s": row["tokens_per_s"], "mfu": row["mfu"],
                    "peak_mem_gib": row["peak_mem_gib"], "config": config_name(row),
                    "attempts": row.get("attempts", [])}
    if "error" not in ours and "error" not in hf:
        out["ratio"] = round(ours["tokens_per_s"] / hf["tokens_per_s"], 3)
        target = out["target_ratio"]
        out["meets_target"] = target is not None and out["ratio"] >= target
    return out


def body(stage) -> None:
    lengths = LENGTHS[mode()]
    stage.set(lengths=lengths, model=model_args(), rows=[], table=[], planner=[])
    rows, table, planner = [], [], []
    for seq in lengths:
        ours, hf = measure("ulysses_train", seq), None
        rows.append(ours)
        if "error" not in ours:
            planner.append(planner_row(ours))
            stage.set(device=ours["device"])
        stage.set(rows=rows, planner=planner)
        hf = measure("transformers", seq)
        rows.append(hf)
        table.append(table_row(seq, ours, hf))
        stage.set(rows=rows, table=table)
    bad = [f"{r['impl']} {r['seq_len']}: {r['error']}" for r in rows if "error" in r]
    stage.finish("failed" if bad else "passed", "; ".join(bad) if bad else None)


if __name__ == "__main__":
    raise SystemExit(run_stage("speed", body))
