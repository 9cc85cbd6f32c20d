#!/usr/bin/env bash
# Pretrain the paper's dense 0.5B (Qwen2-0.5B shape) with NITP.
#
#   model   24 layers, d 896, SwiGLU FFN 4864, 14 query / 2 KV heads x 64, tied embeddings,
#           QKV bias, vocabulary 152064 (Qwen2), sequence 8192
#   NITP    target layer k = 5 (~20% of depth), lambda 1.0, SwiGLU projector d -> 4d -> d
#   recipe  AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, lr 4.2e-4, WSD: 2000 warm-up
#           iterations, decay over the last 20%; global batch 512 x 8192 tokens; 200B tokens
#   layout  one node of 8 x 80 GB H100: TP 1, PP 1, DP 8, micro-batch 1 (64 micro-batches per
#           step), distributed optimizer. Estimated ~22 GiB per GPU (DRY_RUN=1: the plan).
#
# On every node (or through examples/slurm/pretrain_dense.sbatch):
#   NNODES=1 MASTER_ADDR=<first node> bash examples/pretrain_dense_0.5b.sh [extra flags]
# Check the flags and the memory estimate without GPUs:
#   DRY_RUN=1 bash examples/pretrain_dense_0.5b.sh
# Extra flags are appended last, so they override the ones below (e.g. --train-iters 100).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

NAME=dense-0.5b
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

# Data: a megatron indexed dataset (tools/preprocess_data.py; a blend "0.7 a 0.3 b" works) and
# the SentencePiece model it was tokenized with. DATA_PATH="" trains on the built-in corpus.
DATA_PATH=${DATA_PATH-$NITP_ROOT/data/corpus_text_document}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$NITP_ROOT/data/tokenizer.model}
VOCAB_SIZE=${VOCAB_SIZE:-152064}  # the paper's (Qwen2); >= your tokenizer's
RUN_DIR=${RUN_DIR:-$NITP_ROOT/runs/$NAME-nitp}  # summary, plot
CHECKPOINT_PATH=${CHECKPOINT_PATH-$RUN_DIR/checkpoints}  # "": none (with --no-save)
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}
# Dataset index cache: megatron-core builds it on global rank 0 and every other rank reads it,
# so it must be on a file system all nodes see (a multi-node start without it is refused).
DATA_CACHE_PATH=${DATA_CACHE_PATH:-$RUN_DIR/data-cache}

SEQ_LENGTH=8192
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-512}
TRAIN_TOKENS=${TRAIN_TOKENS:-200000000000}
TRAIN_ITERS=${TRAIN_ITERS:-$(nitp_iterations "$TRAIN_TOKENS" "$GLOBAL_BATCH_SIZE" "$SEQ_LENGTH")}

MODEL_ARGS=(
  --preset "$NAME"  # the shape above (python pretrain_gpt_nitp.py --list-presets)
  --seq-length "$SEQ_LENGTH"
  --vocab-size "$VOCAB_SIZE"
  --nitp-target-layer 5
  --nitp-loss-weight 1.0
)
TRAINING_ARGS=(
  --micro-batch-size "${MICRO_BATCH_SIZE:-1}"
  --global-batch-size "$GLOBAL_BATCH_SIZE"
  --train-iters "$TRAIN_ITERS"
  --lr 4.2e-4
  --lr-decay-style WSD
  --lr-warmup-iters 2000
  --lr-wsd-decay-ratio 0.2
  --weight-decay 0.1
  --adam-beta1 0.9
  --adam-beta2 0.95
  --clip-grad 1.0
  --bf16
  --use-distributed-optimizer
)
DATA_ARGS=(--data-cache-path "$DATA_CACHE_PATH")
if [ -n "$DATA_PATH" ]; then
  read -r -a data_prefixes <<<"$DATA_PATH"
  DATA_ARGS+=(
    --data-path "${data_prefixes[@]}"
    --tokenizer-model "$TOKENIZER_MODEL"
    --split "969,30,1"
  )
fi
PARALLEL_ARGS=(
  --tensor-model-parallel-size "${TP:-1}"
  --pipeline-model-parallel-size "${PP:-1}"
)
LOGGING_ARGS=(
  --log-interval 10
  --eval-interval 1000
  --eval-iters 10
  --geometry-interval 100
  --run-dir "$RUN_DIR"
  --tensorboard-dir "$TENSORBOARD_DIR"
  --no-progress-bar
)
CHECKPOINT_ARGS=()
if [ -n "$CHECKPOINT_PATH" ]; then
  CHECKPOINT_ARGS=(--save "$CHECKPOINT_PATH" --save-interval "${SAVE_INTERVAL:-1000}")
  if [ -f "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ]; then
    CHECKPOINT_ARGS+=(--load "$CHECKPOINT_PATH")  # resume after a pre-emption or a crash
  fi
fi

nitp_launch pretrain_gpt_nitp.py "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" \
  "${PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "$@"
