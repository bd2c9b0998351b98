#!/usr/bin/env bash
# The issue-5 GPU measurements in one call (one H100/H200, no network, torch + transformers only):
#   bash scripts/bench_gpu.sh OUTDIR
# 1. ulysses_train vs transformers LlamaForCausalLM, tinyllama_1b shape, batch 1, bf16, at 8k-128k
#    (each in its fastest configuration that fits: --ac auto / --gc auto);
# 2. the 1M-token proxy: full-width tinyllama_1b with 2 layers at 256k/512k/1M, extrapolated to 22.
# Every result is one JSON line appended to OUTDIR/*.jsonl as soon as it exists.
set -u
OUT=${1:-bench_out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/gpu.txt" 2>&1
run() { local t=$1 f=$2; shift 2; timeout "$t" python "$@" >> "$OUT/$f" 2>> "$OUT/stderr.txt"; echo "rc=$? $*" >> "$OUT/log.txt"; }
run 60  ours.jsonl  scripts/bench.py --model tinyllama_1b --seq-lens 8192,32768 --steps 3
run 100 ours.jsonl  scripts/bench.py --model tinyllama_1b --seq-lens 65536,131072 --steps 1
run 60  hf.jsonl    scripts/bench_hf.py --model tinyllama_1b --seq-lens 8192,32768 --steps 3
run 120 hf.jsonl    scripts/bench_hf.py --model tinyllama_1b --seq-lens 65536,131072 --steps 1
run 200 proxy.jsonl scripts/bench.py --model tinyllama_1b --n-layers 2 --seq-lens 262144,524288,1048576 \
    --ac full --offload --tile-mlp --steps 1 --warmup 0 --extrapolate-layers 22
# `bash scripts/bench_gpu.sh OUT diag`: where the time goes at 32k (not part of the table runs):
# each SDPA kernel forced in turn (cuDNN and efficient need equal head counts: GQA support
# differs by kernel and torch version), and torch.compile'd blocks.
if [ "${2:-}" = diag ]; then
  for b in flash efficient cudnn; do
    run 60 diag.jsonl scripts/bench.py --model tinyllama_1b --seq-lens 32768 --ac selective --sdpa-backend $b --steps 2
  done
  run 240 diag.jsonl scripts/bench.py --model tinyllama_1b --seq-lens 8192,32768 --compile --steps 3
fi
