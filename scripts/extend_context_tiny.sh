#!/usr/bin/env bash
# The "Extend a model's context" recipe of docs/huggingface.md, every step, at tiny size on CPU and offline:
# a "pretrained" model (trained here at 96 tokens on data=passkey and exported, standing in for a
# downloaded Hugging Face dir) is evaluated at 384 tokens, extended in two stages (192 tokens
# with YaRN x2 under Ulysses sp=2, then 384 tokens with x4 under a pure ring sp=2 ring=2),
# evaluated again and exported back to Hugging Face. tests/e2e/test_recipe.py runs it with few steps.
#
# usage: scripts/extend_context_tiny.sh WORK_DIR [BASE_STEPS=300] [STAGE_STEPS=150] [TRIALS=10]
set -euo pipefail
W=$(realpath -m "${1:?usage: $0 WORK_DIR [BASE_STEPS] [STAGE_STEPS] [TRIALS]}")
BASE=${2:-300}; STAGE=${3:-150}; TRIALS=${4:-10}
cd "$(dirname "$0")/.."
RUN="torchrun --standalone --nproc_per_node=2"
COMMON="data=passkey train.global_batch_size=8 train.micro_batch_size=4 train.precision=fp32
 optim.lr=3e-3 optim.warmup_steps=20 train.val_every=0 checkpoint.every=0
 logging.wandb.mode=disabled logging.progress=false"
EVAL="eval.passkey_trials=$TRIALS eval.passkey_depths=[0.0,0.5,1.0] eval.batches=2"

echo "== 0. the pretrained model: 96 tokens, exported as a Hugging Face dir"
python train.py model=tiny model.n_layers=2 model.d_model=128 model.n_heads=4 model.n_kv_heads=2 \
  model.ffn_hidden=384 model.vocab_size=128 $COMMON data.seq_len=96 train.steps=$BASE \
  hydra.run.dir="$W/base"
python -m ulysses_train.export "$W/base" "$W/hf-base"

echo "== 1. before: evaluate the Hugging Face dir at 384 tokens"
python scripts/eval.py eval.checkpoint="$W/hf-base" $COMMON data.seq_len=384 $EVAL \
  hydra.run.dir="$W/eval-before"

echo "== 2. stage 1: 192 tokens, YaRN x2, weights and architecture from the Hugging Face dir"
$RUN train.py model.init_from="$W/hf-base" model.rope_scaling=yarn model.rope_factor=2 \
  $COMMON data.seq_len=192 train.steps=$STAGE parallel.sp=2 hydra.run.dir="$W/stage1"

echo "== 3. stage 2: 384 tokens, YaRN x4, weights from stage 1 (a new run), ring attention"
$RUN train.py model.init_from="$W/stage1" model.rope_factor=4 \
  $COMMON data.seq_len=384 train.steps=$STAGE parallel.sp=2 parallel.ring=2 \
  hydra.run.dir="$W/stage2"

echo "== 4. after: evaluate stage 2 at 384 tokens (sp=2, as it trained)"
$RUN scripts/eval.py eval.checkpoint="$W/stage2" $COMMON data.seq_len=384 $EVAL parallel.sp=2 \
  hydra.run.dir="$W/eval-after"

echo "== 5. export for Hugging Face"
python -m ulysses_train.export "$W/stage2" "$W/hf-extended"
python - "$W/hf-extended" <<'PY'
import sys
import transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
rope = model.config.rope_parameters
print(f"transformers loaded {sys.argv[1]}: {type(model).__name__}, "
      f"max_position_embeddings={model.config.max_position_embeddings}, "
      f"rope {rope['rope_type']} x{rope['factor']} from {rope['original_max_position_embeddings']}")
PY
