#!/usr/bin/env bash
# Install what this checkout needs into the active Python environment, skipping what is there.
# An existing torch (CUDA or CPU) is kept; without one we install the release we test against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0" >&2
  "$PY" -m pip install -q "torch==2.13.0"
fi
if ! "$PY" -c "import hydra, omegaconf, datasets, sentencepiece, wandb, tqdm, filelock, pytest, pyarrow, transformers, tokenizers, safetensors, matplotlib, ruff" 2>/dev/null; then
  echo "setup: pip install -e '.[dev]'" >&2
  "$PY" -m pip install -q -e ".[dev]"
fi
# The checkout itself, editable and without touching the dependencies: `import ulysses_train` works
# from any directory (scripts/eval.py, scripts/*.py) and the console scripts ulysses-train,
# ulysses-eval, ulysses-export and ulysses-plan are on PATH. Reinstalled each time, so a fresh
# clone (CI's) points at itself, not at an older checkout.
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
