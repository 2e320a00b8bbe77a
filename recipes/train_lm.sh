#!/usr/bin/env bash
# Generic LM training run; the per-run recipes set ARCH, GPUS and friends, then call this.
# Every variable below can be overridden from the environment; the script's own arguments are
# appended to fairseq-train's (options with spaces or quotes: bash recipes/train_gpu64.sh --adam-betas "(0.9, 0.999)").
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
: "${ARCH:?set ARCH (e.g. smlp_lm_9b)}" "${GPUS:?set GPUS (the world size)}"
RUN=${RUN:-$ARCH}
SAVE_DIR=${SAVE_DIR:-checkpoints/$RUN}
TOKENS_PER_SAMPLE=${TOKENS_PER_SAMPLE:-1024}  # the spatial matrices are this long
MAX_TOKENS=${MAX_TOKENS:-8192}                # per GPU and forward pass
UPDATE_FREQ=${UPDATE_FREQ:-2}                 # tokens per update = GPUS * MAX_TOKENS * UPDATE_FREQ
LR=${LR:-3e-4}
WARMUP=${WARMUP:-750}
MAX_UPDATE=${MAX_UPDATE:-100000}
EXPERTS_PER_GPU=${EXPERTS_PER_GPU:-0}         # 0: no requirement (dense models)
require_int GPUS MAX_TOKENS UPDATE_FREQ TOKENS_PER_SAMPLE WARMUP MAX_UPDATE EXPERTS_PER_GPU
extra_args

echo "recipe $RUN: $ARCH on $GPUS GPUs, $(( GPUS * MAX_TOKENS * UPDATE_FREQ )) tokens/update x $MAX_UPDATE updates"
launch "$EXPERTS_PER_GPU" --arch "$ARCH" "${COMMON_ARGS[@]}" \
  --tokens-per-sample "$TOKENS_PER_SAMPLE" --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" \
  --lr "$LR" --warmup-updates "$WARMUP" --total-num-update "$MAX_UPDATE" --max-update "$MAX_UPDATE" \
  "${EXTRA[@]}" "$@"
