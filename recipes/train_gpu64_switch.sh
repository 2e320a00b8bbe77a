#!/usr/bin/env bash
# Scaled comparison (the paper's zero-shot table): Switch (top-1 MoE every other layer, aux loss 0.01), about 8.9B parameters,
# FLOP-matched to smlp_lm_9b, on 64 GPUs with the same tokens as train_gpu64.sh.
# Usage: DATA=/path/to/data-bin bash recipes/train_gpu64_switch.sh      (DRY_RUN=1 to check without data/GPUs)
export RUN=${RUN:-train_gpu64_switch} ARCH=${ARCH:-switch_lm_9b} GPUS=${GPUS:-64} EXPERTS_PER_GPU=${EXPERTS_PER_GPU:-1}
export LR=${LR:-2e-4} MAX_UPDATE=${MAX_UPDATE:-100000}
export EXTRA_ARGS="${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/train_lm.sh" "$@"
