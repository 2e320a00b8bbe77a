#!/usr/bin/env bash
# Comparison scale: sMLP with partial-prediction routing (router reads the first 20% of positions; loss on the rest).
# Usage: DATA=/path/to/data-bin bash recipes/train_gpu32_smlp_partial.sh      (DRY_RUN=1 to check without data/GPUs)
export RUN=${RUN:-train_gpu32_smlp_partial} ARCH=${ARCH:-smlp_lm_large} GPUS=${GPUS:-32} EXPERTS_PER_GPU=${EXPERTS_PER_GPU:-1}
export LR=${LR:-3e-4} MAX_UPDATE=${MAX_UPDATE:-60000}
export EXTRA_ARGS="${EXTRA_ARGS:---smoe-routing partial --partial-prefix-ratio 0.2}"
exec bash "$(dirname "$0")/train_lm.sh" "$@"
