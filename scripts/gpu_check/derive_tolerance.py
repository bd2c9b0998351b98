"""Measure what bf16_curve.TOLERANCE is derived from: the per-step relative deviation of CPU bf16
autocast from CPU fp32, for bf16_curve's configs, over several seeds (not part of the check).

    cd scripts && python -m gpu_check.derive_tolerance --size full --seeds 0,1,2,3   (~4 min)

Prints one JSON line per (seed, curve) with the per-step deviations of loss and grad_norm, then
per step the largest deviation over all of them, its running maximum (a later step may deviate
less by chance; trajectories only drift apart) and MARGIN x that envelope: bf16_curve.TOLERANCE.

Why CPU bf16 stands in for the GPU's: both round the same operands to bf16's 8-bit significand
under the same autocast policy and accumulate matmuls in fp32; they differ in blocking and
accumulation order, which moves the deviation by a random amount of the same size, not by a
different scale. Run with OMP_NUM_THREADS=1 on a shared machine (tiny shapes).
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch

from gpu_check.bf16_curve import CURVES, MARGIN, SIZES, pair
from gpu_check.common import rel_dev


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="full", choices=sorted(SIZES))
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--curves", default=",".join(CURVES))
    args = p.parse_args(argv)
    worst: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        for curve in args.curves.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                got, want = pair(args.size, curve, tmp, torch.device("cpu"), seed)
            row = {"seed": seed, "curve": curve}
            for key in worst:
                devs = [rel_dev(g[key], w[key]) for g, w in zip(got, want)]
                row[key] = [float(f"{d:.3g}") for d in devs]
                worst[key] = [max(pair) for pair in zip(worst[key], devs)] or devs
            print(json.dumps(row), flush=True)
    for key, per_step in worst.items():
        envelope = [max(per_step[:k + 1]) for k in range(len(per_step))]
        print(json.dumps({"size": args.size, "key": key, "margin": MARGIN,
                          "max_rel_dev_by_step": [float(f"{d:.3g}") for d in per_step],
                          "envelope": [float(f"{d:.3g}") for d in envelope],
                          "tolerance": [float(f"{MARGIN * d:.2g}") for d in envelope]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
