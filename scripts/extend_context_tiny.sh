#!/usr/bin/env bash
# The "Extend a model's context" recipe of docs/huggingface.md, every step, at tiny size on CPU and offline:
# a "pretrained" model (trained here at 96 tokens on data=passkey and exported, standing in for a
# downloaded Hugging Face dir) is evaluated at 384 tokens, extended in two stages (192 tokens
# with YaRN x2 under Ulysses sp=2, then 384 tokens with x4 under a pure ring sp=2 ring=2),
# evaluated again and exported back to Hugging Face. tests/e2e/test_recipe.py runs it with few steps.
#
# FAMILY picks the architecture of the "pretrained" model and so the Hugging Face type it goes
# through (issue 21): llama (default); qwen3 (heads of 48 on d_model 128, QK-norm; YaRN stages);
# gemma3 (the same heads, Gemma's norms, GeGLU and embedding scale, a local layer with a 32-token
# window and RoPE base 10,000 and a global one with base 1e6; the stages scale the global layer
# only, linearly, as Gemma 3 itself does).
#
# usage: scripts/extend_context_tiny.sh WORK_DIR [BASE_STEPS=300] [STAGE_STEPS=150] [TRIALS=10] [FAMILY=llama]
set -euo pipefail
W=$(realpath -m "${1:?usage: $0 WORK_DIR [BASE_STEPS] [STAGE_STEPS] [TRIALS] [FAMILY]}")
BASE=${2:-300}; STAGE=${3:-150}; TRIALS=${4:-10}; FAMILY=${5:-llama}
cd "$(dirname "$0")/.."
SCALING=yarn
case "$FAMILY" in
  llama) ARCH="" ;;
  qwen3) ARCH="model.head_dim=48 model.qk_norm=true model.rope_theta=1000000 model.norm_eps=1e-6" ;;
  gemma3) ARCH="model.head_dim=48 model.qk_norm=true model.sandwich_norm=true
    model.norm_weight_offset=1 model.scale_embeddings=true model.mlp_activation=gelu_tanh
    model.query_pre_attn_scalar=48 model.rope_theta=1000000 model.rope_local_theta=10000
    model.tie_embeddings=true model.norm_eps=1e-6 model.sliding_window=32
    model.layer_types=[sliding_attention,full_attention]"
    SCALING=linear ;;
  *) echo "error: FAMILY: $FAMILY is not one of llama, qwen3, gemma3" >&2; exit 2 ;;
esac
RUN="torchrun --standalone --nproc_per_node=2"
COMMON="data=passkey train.global_batch_size=8 train.micro_batch_size=4 train.precision=fp32
 optim.lr=3e-3 optim.warmup_steps=20 train.val_every=0 checkpoint.every=0
 logging.wandb.mode=disabled logging.progress=false"
EVAL="eval.passkey_trials=$TRIALS eval.passkey_depths=[0.0,0.5,1.0] eval.batches=2"

echo "== 0. the pretrained model: 96 tokens, exported as a Hugging Face dir"
python train.py model=tiny model.n_layers=2 model.d_model=128 model.n_heads=4 model.n_kv_heads=2 \
  model.ffn_hidden=384 model.vocab_size=128 $ARCH $COMMON data.seq_len=96 train.steps=$BASE \
  hydra.run.dir="$W/base"
python -m ulysses_train.export "$W/base" "$W/hf-base"

echo "== 1. before: evaluate the Hugging Face dir at 384 tokens"
python scripts/eval.py eval.checkpoint="$W/hf-base" $COMMON data.seq_len=384 $EVAL \
  hydra.run.dir="$W/eval-before"

echo "== 2. stage 1: 192 tokens, $SCALING x2, weights and architecture from the Hugging Face dir"
$RUN train.py model.init_from="$W/hf-base" model.rope_scaling=$SCALING model.rope_factor=2 \
  $COMMON data.seq_len=192 train.steps=$STAGE parallel.sp=2 hydra.run.dir="$W/stage1"

echo "== 3. stage 2: 384 tokens, $SCALING x4, weights from stage 1 (a new run), ring attention"
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
rope = rope.get("full_attention", rope)  # Gemma 3: one entry per layer type
print(f"transformers loaded {sys.argv[1]}: {type(model).__name__}, "
      f"max_position_embeddings={model.config.max_position_embeddings}, "
      f"global rope {rope['rope_type']} x{rope['factor']}")
PY
