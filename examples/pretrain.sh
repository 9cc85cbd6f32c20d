#!/usr/bin/env bash
# Pretrain one of the paper's models with NITP:
#
#   bash examples/pretrain.sh MODEL [extra flags]
#
# MODEL is dense-0.5b, dense-2b, dense-3b, moe-1.9b-a0.3b, moe-3b-a0.5b, moe-9b-a1b or
# moe-45b-a5.5b. The model (shape, NITP layer k and lambda, lr, global batch, the paper's recipe)
# is the preset of that name, passed as `--preset MODEL`; the launch layout (nodes, TP/PP/EP,
# micro-batch, ...) and the token budget are MODEL's line in examples/models.txt. moe-* models
# run pretrain_moe_nitp.py, the others pretrain_gpt_nitp.py.
#
# On every node (or through examples/slurm/pretrain.sbatch):
#   NNODES=2 MASTER_ADDR=<first node> bash examples/pretrain.sh moe-9b-a1b [extra flags]
# Check the flags and the memory estimate without GPUs:
#   DRY_RUN=1 bash examples/pretrain.sh moe-9b-a1b
# Extra flags are appended last, so they override the ones below (e.g. --train-iters 100).
#
# Environment (unset: the table's line and the preset): NNODES, GPUS_PER_NODE, TP, PP, VPP, EP,
# MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, TRAIN_TOKENS (e.g. 240B), TRAIN_ITERS, VOCAB_SIZE,
# DATA_PATH, TOKENIZER_TYPE, TOKENIZER_MODEL, VOCAB_FILE, MERGE_FILE, RUN_DIR, CHECKPOINT_PATH,
# TENSORBOARD_DIR, DATA_CACHE_PATH, SAVE_INTERVAL; FAST (yes: megatron-core's fast GPU settings below; no: none of them, e.g. for
# an image without Transformer Engine); MASTER_ADDR, MASTER_PORT, RDZV_ID, TORCHRUN, PYTHON,
# DRY_RUN (lib/launch.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"

TABLE=$(dirname "${BASH_SOURCE[0]}")/models.txt
MODEL=${1-}
row=$(awk -v m="$MODEL" '$1 == m && $1 !~ /^#/' "$TABLE")
if [ -z "$MODEL" ] || [ -z "$row" ]; then
  echo "usage: bash examples/pretrain.sh MODEL [extra flags]" >&2
  echo "error: unknown MODEL '$MODEL'; valid: $(awk '$1 !~ /^#/ {print $1}' "$TABLE" | xargs)" >&2
  exit 2
fi
shift
read -r _ nodes gpus tp pp ep sp mbs distopt first last vpp tokens save eval <<<"$row"
ENTRY=pretrain_gpt_nitp.py
case $MODEL in moe-*) ENTRY=pretrain_moe_nitp.py ;; esac

GPUS_PER_NODE=${GPUS_PER_NODE:-$gpus}
NNODES=${NNODES:-$nodes}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

# Data: a megatron indexed dataset (tools/preprocess_data.py; a blend "0.7 a 0.3 b" works) and
# the tokenizer it was tokenized with: by default the paper's kind, Qwen2's tokenizer.json read
# by HuggingFaceTokenizer (a local folder; the presets pad its 151,665 ids to 152,064 rows).
# Other kinds: TOKENIZER_TYPE=SentencePieceTokenizer TOKENIZER_MODEL=x.model, or
# TOKENIZER_TYPE=GPT2BPETokenizer VOCAB_FILE=vocab.json MERGE_FILE=merges.txt (Megatron-LM's).
# DATA_PATH="" trains on the built-in corpus (its own SentencePiece model).
DATA_PATH=${DATA_PATH-$NITP_ROOT/data/corpus_text_document}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$NITP_ROOT/data/qwen2-tokenizer}
RUN_DIR=${RUN_DIR:-$NITP_ROOT/runs/$MODEL-nitp}  # summary, plot
CHECKPOINT_PATH=${CHECKPOINT_PATH-$RUN_DIR/checkpoints}  # "": none (with --no-save)
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}
# Dataset index cache: megatron-core builds it on global rank 0 and every other rank reads it,
# so it must be on a file system all nodes see (a multi-node start without it is refused).
DATA_CACHE_PATH=${DATA_CACHE_PATH:-$RUN_DIR/data-cache}

if [ -z "${TRAIN_ITERS:-}" ]; then  # the token budget over the preset's batch and sequence
  TRAIN_TOKENS=$(nitp_tokens "${TRAIN_TOKENS:-$tokens}")
  preset=$(nitp_preset "$MODEL" global_batch_size seq_length)
  read -r preset_batch seq_length <<<"$preset"
  TRAIN_ITERS=$(nitp_iterations "$TRAIN_TOKENS" "${GLOBAL_BATCH_SIZE:-$preset_batch}" "$seq_length")
fi

ARGS=(--preset "$MODEL")  # python pretrain_moe_nitp.py --list-presets
if [ -n "${VOCAB_SIZE:-}" ]; then
  ARGS+=(--vocab-size "$VOCAB_SIZE")  # the preset's: 152064 (Qwen2); >= your tokenizer's
fi
if [ -n "${GLOBAL_BATCH_SIZE:-}" ]; then
  ARGS+=(--global-batch-size "$GLOBAL_BATCH_SIZE")
fi
ARGS+=(--micro-batch-size "${MICRO_BATCH_SIZE:-$mbs}" --train-iters "$TRAIN_ITERS")
if [ "$distopt" = yes ]; then
  ARGS+=(--use-distributed-optimizer)
fi

ARGS+=(--data-cache-path "$DATA_CACHE_PATH")
if [ -n "$DATA_PATH" ]; then
  read -r -a data_prefixes <<<"$DATA_PATH"
  ARGS+=(--data-path "${data_prefixes[@]}" --split "969,30,1" --tokenizer-type "$TOKENIZER_TYPE")
  if [ "$TOKENIZER_TYPE" = GPT2BPETokenizer ]; then
    ARGS+=(--vocab-file "${VOCAB_FILE:?GPT2BPETokenizer needs VOCAB_FILE}"
           --merge-file "${MERGE_FILE:?GPT2BPETokenizer needs MERGE_FILE}")
  else
    ARGS+=(--tokenizer-model "$TOKENIZER_MODEL")
  fi
fi

ARGS+=(--tensor-model-parallel-size "${TP:-$tp}" --pipeline-model-parallel-size "${PP:-$pp}")
if [ "$sp" = yes ]; then
  ARGS+=(--sequence-parallel)
fi
if [ "$first" != - ]; then
  ARGS+=(--decoder-first-pipeline-num-layers "$first")
fi
if [ "$last" != - ]; then
  ARGS+=(--decoder-last-pipeline-num-layers "$last")
fi
vpp=${VPP:-$vpp}
if [ "$vpp" != - ]; then  # the interleaved schedule: model chunks per pipeline rank
  ARGS+=(--num-virtual-stages-per-pipeline-rank "$vpp")
fi
if [ "$ENTRY" = pretrain_moe_nitp.py ]; then
  ARGS+=(--expert-model-parallel-size "${EP:-$ep}" --moe-token-dispatcher-type alltoall)
fi
# The fast GPU settings (the NGC image's Transformer Engine): gradient reduce-scatter and
# parameter all-gather overlapped with compute; for MoE, whole experts per rank (expert TP 1:
# EP stays inside a node), one grouped GEMM for a rank's experts and the fused permutation.
# Gradient-accumulation and RoPE fusion are on by default where TE provides them.
if [ "${FAST:-yes}" = yes ]; then
  ARGS+=(--overlap-grad-reduce)
  if [ "$distopt" = yes ]; then
    ARGS+=(--overlap-param-gather)
  fi
  if [ "$ENTRY" = pretrain_moe_nitp.py ]; then
    ARGS+=(--expert-tensor-parallel-size 1 --moe-grouped-gemm --moe-permute-fusion)
  fi
fi

ARGS+=(
  --log-interval 10
  --eval-interval "$eval"
  --eval-iters 10
  --geometry-interval 100
  --run-dir "$RUN_DIR"
  --tensorboard-dir "$TENSORBOARD_DIR"
  --no-progress-bar
)
if [ -n "$CHECKPOINT_PATH" ]; then
  # One command line for the first launch and every requeue: --load of a folder without a
  # checkpoint starts from scratch (with a warning), with one it resumes.
  ARGS+=(--save "$CHECKPOINT_PATH" --save-interval "${SAVE_INTERVAL:-$save}"
         --load "$CHECKPOINT_PATH")
fi

nitp_launch "$ENTRY" "${ARGS[@]}" "$@"
