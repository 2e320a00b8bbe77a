#!/usr/bin/env bash
# Comparison scale: sMLP (deterministic routing), 32 GPUs, one tMoE expert per GPU, 0.5M tokens/update, 60k updates (31B tokens).
# Usage: DATA=/path/to/data-bin bash recipes/train_gpu32_smlp.sh      (DRY_RUN=1 to check without data/GPUs)
export RUN=${RUN:-train_gpu32_smlp} ARCH=${ARCH:-smlp_lm_large} GPUS=${GPUS:-32} EXPERTS_PER_GPU=${EXPERTS_PER_GPU:-1}
export LR=${LR:-3e-4} MAX_UPDATE=${MAX_UPDATE:-60000}
export EXTRA_ARGS="${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/train_lm.sh" "$@"
