"""Stage parity: 4 ranks sharing the one GPU (gloo on CUDA tensors, fp32) train the 8-step curves
of the one-rank run: Ulysses sp=4, Ulysses x ring (sp=4 ring=2: the ring's CUDA kernels),
sliding-window layers at sp=4 ring=2 (the halo exchange), head groups (parallel.ulysses_chunks).

    python -m gpu_check.parity OUT   (GPU_CHECK_MODE=dry: the same features, 2 CPU ranks)

The curves, uneven labels and tolerances are the CPU parity tests' (tests/support/curves.py:
loss within 5e-6 and grad_norm within 1e-5 relative, ~30x what correct layouts show on CPU in
fp32), on a model with 8 query / 4 kv heads of 16 so every rank holds two query heads and one kv
head. On the GPU each case is its own 4-rank spawn with its own deadline, so a case that
crashes or hangs (e.g. a transport that refuses CUDA tensors) costs only itself; the riskiest
run last.
"""
from __future__ import annotations

import os
import tempfile
import time

from gpu_check.common import (
    compare_curves,
    curve_rows,
    device,
    dry,
    finish_cases,
    mode,
    one_rank,
    run_stage,
)

MODEL = {"d_model": 128, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 256}
# id: (parallel, curves), in the order they run: plain Ulysses first (is 4 ranks on one GPU over
# gloo sound at all?), then the ring's CUDA kernels (never run before), the sliding window, and
# last the document-masked Ulysses path, whose CUDA FlexAttention is compiled in every rank.
CASES = {
    "sp4": ({"sp": 4}, ("causal",)),
    "sp4_ring2": ({"sp": 4, "ring": 2}, ("causal", "documents")),
    "sliding_sp4_ring2": ({"sp": 4, "ring": 2}, ("sliding",)),
    "head_groups_sp4_G2": ({"sp": 4, "ulysses_chunks": 2}, ("causal", "documents")),
}
# The CPU miniature (2 shared cores): the same four features on 2 ranks, one curve each, all in
# one spawn (a spawn of ranks is most of its time).
DRY_CASES = {
    "sp2": ({"sp": 2}, ("causal",)),
    "sp2_ring2": ({"sp": 2, "ring": 2}, ("documents",)),
    "sliding_sp2_ring2": ({"sp": 2, "ring": 2}, ("sliding",)),
    "head_groups_sp2_G2": ({"sp": 2, "ulysses_chunks": 2}, ("documents",)),
}
SPAWN_TIMEOUT_S = 90  # one spawn: start, curves, teardown; cut to the stage's deadline


def world() -> int:
    return 2 if dry() else 4


def active_cases() -> dict:
    return DRY_CASES if dry() else CASES


def spawns() -> list[list[str]]:
    """Which cases share a spawn: each its own on the GPU (a crash costs only itself)."""
    names = list(active_cases())
    return [names] if dry() else [[name] for name in names]

def seq_len() -> int:
    return 64 if dry() else 256


def parity_config(curve: str, parallel: dict):
    """The CPU parity tests' curve config in `parallel`, on MODEL, at seq_len(), fp32, gloo."""
    from support.curves import curve_config

    cfg = curve_config(curve, {**parallel, "backend": "gloo"}, 2)
    for key, value in MODEL.items():
        setattr(cfg.model, key, value)
    cfg.data.seq_len = seq_len()
    if cfg.model.sliding_window:  # a window shorter than the ~seq/4-token documents
        cfg.model.sliding_window = seq_len() // 8
    return cfg


def _rank(rank: int, world_size: int, cases: dict, run_dir: str, mode_name: str):
    """One rank of the given cases {name: (parallel, curves)}: {name: {curve: rows}} (rank 0's
    rows; None elsewhere)."""
    os.environ["GPU_CHECK_MODE"] = mode_name
    from gpu_check import gloo_cuda
    from ulysses_train.parallel import ParallelDims

    gloo_cuda.install(always=mode_name == "dry")
    out = {}
    for name, (parallel, curves) in cases.items():
        out[name], before = {}, gloo_cuda.STAGED["ops"]
        for curve in curves:
            cfg = parity_config(curve, parallel)
            dims = ParallelDims.from_config(cfg.parallel, world_size, rank)
            dims.build_mesh()
            out[name][curve] = curve_rows(cfg, dims, os.path.join(run_dir, name, curve),
                                          uneven=True)
        out[name]["staged_p2p_ops"] = gloo_cuda.STAGED["ops"] - before
    return out


def references(tmp: str) -> dict:
    """One rank on the same device: the rows of every curve some case runs."""
    from support.curves import CURVES

    dev = device()
    wanted = {c for _, curves in active_cases().values() for c in curves}
    return {curve: curve_rows(parity_config(curve, {}), one_rank(dev),
                              os.path.join(tmp, "reference", curve), uneven=True)
            for curve in CURVES if curve in wanted}


def run_spawn(names: list[str], tmp: str, refs: dict) -> dict:
    """Run the cases `names` on one spawn of world() ranks: {name: result}."""
    from support.curves import LOSS_RTOL, NORM_RTOL
    from support.spawn import run_distributed

    t0 = time.monotonic()
    cases = {name: active_cases()[name] for name in names}
    results = {name: {"parallel": cases[name][0], "world": world(), "curves": {}}
               for name in names}
    left = float(os.environ.get("GPU_CHECK_STAGE_DEADLINE", time.time() + 3600)) - time.time()
    if left < 20:
        for result in results.values():
            result.update(ok=False, error="skipped: the stage's time is spent")
        return results
    try:
        per_rank = run_distributed(_rank, world(), cases, tmp, mode(),
                                   timeout=min(SPAWN_TIMEOUT_S, left - 5))
    except Exception as exc:  # noqa: BLE001 — one spawn failing must not hide the others
        cause = getattr(exc, "__cause__", None)
        for result in results.values():
            result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:600],
                          seconds=round(time.monotonic() - t0, 1))
            if cause is not None:
                result["rank_traceback"] = str(cause).splitlines()[-8:]
        return results
    tolerances = {"loss": LOSS_RTOL, "grad_norm": NORM_RTOL}
    for name, result in results.items():
        for curve in cases[name][1]:
            result["curves"][curve] = compare_curves(per_rank[0][name][curve], refs[curve],
                                                     tolerances)
        result["ok"] = all(c["ok"] for c in result["curves"].values())
        result["staged_p2p_ops"] = per_rank[0][name]["staged_p2p_ops"]  # rank 0's
        result["seconds"] = round(time.monotonic() - t0, 1)
    return results


def body(stage) -> None:
    import torch

    dev = device()
    stage.set(device=str(dev), world=world(), backend="gloo", dtype="fp32", seq_len=seq_len(),
              model=MODEL, transport="gloo; send/recv of CUDA tensors staged through host "
              "memory (gpu_check/gloo_cuda.py)" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        # fp32 means fp32: no TF32 matmuls (torch's default, asserted rather than assumed)
        stage.set(tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    cases = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_parity_") as tmp:
        refs = references(tmp)
        for names in spawns():
            cases.update(run_spawn(names, tmp, refs))
            stage.set(cases=cases)
    finish_cases(stage, cases, "not equal to one rank")


if __name__ == "__main__":
    raise SystemExit(run_stage("parity", body))
