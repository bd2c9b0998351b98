"""The stages of `scripts/gpu_check.sh OUT [--quick] [--cpu-dry-run]` (docs/benchmarks.md, "GPU
check"): one module per stage, each run as `python -m gpu_check.<stage> OUT` with `scripts/` on
the path, each writing `OUT/<stage>.json` as its results arrive (common.Stage), so a stage the
shell's time box ends still leaves what it had.

    install     missing wheels (hydra, omegaconf, datasets, ...) from a carried folder
    gpu_tests   the `gpu`-marked pytest tests
    bf16_curve  one GPU, bf16: an 8-step curve against the CPU fp32 run of the same config
    parity      4 ranks on the one GPU (gloo, fp32): sp=4, sp=4 ring=2, sliding window, head
                groups, each against one rank
    speed       tokens/s against transformers (scripts/bench.py, bench_hf.py) and the planner's
                predicted peak for each row
    summary     summary.json and the printed table (finish.py marks a stage the box ended)

The mode comes from the environment (GPU_CHECK_MODE = full | quick | dry): `dry` is the CPU
miniature that CI runs (tests/e2e/test_gpu_check.py).
"""
