#!/usr/bin/env bash
# Comparison scale: GShard (top-2 MoE every other layer, aux loss 0.01), FLOP-matched to smlp_lm_large.
# Usage: DATA=/path/to/data-bin bash recipes/train_gpu32_gshard.sh      (DRY_RUN=1 to check without data/GPUs)
export RUN=${RUN:-train_gpu32_gshard} ARCH=${ARCH:-gshard_lm_large} GPUS=${GPUS:-32} EXPERTS_PER_GPU=${EXPERTS_PER_GPU:-1}
export LR=${LR:-3e-4} MAX_UPDATE=${MAX_UPDATE:-60000}
export EXTRA_ARGS="${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/train_lm.sh" "$@"
