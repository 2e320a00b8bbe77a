#!/usr/bin/env bash
# Comparison scale: HASH Layers (token-id hash routing), FLOP-matched to smlp_lm_large.
# Usage: DATA=/path/to/data-bin bash recipes/train_gpu32_hash.sh      (DRY_RUN=1 to check without data/GPUs)
export RUN=${RUN:-train_gpu32_hash} ARCH=${ARCH:-hash_lm_large} GPUS=${GPUS:-32} EXPERTS_PER_GPU=${EXPERTS_PER_GPU:-1}
export LR=${LR:-3e-4} MAX_UPDATE=${MAX_UPDATE:-60000}
export EXTRA_ARGS="${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/train_lm.sh" "$@"
